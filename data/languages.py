"""Language codes alma-r knows, with the English names ALMA's prompt uses."""

from __future__ import annotations

# ALMA's LANG_TABLE (utils/utils.py in github.com/fe1ixxu/ALMA), extended with other WMT languages.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "cs": "Czech",
    "is": "Icelandic",
    "zh": "Chinese",
    "ja": "Japanese",
    "ru": "Russian",
    "uk": "Ukrainian",
    "ha": "Hausa",
    "he": "Hebrew",
    "es": "Spanish",
    "pl": "Polish",
    "hr": "Croatian",
    "liv": "Livonian",
    "sah": "Yakut",
}


def split_lp(lp: str) -> tuple[str, str]:
    """'de-en' -> ('de', 'en'); raises ValueError for anything else or an unknown code."""
    parts = lp.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"language pair '{lp}' is not of the form 'xx-yy'")
    for code in parts:
        if code not in LANGUAGE_NAMES:
            raise ValueError(
                f"unknown language code '{code}' in '{lp}' (known: {', '.join(sorted(LANGUAGE_NAMES))})"
            )
    return parts[0], parts[1]


def language_name(code: str) -> str:
    try:
        return LANGUAGE_NAMES[code]
    except KeyError:
        raise ValueError(
            f"unknown language code '{code}' (known: {', '.join(sorted(LANGUAGE_NAMES))})"
        ) from None
