"""ALMA's prompt and output clean-up (models/prompts.py), against the strings of github.com/fe1ixxu/ALMA."""

from __future__ import annotations

import pytest

from alma_r.models.prompts import completion_text, make_prompt, postprocess


def test_german_to_english_prompt():
    src = "Der Hund bellt."
    assert (
        make_prompt(src, "de", "en")
        == "Translate this from German to English:\nGerman: Der Hund bellt.\nEnglish:"
    )


def test_english_to_chinese_prompt():
    src = "The dog barks."
    assert (
        make_prompt(src, "en", "zh")
        == "Translate this from English to Chinese:\nEnglish: The dog barks.\nChinese:"
    )


@pytest.mark.parametrize(
    ("src_lang", "tgt_lang", "expected"),
    [
        ("cs", "en", "Translate this from Czech to English:\nCzech: x\nEnglish:"),
        ("en", "is", "Translate this from English to Icelandic:\nEnglish: x\nIcelandic:"),
        ("ru", "en", "Translate this from Russian to English:\nRussian: x\nEnglish:"),
        ("en", "de", "Translate this from English to German:\nEnglish: x\nGerman:"),
    ],
)
def test_other_directions(src_lang, tgt_lang, expected):
    assert make_prompt("x", src_lang, tgt_lang) == expected


def test_source_text_is_kept_verbatim():
    src = "Braces {src} and {tgt_name} stay; so does 100%."
    assert make_prompt(src, "de", "en") == f"Translate this from German to English:\nGerman: {src}\nEnglish:"


@pytest.mark.parametrize(
    ("src_lang", "tgt_lang"), [("xx", "en"), ("de", "klingon"), ("", "en"), ("DE", "en")]
)
def test_unknown_language_raises(src_lang, tgt_lang):
    with pytest.raises(ValueError, match="unknown language code"):
        make_prompt("Hallo", src_lang, tgt_lang)


def test_completion_is_a_space_then_the_stripped_translation():
    assert completion_text("  The dog barks.\n") == " The dog barks."


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" The dog barks.", "The dog barks."),
        (" The dog barks.\nGerman: Die Katze", "The dog barks."),  # only the first line
        ("  padded  \n", "padded"),
        ("\n The dog barks.", "The dog barks."),  # an EOL right after the tag is skipped
        ("\n  \n The dog barks.\nmore", "The dog barks."),  # twice
        ("\n\n\nThe dog barks.", ""),  # ALMA looks three lines down, no further
        ("\n\n\n\nThe dog barks.", ""),
        ("", ""),
        ("   ", ""),
        ("\n", ""),
        ("\n\n", ""),
        (" \n\t\n \n", ""),
        ("first\n\nsecond", "first"),
    ],
)
def test_postprocess(generated, expected):
    assert postprocess(generated) == expected
