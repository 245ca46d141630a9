"""Caption normalisation, shared by every stage.

The embedding cache is keyed by ``omnidiff.contracts.keys.text_key`` of the *normalised*
caption, so collect, embed, train and serve must all normalise the same way. Any change to
:func:`normalise_caption` must bump :data:`NORMALISER_VERSION`: the version is
part of the encoder fingerprint, so a change makes a new cache instead of a
stale hit.
"""

from __future__ import annotations

import re
import unicodedata

NORMALISER_VERSION = "1"
DEFAULT_MAX_CHARS = 8000

_WHITESPACE = re.compile(r"\s+")


def normalise_caption(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """NFC, control characters removed, whitespace collapsed, cut at ``max_chars``.

    >>> normalise_caption("  a\\tred\\u0000 circle\\n")
    'a red circle'
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    # Category C* = control, format, unassigned, private use; keep whitespace for the collapse below.
    text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = _WHITESPACE.sub(" ", text).strip()
    return text[:max_chars].rstrip()
