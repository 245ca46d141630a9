"""Rejected rows with a machine-readable reason, and the check that no input row is lost or counted twice.

Every input row of the collect stage is kept or quarantined, exactly once (by
``row_id``); :func:`check_invariant` holds the stage to that before the snapshot
is published.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.spill import SpillFolder
from data_prep.tables import extra_columns

QUARANTINE_SCHEMA = pa.schema([
    ("table", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
    ("row_index", pa.int64()), ("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("caption_en", pa.string()), ("lang", pa.string()), ("extra", pa.string()),
])  # fmt: skip


class InvariantError(RuntimeError):
    """Rows were lost or counted twice between input and snapshot (a bug, never bad input)."""


class Quarantine:
    """Rejected rows (QUARANTINE_SCHEMA), spilled to disk by row-id range so that none is held in memory;
    reason counts stay in memory (one counter per reason)."""

    def __init__(self, folder: Path, range_rows: int):
        self.folder, self.range_rows = Path(folder), range_rows
        self.spills: dict[str, SpillFolder] = {}
        self.counts: dict[str, Counter] = {}

    def add_table(self, table_name: str, rows: pa.Table) -> None:
        """Quarantine ``rows`` (QUARANTINE_SCHEMA) of the input table ``table_name`` (pairs, parallel)."""
        if table_name not in self.spills:
            self.spills[table_name] = SpillFolder(self.folder / table_name)
            self.counts[table_name] = Counter()
        self.counts[table_name].update(rows.column("reason").to_pylist())
        self.spills[table_name].write_parts(rows, rows.column("row_id").to_numpy() // self.range_rows)

    def reasons(self, table: str) -> Counter:
        return Counter(self.counts.get(table, Counter()))

    def row_ids(self, table: str, part: int) -> np.ndarray:
        """int64 (N,): the quarantined row ids of one row-id range of ``table``."""
        spill = self.spills.get(table)
        rows = spill.read_part(part) if spill is not None else None
        return np.zeros(0, np.int64) if rows is None else rows.column("row_id").to_numpy()

    def parts(self, table: str) -> list[int]:
        spill = self.spills.get(table)
        return spill.parts() if spill is not None else []

    def tables(self) -> Iterator[pa.Table]:
        """Every quarantined row sorted by (table, row_id), one row-id range at a time."""
        for table_name in sorted(self.spills):
            for part in self.spills[table_name].parts():
                yield self.spills[table_name].read_part(part).sort_by("row_id")


def quarantine_input_rows(quarantine: Quarantine, table_name: str, inputs: pa.Table, rows: list[int],
                          reasons: list[str], details: list[str | None], extras: list[str] | None = None) -> None:
    """Quarantine input rows (indices into ``inputs``) with the raw values as evidence; ``extras``: the input
    list's own columns (default: every column of ``inputs`` the readers did not produce)."""
    if not rows:
        return
    sub = inputs.take(pa.array(rows, pa.int64())).to_pydict()
    extras = {n: sub[n] for n in (extra_columns(inputs) if extras is None else extras)}
    raw_caption = "caption_raw" if table_name == "pairs" else "text_raw"
    raw_en = "caption_en_raw" if table_name == "pairs" else "text_en_raw"
    extra_json = []
    for j in range(len(rows)):
        extra = {name: values[j] for name, values in extras.items() if values[j] is not None}
        extra_json.append(json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None)
    columns = {"table": [table_name] * len(rows), "reason": list(reasons), "detail": list(details),
               "source": sub["source"], "row_index": sub["row_index"], "row_id": sub["row_id"],
               "url": sub.get("url", [None] * len(rows)), "caption": sub[raw_caption], "caption_en": sub[raw_en],
               "lang": sub["lang_declared"], "extra": extra_json}
    quarantine.add_table(table_name, pa.Table.from_pydict(columns, schema=QUARANTINE_SCHEMA))


class KeptRows:
    """Row ids of the rows a table kept, spilled by row-id range (for :func:`check_invariant`), and their count."""

    def __init__(self, folder: Path, range_rows: int):
        self.spill, self.range_rows, self.count = SpillFolder(folder), range_rows, 0

    def add(self, row_ids: list[int]) -> None:
        if row_ids:
            ids = np.asarray(row_ids, np.int64)
            self.spill.write_parts(pa.table({"row_id": ids}), ids // self.range_rows)
            self.count += len(row_ids)

    def row_ids(self, part: int) -> np.ndarray:
        table = self.spill.read_part(part)
        return np.zeros(0, np.int64) if table is None else table.column("row_id").to_numpy()


def check_invariant(table_name: str, input_rows: int, kept: KeptRows, quarantine: Quarantine) -> None:
    """Every input row id is kept or quarantined, exactly once (checked one row-id range at a time)."""
    n_quarantined = sum(quarantine.reasons(table_name).values())
    twice: list[int] = []
    missing: list[int] = []
    extra: list[int] = []
    range_rows = kept.range_rows
    n_parts = -(-input_rows // range_rows)
    for part in sorted(set(range(n_parts)) | set(kept.spill.parts()) | set(quarantine.parts(table_name))):
        ids = np.concatenate([kept.row_ids(part), quarantine.row_ids(table_name, part)])
        lo, hi = part * range_rows, min((part + 1) * range_rows, input_rows)
        outside = ids[(ids < lo) | (ids >= hi)]
        extra.extend(sorted(set(outside.tolist()))[:10])
        inside = ids[(ids >= lo) & (ids < hi)] - lo
        seen = np.bincount(inside, minlength=max(hi - lo, 0))
        twice.extend((np.flatnonzero(seen > 1) + lo).tolist()[:10])
        missing.extend((np.flatnonzero(seen == 0) + lo).tolist()[:10])
    if twice or missing or extra or kept.count + n_quarantined != input_rows:
        raise InvariantError(
            f"{table_name}: input rows {input_rows} != kept {kept.count} + quarantined {n_quarantined}; "
            f"row ids counted twice {twice[:10]}, missing {missing[:10]}, unknown {extra[:10]}"
        )
