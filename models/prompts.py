"""ALMA's translation prompt and post-processing (github.com/fe1ixxu/ALMA, utils/utils.py)."""

from __future__ import annotations

import json
from pathlib import Path

from alma_r.data.languages import language_name

PROMPT_TEMPLATE = "Translate this from {src_name} to {tgt_name}:\n{src_name}: {src}\n{tgt_name}:"


def make_prompt(src: str, src_lang: str, tgt_lang: str, shots: list[dict] | None = None) -> str:
    """ALMA's prompt; the translation follows the final '{Tgt}:' after a space. With `shots` (ALMA's few-shot
    examples, {"source", "target"}), each example is inserted as a source/target line pair before the source."""
    if not shots:
        return PROMPT_TEMPLATE.format(
            src_name=language_name(src_lang), tgt_name=language_name(tgt_lang), src=src
        )
    s, t = language_name(src_lang), language_name(tgt_lang)
    examples = "".join(f"\n{s}: {shot['source']}\n{t}: {shot['target']}" for shot in shots)
    return f"Translate this from {s} to {t}:{examples}\n{s}: {src}\n{t}:"


def load_shots(shots_dir: Path, src_lang: str, tgt_lang: str) -> list[dict]:
    """ALMA's 5-shot file for a direction: shots.<src>-<tgt>.json, a JSON list of {"source", "target"}."""
    path = Path(shots_dir) / f"shots.{src_lang}-{tgt_lang}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no few-shot examples for {src_lang}-{tgt_lang}")
    shots = json.loads(path.read_text(encoding="utf-8"))
    for i, shot in enumerate(shots):
        if not isinstance(shot, dict) or not {"source", "target"} <= set(shot):
            raise ValueError(f"{path}: item {i}: expected an object with 'source' and 'target'")
    return shots


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
