"""Read url lists and parallel-text files into one standard Arrow table.

Real corpora ship as Parquet, CSV, TSV or JSONL with their own column names.
LAION's (``URL``, ``TEXT``, ``LANGUAGE``) and img2dataset's (``url``, ``caption``)
are found without configuration; anything else is named in the config
(``columns.url=...``). Every other column is kept as an "extra" and lands in the
snapshot under its own name (prefixed ``src_`` where it would collide with a
snapshot column).

Bad input stops the run with a :class:`CollectError` that names the file and
the problem: a missing required column, a file that cannot be parsed, a path
that does not exist. A list with zero rows is allowed (it is recorded in the
manifest with rows=0); zero rows in all lists together is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as ds
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from omnidiff.contracts.io import sha256_file
from omnidiff.env import home


class CollectError(ValueError):
    """Bad input to the collect stage; the message names the file and the problem."""


# suffix -> format; img2dataset reads the same four.
FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
}

# role -> names tried in order when the config leaves the column unset.
URL_LIST_ALIASES: dict[str, tuple[str, ...]] = {
    "url": ("url", "URL", "image_url", "IMAGE_URL"),
    "caption": ("caption", "TEXT", "text", "CAPTION"),
    "lang": ("lang", "LANGUAGE", "language", "LANG"),
    "caption_en": ("caption_en", "ENG TEXT", "text_en", "TEXT_EN", "CAPTION_EN"),
}
URL_LIST_REQUIRED = ("url", "caption")

PARALLEL_ALIASES: dict[str, tuple[str, ...]] = {
    "text": ("text", "TEXT", "caption", "source_text"),
    "text_en": ("text_en", "caption_en", "en", "english", "ENG TEXT", "TEXT_EN"),
    "lang": ("lang", "LANGUAGE", "language", "LANG"),
}
PARALLEL_REQUIRED = ("text", "text_en")

# Standard column names the readers produce for each role (the raw, un-normalised values).
URL_LIST_STANDARD = {"url": "url", "caption": "caption_raw", "lang": "lang_declared", "caption_en": "caption_en_raw"}
PARALLEL_STANDARD = {"text": "text_raw", "text_en": "text_en_raw", "lang": "lang_declared"}

# Columns the snapshot itself writes; an extra input column with one of these names is renamed src_<name>.
RESERVED = frozenset(
    "key caption caption_en lang lang_detected lang_score lang_mismatch image image_digest width height "
    "original_width original_height source_sha256 aesthetic split url source row_index row_id text text_en "
    "reason detail table extra caption_raw caption_en_raw text_raw text_en_raw lang_declared download_url".split()
)


@dataclass(frozen=True)
class SourceInfo:
    """One input file as the manifest records it."""

    path: str
    name: str
    format: str
    sha256: str
    rows: int
    columns: dict[str, str]  # role -> column name found in the file

    def to_dict(self) -> dict:
        return {"path": self.path, "name": self.name, "format": self.format, "sha256": self.sha256,
                "rows": self.rows, "columns": dict(self.columns)}


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def resolve_path(path: Path) -> Path:
    """Absolute path: as given, else from the current directory, else from $OMNIDIFF_HOME."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_absolute():
        return path
    for base in (Path.cwd(), home()):
        if (base / path).exists():
            return (base / path).resolve()
    return (Path.cwd() / path).resolve()


def expand_inputs(paths: tuple[Path, ...] | list[Path], what: str = "url list") -> list[Path]:
    """Files named by ``paths`` (a folder stands for its supported files, sorted)."""
    files: list[Path] = []
    for given in paths:
        path = resolve_path(Path(given))
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and file_format(p))
            if not found:
                raise CollectError(f"{what} folder {str(path)!r} holds no {'/'.join(sorted(set(FORMATS)))} files")
            files.extend(found)
        elif path.is_file():
            if file_format(path) is None:
                raise CollectError(f"{what} {str(path)!r}: unsupported file type; use one of {sorted(FORMATS)}")
            files.append(path)
        else:
            raise CollectError(f"{what} {str(given)!r} does not exist (looked in {Path.cwd()} and {home()})")
    return files


