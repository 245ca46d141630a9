"""Caption and url checks: pure functions, rows in -> rows out with a quarantine reason where rejected.

Captions go through :func:`omnidiff.text.normalise_caption` (NFC, control
characters removed, whitespace collapsed) exactly as every later stage does, so
the embedding cache keys match. Then a caption is rejected with a reason when:

* ``empty_caption``: null or the empty string;
* ``whitespace_caption``: nothing left after normalisation (only spaces, tabs,
  control or format characters);
* ``no_letters``: no letter of any script (emoji-only, punctuation-only,
  digits-only): nothing a text encoder could align with an image;
* ``caption_too_long``: more than ``max_chars`` characters after normalisation,
  when ``long_caption="quarantine"`` (the default). With ``"truncate"`` the
  caption is cut at ``max_chars`` and kept. Quarantine is the default because a
  100 KB "caption" is scraped page text, and a cut one no longer says what the
  image shows; the tiny world's long captions are ~1-2 KB, far under the limit.

The English translation (``caption_en``) is normalised the same way; one that is
empty after normalisation becomes null (the pair is still a valid pair) and one
over the limit is cut at it (it is a side channel, not the pair's caption).

Urls are checked before anything is downloaded: ``missing_url`` (null/empty) and
``malformed_url`` (not http(s), or no host).
"""

from __future__ import annotations

import sys
import unicodedata
from urllib.parse import urlsplit

from omnidiff.text import normalise_caption

LONG_CAPTION_MODES = ("quarantine", "truncate")


def has_letter(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in text)


def check_caption(raw: str | None, max_chars: int, long_caption: str = "quarantine") -> tuple[str | None, str | None, str | None]:
    """(normalised caption or None, reason or None, detail or None).

    >>> check_caption("  a red\\tcircle ", 100)
    ('a red circle', None, None)
    >>> check_caption("🙂🙂", 100)[1]
    'no_letters'
    """
    if long_caption not in LONG_CAPTION_MODES:
        raise ValueError(f"long_caption={long_caption!r}: must be one of {LONG_CAPTION_MODES}")
    if raw is None or raw == "":
        return None, "empty_caption", "caption is null or empty"
    caption = normalise_caption(raw, max_chars=sys.maxsize)
    if not caption:
        return None, "whitespace_caption", f"{len(raw)} characters, none printable"
    if not has_letter(caption):
        return None, "no_letters", f"no letter in {caption[:40]!r}"
    if len(caption) > max_chars:
        if long_caption == "quarantine":
            return None, "caption_too_long", f"{len(caption)} characters > max_caption_chars={max_chars}"
        caption = normalise_caption(caption, max_chars=max_chars)
    return caption, None, None


def normalise_optional(raw: str | None, max_chars: int) -> str | None:
    """A side-channel text (English translation): normalised and cut, or None when nothing is left."""
    if raw is None:
        return None
    text = normalise_caption(raw, max_chars=max_chars)
    return text or None


def check_url(url: str | None) -> tuple[str | None, str | None]:
    """(reason, detail) for a url that cannot be fetched at all, else (None, None)."""
    if url is None or not url.strip():
        return "missing_url", "url is null or empty"
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a non-numeric or out-of-range port)
    except ValueError as exc:
        return "malformed_url", f"{url[:200]!r}: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return "malformed_url", f"{url[:200]!r}: scheme must be http or https"
    if not parts.hostname:
        return "malformed_url", f"{url[:200]!r}: no host"
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in url):
        return "malformed_url", f"{url[:200]!r}: contains whitespace or control characters"
    return None, None


def check_rows(
    urls: list[str | None],
    captions: list[str | None],
    captions_en: list[str | None],
    max_chars: int,
    long_caption: str,
) -> dict[str, list]:
    """Column-wise checks of url-list rows: {caption, caption_en, reason, detail} (reason None = passes).

    The caption is checked first: a row with both a bad caption and a bad url is
    quarantined for its caption (no request is made for it either way).
    """
    out: dict[str, list] = {"caption": [], "caption_en": [], "reason": [], "detail": []}
    for url, raw, raw_en in zip(urls, captions, captions_en, strict=True):
        caption, reason, detail = check_caption(raw, max_chars, long_caption)
        if reason is None:
            reason, detail = check_url(url)
        out["caption"].append(caption)
        out["caption_en"].append(normalise_optional(raw_en, max_chars))
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out


def check_parallel_rows(
    texts: list[str | None],
    texts_en: list[str | None],
    max_chars: int,
    long_caption: str,
) -> dict[str, list]:
    """Parallel-text rows: both sides must pass the caption checks ({text, text_en, reason, detail})."""
    out: dict[str, list] = {"text": [], "text_en": [], "reason": [], "detail": []}
    for raw, raw_en in zip(texts, texts_en, strict=True):
        text, reason, detail = check_caption(raw, max_chars, long_caption)
        text_en = None
        if reason is None:
            text_en, reason, detail = check_caption(raw_en, max_chars, long_caption)
            if reason is not None:
                detail = f"text_en: {detail}"
        out["text"].append(text)
        out["text_en"].append(text_en)
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out
