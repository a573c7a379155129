"""Language consistency (R1's reasoning-RL stage): the share of the chain of thought's letters that
are in the target language's script. Letters only: digits, symbols and math are neutral."""
from __future__ import annotations

import unicodedata

from r1kit.tokenizer import split_reasoning

# language -> the Unicode script words (from unicodedata names) that count as "in" it
SCRIPTS = {
    "en": ("LATIN",), "fr": ("LATIN",), "de": ("LATIN",), "es": ("LATIN",), "latin": ("LATIN",),
    "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",),
    "ru": ("CYRILLIC",), "ar": ("ARABIC",), "el": ("GREEK",), "hi": ("DEVANAGARI",),
}


def script_share(text: str, language: str = "en") -> float:
    if language not in SCRIPTS:
        raise ValueError(f"language reward: unknown language {language!r}; known: {sorted(SCRIPTS)}")
    wanted = SCRIPTS[language]
    letters = inside = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        name = unicodedata.name(ch, "")
        if name.startswith(wanted) or (language == "zh" and "IDEOGRAPH" in name):
            inside += 1
    return inside / letters if letters else 0.0


def language_reward(completion: str, sample: dict | None = None, *, language: str | None = None) -> float:
    """Share of the reasoning (the whole text when there is none) in the target script; default
    target `sample["meta"]["language"]`, else English."""
    if language is None:
        language = ((sample or {}).get("meta") or {}).get("language", "en")
    if not isinstance(completion, str):
        return 0.0
    split = split_reasoning(completion)
    text = split.reasoning if split.reasoning is not None else split.answer
    return script_share(text, language)