def _is_empty_text_file(path: Path) -> bool:
    """Zero bytes, or a gzip holding zero bytes: a list with no header and no rows."""
    if path.stat().st_size == 0:
        return True
    if path.name.lower().endswith(".gz"):
        import gzip

        try:
            with gzip.open(path, "rb") as f:
                return f.read(1) == b""
        except OSError:
            return False
    return False


def open_dataset(path: Path, what: str = "url list") -> ds.Dataset | None:
    """One list as a pyarrow dataset to scan in batches (None for a text file with no header and no rows)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return ds.dataset(path, format="parquet")
        if _is_empty_text_file(path):
            return None
        if fmt in ("csv", "tsv"):
            parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            return ds.dataset(path, format=ds.CsvFileFormat(parse_options=parse))
        if fmt == "jsonl":
            return ds.dataset(path, format=ds.JsonFileFormat())
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CollectError(f"{what} {str(path)!r} is corrupt or not a valid {fmt} file: {exc}") from None
    raise CollectError(f"{what} {str(path)!r}: unsupported file type")


def _stream(path: Path, fmt: str | None):
    """A streaming reader (record batches, one block at a time) of a CSV/TSV or JSONL list."""
    if fmt in ("csv", "tsv"):
        parse = pa_csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
        return pa_csv.open_csv(path, parse_options=parse)
    return pa_json.open_json(path)


def read_file(path: Path, what: str = "url list") -> pa.Table:
    """Read one whole list as an Arrow table (small lists, reports); the stage scans in batches (:class:`ListScan`)."""
    dataset = open_dataset(path, what)
    if dataset is None:
        return pa.table({})
    try:
        return dataset.to_table()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CollectError(f"{what} {str(path)!r} is corrupt or not a valid {file_format(path)} file: {exc}") from None


def find_columns(
    names: list[str],
    configured: dict[str, str | None],
    aliases: dict[str, tuple[str, ...]],
    required: tuple[str, ...],
    path: Path,
    section: str,
    what: str,
) -> dict[str, str]:
    """role -> column name present in the file; a missing required one is a CollectError naming it."""
    found: dict[str, str] = {}
    for role, candidates in aliases.items():
        chosen = configured.get(role)
        if chosen is not None:
            if chosen not in names:
                raise CollectError(
                    f"{what} {str(path)!r}: column {chosen!r} ({section}.{role}) not found; columns present: {names}"
                )
            found[role] = chosen
            continue
        for candidate in candidates:
            if candidate in names:
                found[role] = candidate
                break
        else:
            if role in required:
                raise CollectError(
                    f"{what} {str(path)!r}: missing required column {role!r} (looked for {list(candidates)}; "
                    f"set {section}.{role} to its name); columns present: {names}"
                )
    return found


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.string())
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return column.cast(pa.string())  # raises on invalid UTF-8, caught by the caller
    return column.cast(pa.string())


def standardise(
    table: pa.Table,
    found: dict[str, str],
    standard: dict[str, str],
    source_name: str,
    path: Path,
    what: str,
    first_row: int = 0,
) -> pa.Table:
    """Role columns renamed to their standard names (as strings), then source + row_index, then extras.

    ``first_row``: the row index of the table's first row in its file (a batch of a longer file)."""
    n = table.num_rows
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for role, std_name in standard.items():
        if role in found:
            try:
                columns[std_name] = _as_string(table.column(found[role]))
            except pa.ArrowException as exc:
                raise CollectError(f"{what} {str(path)!r} is corrupt: column {found[role]!r} is not valid UTF-8 text "
                                   f"({exc})") from None
        else:
            columns[std_name] = pa.nulls(n, pa.string())
    columns["source"] = pa.array([source_name] * n, pa.string())
    columns["row_index"] = pa.array(range(first_row, first_row + n), pa.int64())
    used = set(found.values())
    for name in table.column_names:
        if name in used:
            continue
        out_name = f"src_{name}" if name in RESERVED else name
        while out_name in columns:
            out_name = f"src_{out_name}"
        columns[out_name] = table.column(name)
    return pa.table(columns)


