"""Rejected rows with a machine-readable reason, and the check that no input row is lost or counted twice.

Every input row of the collect stage is kept or quarantined, exactly once (by
``row_id``); :func:`check_invariant` holds the stage to that before the snapshot
is published.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from data_prep.tables import extra_columns

QUARANTINE_SCHEMA = pa.schema([
    ("table", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
    ("row_index", pa.int64()), ("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("caption_en", pa.string()), ("lang", pa.string()), ("extra", pa.string()),
])  # fmt: skip


class InvariantError(RuntimeError):
    """Rows were lost or counted twice between input and snapshot (a bug, never bad input)."""


@dataclass
class Quarantine:
    """Rejected rows, column-wise (QUARANTINE_SCHEMA)."""

    columns: dict[str, list] = field(default_factory=lambda: {n: [] for n in QUARANTINE_SCHEMA.names})

    def add(self, table: str, reason: str, detail: str | None, source: str, row_index: int, row_id: int,
            url: str | None, caption: str | None, caption_en: str | None, lang: str | None,
            extra: dict | None) -> None:
        row = {"table": table, "reason": reason, "detail": detail, "source": source, "row_index": row_index,
               "row_id": row_id, "url": url, "caption": caption, "caption_en": caption_en, "lang": lang,
               "extra": json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None}
        for name in QUARANTINE_SCHEMA.names:
            self.columns[name].append(row[name])

    def table(self) -> pa.Table:
        t = pa.Table.from_pydict(self.columns, schema=QUARANTINE_SCHEMA)
        return t.sort_by([("table", "ascending"), ("row_id", "ascending")])

    def reasons(self, table: str) -> Counter:
        return Counter(r for t, r in zip(self.columns["table"], self.columns["reason"], strict=True) if t == table)

    def row_ids(self, table: str) -> list[int]:
        return [i for t, i in zip(self.columns["table"], self.columns["row_id"], strict=True) if t == table]


def quarantine_input_rows(quarantine: Quarantine, table_name: str, inputs: pa.Table, rows: list[int],
                          reasons: list[str], details: list[str | None]) -> None:
    """Quarantine input rows (indices into ``inputs``) with the raw values as evidence."""
    if not rows:
        return
    sub = inputs.take(pa.array(rows, pa.int64())).to_pydict()
    extras = {n: sub[n] for n in extra_columns(inputs)}
    raw_caption = "caption_raw" if table_name == "pairs" else "text_raw"
    raw_en = "caption_en_raw" if table_name == "pairs" else "text_en_raw"
    for j, (reason, detail) in enumerate(zip(reasons, details, strict=True)):
        extra = {name: values[j] for name, values in extras.items() if values[j] is not None}
        quarantine.add(table_name, reason, detail, sub["source"][j], sub["row_index"][j], sub["row_id"][j],
                       sub.get("url", [None] * len(rows))[j], sub[raw_caption][j], sub[raw_en][j],
                       sub["lang_declared"][j], extra)


def check_invariant(table_name: str, input_rows: int, kept_row_ids: list[int], quarantine: Quarantine) -> None:
    """Every input row id is kept or quarantined, exactly once."""
    quarantined = quarantine.row_ids(table_name)
    seen = Counter(kept_row_ids) + Counter(quarantined)
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(input_rows)) - set(seen))
    extra = sorted(set(seen) - set(range(input_rows)))
    if twice or missing or extra or len(kept_row_ids) + len(quarantined) != input_rows:
        raise InvariantError(
            f"{table_name}: input rows {input_rows} != kept {len(kept_row_ids)} + quarantined {len(quarantined)}; "
            f"row ids counted twice {twice[:10]}, missing {missing[:10]}, unknown {extra[:10]}"
        )
