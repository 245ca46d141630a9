"""Prompt sets: the JSONL files the evaluate stage's metrics draw images for (issue 16 item 7).

One JSON object a line (blank lines are skipped)::

    {"id": "de-short-1", "prompt": "Ein roter Fuchs im Schnee", "lang": "de", "length": "short",
     "prompt_en": "A red fox in the snow"}

* ``prompt``: the text the model is given, in its own language;
* ``lang``: its language code (``en``, ``de``, ``zh``, ``pt-BR``, ...);
* ``length``: the bucket, ``short`` or ``long``; ``long`` means the English reference runs past
  CLIP's 77-token window, so a CLIP-encoded base reads only its beginning;
* ``prompt_en``: its English reference, what CLIP score reads (CLIP reads English). Required
  unless ``lang`` is ``en``, where it defaults to the prompt;
* ``id`` (optional): a unique name; defaults to ``<file stem>:<line>``.

Any other key is refused, as are duplicate ids and a prompt given twice in one language; every
error names the file, the line and the field. The shipped set is
``configs/prompts/multilingual_v1.jsonl``::

    frame = load_prompt_set("configs/prompts/multilingual_v1.jsonl")   # id, prompt, lang, length, prompt_en, line
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

LENGTHS = ("short", "long")
REQUIRED = ("prompt", "lang", "length")
FIELDS = ("id", "prompt", "lang", "length", "prompt_en")
COLUMNS = ["id", "prompt", "lang", "length", "prompt_en", "line"]
LANG_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class PromptSetError(ValueError):
    """A prompt-set file is wrong; the message names the file, the line and the field."""


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def parse_prompt_line(text: str, path: str | Path, line: int) -> dict[str, Any]:
    """One JSONL line -> its checked row (``id`` filled in); :class:`PromptSetError` naming ``path:line``."""
    where = f"{path}:{line}"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise PromptSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise PromptSetError(f"{where}: unknown field(s) {unknown}; valid fields: {list(FIELDS)}")
    for name in REQUIRED:
        if name not in row:
            raise PromptSetError(f"{where}: missing field {name!r} (required: {list(REQUIRED)})")
    for name in ("prompt", "lang", "length", "prompt_en", "id"):
        if name in row and not _text(row[name]):
            raise PromptSetError(f"{where}: field {name!r}={row[name]!r}: expected a non-empty string")
    if not LANG_CODE.match(row["lang"]):
        raise PromptSetError(f"{where}: field 'lang'={row['lang']!r}: expected a language code such as en, de, zh, pt-BR")
    if row["length"] not in LENGTHS:
        raise PromptSetError(f"{where}: field 'length'={row['length']!r}: must be one of {list(LENGTHS)}")
    if "prompt_en" not in row:
        if row["lang"] != "en":
            raise PromptSetError(f"{where}: missing field 'prompt_en' (the English reference CLIP score reads; "
                                 f"required for lang={row['lang']!r})")
        row["prompt_en"] = row["prompt"]
    row.setdefault("id", f"{Path(path).stem}:{line}")
    return {"id": row["id"], "prompt": row["prompt"], "lang": row["lang"], "length": row["length"],
            "prompt_en": row["prompt_en"], "line": line}


def load_prompt_set(path: str | Path) -> pd.DataFrame:
    """The rows of the JSONL prompt set at ``path``, in file order (columns :data:`COLUMNS`)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: no such prompt-set file")
    rows: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    texts: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            row = parse_prompt_line(text, path, line)
            if row["id"] in ids:
                raise PromptSetError(f"{path}:{line}: field 'id'={row['id']!r} already used on line {ids[row['id']]}")
            key = (row["lang"], row["prompt"].strip())
            if key in texts:
                raise PromptSetError(f"{path}:{line}: field 'prompt': the same {row['lang']} prompt as line {texts[key]}")
            ids[row["id"]], texts[key] = line, line
            rows.append(row)
    if not rows:
        raise PromptSetError(f"{path}: no prompts (one JSON object a line, fields {list(FIELDS)})")
    return pd.DataFrame(rows, columns=COLUMNS)


def select_prompt_set(frame: pd.DataFrame, langs: tuple[str, ...] | list[str] = (),
                      lengths: tuple[str, ...] | list[str] = ()) -> pd.DataFrame:
    """Only ``langs`` / ``lengths`` (empty = all); asking for one the set does not hold is an error."""
    for name, wanted in (("lang", langs), ("length", lengths)):
        if wanted:
            missing = sorted(set(wanted) - set(frame[name]))
            if missing:
                raise PromptSetError(f"{name}s={list(wanted)}: {missing} not in the prompt set "
                                     f"(it has {sorted(set(frame[name]))})")
            frame = frame[frame[name].isin(list(wanted))]
    return frame.reset_index(drop=True)


__all__ = ["COLUMNS", "FIELDS", "LENGTHS", "PromptSetError", "load_prompt_set", "parse_prompt_line",
           "select_prompt_set"]