def _source_names(files: list[Path]) -> list[str]:
    names = [f.name for f in files]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(f) for f in files]))
    return [str(f.relative_to(common)) for f in files]


def unify_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """Union of columns in order of appearance; extras whose types disagree between files become strings
    (the permissive promotion pyarrow's concat_tables does, e.g. int32 + int64 -> int64, where it can)."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        types: dict[str, set] = {}
        for schema in schemas:
            for f in schema:
                types.setdefault(f.name, set()).add(f.type)
        clash = {name for name, ts in types.items() if len(ts) > 1}
        fixed = [pa.schema([pa.field(f.name, pa.string()) if f.name in clash else f for f in schema])
                 for schema in schemas]
        return pa.unify_schemas(fixed, promote_options="permissive")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order and types (a missing column is all nulls)."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            arrays.append(column if column.type == f.type else column.cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class _ListFile:
    path: Path
    name: str
    dataset: ds.Dataset | None  # None: a text file with no header and no rows
    found: dict[str, str]
    sha256: str


class ListScan:
    """Lists of one kind scanned in batches: standardised columns, one ``row_id`` per input row across the lists.

    Opening checks every file (it exists, parses, has the required columns) before any row is read;
    :meth:`batches` then yields tables of at most ``batch_rows`` rows, in file and row order, so what
    is held at once is one batch (plus pyarrow's read-ahead), whatever the size of the lists.
    ``sources`` is complete once a scan has finished (a CSV's row count is known only then).
    """

    def __init__(self, paths, configured: dict[str, str | None], aliases: dict[str, tuple[str, ...]],
                 required: tuple[str, ...], standard: dict[str, str], section: str, what: str):
        self.standard, self.what = standard, what
        self.files: list[_ListFile] = []
        std_schemas = []
        paths = expand_inputs(paths, what) if paths else []
        for path, source_name in zip(paths, _source_names(paths) if paths else [], strict=True):
            dataset = open_dataset(path, what)
            if dataset is None:
                found: dict[str, str] = {}  # an empty file: no header to check
                raw_schema = pa.schema([])
            else:
                raw_schema = dataset.schema if file_format(path) == "parquet" else self._text_schema(path, what)
                found = find_columns(raw_schema.names, configured, aliases, required, path, section, what)
            std_schemas.append(standardise(raw_schema.empty_table(), found, standard, source_name, path, what).schema)
            self.files.append(_ListFile(path, source_name, dataset, found, sha256_file(path)))
        if not std_schemas:  # no lists at all: the standard columns, no extras
            std_schemas.append(standardise(pa.table({}), {}, standard, "", Path(), what).schema)
        self.input_schema = unify_schemas(std_schemas)
        self.schema = self.input_schema.append(pa.field("row_id", pa.int64()))
        self.rows: dict[str, int] = {}
        self.batches_read = 0

    @staticmethod
    def _text_schema(path: Path, what: str) -> pa.Schema:
        """A CSV/JSON list's columns as its streaming reader infers them (from the first block)."""
        try:
            return _stream(path, file_format(path)).schema
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CollectError(f"{what} {str(path)!r} is corrupt or not a valid {file_format(path)} file: "
                               f"{exc}") from None

    def batches(self, batch_rows: int) -> Iterator[pa.Table]:
        """Standardised tables of at most ``batch_rows`` rows (url/caption_raw/... or text_raw/..., source,
        row_index, extras, row_id), in input order."""
        row_id = 0
        self.rows = {}
        self.batches_read = 0
        for f in self.files:
            n = 0
            for batch in self._file_batches(f, batch_rows):
                table = standardise(pa.Table.from_batches([batch]), f.found, self.standard, f.name, f.path, self.what,
                                    first_row=n)
                try:
                    table = conform(table, self.input_schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise CollectError(f"{self.what} {str(f.path)!r}: rows {n}-{n + table.num_rows - 1} do not fit "
                                       f"the lists' columns {self.input_schema} ({exc})") from None
                table = table.append_column("row_id", pa.array(range(row_id, row_id + table.num_rows), pa.int64()))
                n += table.num_rows
                row_id += table.num_rows
                self.batches_read += 1
                yield table
            self.rows[str(f.path)] = n

    def _file_batches(self, f: _ListFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
        if f.dataset is None:
            return
        fmt = file_format(f.path)
        try:
            if fmt == "parquet":
                # Row group by row group: one reader over every row group holds more and more of the file's
                # decoded data as it goes (measured with pyarrow 25: Arrow memory grew with the file).
                parquet = pq.ParquetFile(f.path)
                batches = (b for i in range(parquet.num_row_groups)
                           for b in parquet.iter_batches(batch_size=batch_rows, row_groups=[i], use_threads=False))
            else:
                # pyarrow's streaming readers, one block at a time (the dataset scanner reads CSV ahead as fast as
                # it can: measured, its Arrow memory grew with the file), blocks cut to batch_rows.
                batches = (b.slice(start, batch_rows) for b in _stream(f.path, fmt)
                           for start in range(0, b.num_rows, batch_rows))
            for batch in batches:
                if batch.num_rows:
                    yield batch
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, CollectError):
                raise
            raise CollectError(f"{self.what} {str(f.path)!r} is corrupt or not a valid {fmt} file: {exc}") from None

    @property
    def sources(self) -> list[SourceInfo]:
        """The lists as the manifest records them (after a finished scan)."""
        return [SourceInfo(str(f.path), f.name, file_format(f.path) or "", f.sha256, self.rows.get(str(f.path), 0),
                           f.found) for f in self.files]

    def table(self, batch_rows: int = 65536) -> pa.Table:
        """Every row as one table (tests and small lists; the stage scans in batches)."""
        tables = list(self.batches(batch_rows))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


def scan_url_lists(paths, columns) -> ListScan:
    """The url lists' scan: url, caption_raw, lang_declared, caption_en_raw, source, row_index, extras..., row_id
    (position in the concatenated input; the unit of the rows-in = rows-out invariant)."""
    configured = {"url": columns.url, "caption": columns.caption, "lang": columns.lang,
                  "caption_en": columns.caption_en}
    return ListScan(paths, configured, URL_LIST_ALIASES, URL_LIST_REQUIRED, URL_LIST_STANDARD, "columns", "url list")


def scan_parallel_lists(paths, columns) -> ListScan:
    """The parallel-text files' scan: text_raw, text_en_raw, lang_declared, source, row_index, extras, row_id."""
    configured = {"text": columns.text, "text_en": columns.text_en, "lang": columns.lang}
    return ListScan(paths, configured, PARALLEL_ALIASES, PARALLEL_REQUIRED, PARALLEL_STANDARD, "parallel_columns",
                    "parallel list")


def read_url_lists(paths, columns) -> tuple[pa.Table, list[SourceInfo]]:
    """All url lists as one table (see :func:`scan_url_lists`; small lists and tests)."""
    scan = scan_url_lists(paths, columns)
    table = scan.table()
    return table, scan.sources


def read_parallel_lists(paths, columns) -> tuple[pa.Table, list[SourceInfo]]:
    """All parallel-text files as one table (see :func:`scan_parallel_lists`; small lists and tests)."""
    scan = scan_parallel_lists(paths, columns)
    table = scan.table()
    return table, scan.sources
