"""ALMA's translation prompt and post-processing (github.com/fe1ixxu/ALMA, utils/utils.py)."""

from __future__ import annotations

from alma_r.data.languages import language_name

PROMPT_TEMPLATE = "Translate this from {src_name} to {tgt_name}:\n{src_name}: {src}\n{tgt_name}:"


def make_prompt(src: str, src_lang: str, tgt_lang: str) -> str:
    """ALMA's zero-shot prompt; the translation follows the final '{Tgt}:' after a space."""
    return PROMPT_TEMPLATE.format(src_name=language_name(src_lang), tgt_name=language_name(tgt_lang), src=src)


def completion_text(translation: str) -> str:
    """The training target for a prompt: a space after the target tag, then the translation."""
    return " " + translation.strip()


def postprocess(generated: str) -> str:
    """ALMA's clean-up of a generation: the first non-empty line after the target tag.

    ALMA looks at most three lines down (an EOL directly after the tag is skipped, twice), then gives up and
    returns an empty string; `generated` is the text produced after the prompt.
    """
    lines = generated.split("\n")
    for line in lines[:3]:
        if line.strip():
            return line.strip()
    return ""
