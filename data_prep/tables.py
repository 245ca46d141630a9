"""What the pair, parallel and quarantine tables of a snapshot share: pass-through columns, the split, shards."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from omnidiff.contracts.snapshot import SnapshotWriter

# Columns the readers produce that are consumed by the stage rather than passed through.
_CONSUMED = {"caption_raw", "lang_declared", "caption_en_raw", "row_id", "text_raw", "text_en_raw"}


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for the first ``val_fraction`` of the key-hash space, else ``train`` (stable across runs)."""
    return "val" if int(key[:8], 16) < val_fraction * 2**32 else "train"


def extra_columns(table: pa.Table) -> list[str]:
    """The input list's own columns (readers.py "extras"), which land in the snapshot under their names."""
    return [n for n in table.column_names if n not in _CONSUMED and n not in ("url", "source", "row_index")]


def snapshot_table(columns: list[tuple[str, pa.DataType]], computed: dict[str, list], inputs: pa.Table,
                   rows: list[int], passthrough: list[str], schema: pa.Schema) -> pa.Table:
    """The ``columns`` computed by the stage, then the ``passthrough`` columns of ``inputs`` at ``rows``."""
    taken = inputs.select(passthrough).take(pa.array(rows, pa.int64()))
    arrays = [pa.array(computed[name], typ) for name, typ in columns]
    arrays += [taken.column(n).combine_chunks() for n in passthrough]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shards(writer: SnapshotWriter, table_name: str, table: pa.Table, shard_rows: int) -> None:
    """``table`` as shards of ``shard_rows`` rows (one empty shard for an empty table)."""
    for start in range(0, max(table.num_rows, 1), shard_rows):
        writer.write_shard(table_name, table.slice(start, shard_rows))


class ShardBuffer:
    """Tables in, shards of exactly ``shard_rows`` rows out through ``write`` (the last one shorter; one empty
    shard of ``schema`` when no row came): the shards :func:`write_shards` cuts from the whole table, holding at
    most one shard's rows."""

    def __init__(self, write: Callable[[pa.Table], object], shard_rows: int, schema: pa.Schema | None = None):
        self.write, self.shard_rows, self.schema = write, shard_rows, schema
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.written = 0  # shards

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n_rows: int) -> None:
        table = pa.concat_tables(self.pending)
        self.write(table.slice(0, n_rows))
        self.written += 1
        rest = table.slice(n_rows)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def finish(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)
        if not self.written and self.schema is not None:
            self.write(self.schema.empty_table())
            self.written += 1
