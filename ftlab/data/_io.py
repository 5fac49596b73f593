"""Reading records from local files (json, jsonl, csv, tsv, parquet, .gz) or the HF hub.

Every error names the file and, where there is one, the line: a user with a typo in row 4,812
should not have to read a stack trace from a parser.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


class DataError(ValueError):
    """Bad input data: the message names the file, line and field."""


Record = dict[str, Any]


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _undecodable(path: Path) -> DataError:
    """An error naming the line of the first byte that is not UTF-8 (in the decompressed text)."""
    data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def read_records(path: str | Path) -> list[Record]:
    """All rows of one local file, as dicts. Each row gets ``_where`` = ``file:line`` for errors."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file")
    fmt = _format(path)
    try:
        if fmt == ".jsonl":
            return _read_jsonl(path)
        if fmt == ".json":
            return _read_json(path)
        if fmt in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if fmt == ".tsv" else ",")
        if fmt == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError:
        raise _undecodable(path) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: not a readable gzip file ({err}); rename it without .gz if it is not compressed"
        ) from None
    raise DataError(
        f"{path}: unsupported file type {fmt!r}; use one of {', '.join(SUFFIXES)} (optionally .gz)"
    )


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    except gzip.BadGzipFile:
        raise
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    return [{**r, "_where": f"{path}:row {i + 1}"} for i, r in enumerate(rows)]


def _read_jsonl(path: Path) -> list[Record]:
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append({**row, "_where": f"{path}:{lineno}"})
    return rows


def _read_json(path: Path) -> list[Record]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is a {type(row).__name__}, expected an object")
        rows.append({**row, "_where": f"{path}:record {i}"})
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[Record]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        # SST-style files hold raw quotes inside unquoted text: tsv is read without quoting.
        reader = csv.reader(
            f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        )
        try:
            header = next(reader)
        except StopIteration:
            return []
        rows = []
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{lineno}: {len(row)} columns but the header {header} has {len(header)}"
                )
            rows.append({**dict(zip(header, row)), "_where": f"{path}:{lineno}"})
    return rows


def find_split(folder: Path, split: str) -> Path | None:
    """``folder/<name>.<ext>`` for the split's usual names (dev counts as validation)."""
    for name in SPLIT_NAMES[split]:
        for suffix in SUFFIXES:
            for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix}.gz"):
                if candidate.exists():
                    return candidate
    return None


def load_source(source: str, split: str = "train") -> list[Record] | None:
    """Rows of ``split`` from a file, a folder of split files, or an HF dataset name.

    A file is the train split (returns None for other splits); a folder is searched for
    ``train.*``, ``dev.*``/``validation.*``, ``test.*``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return read_records(path) if split == "train" else None
    if path.is_dir():
        found = find_split(path, split)
        if found is None:
            if split == "train":
                raise DataError(f"{path} holds no train file (expected train{{{','.join(SUFFIXES)}}})")
            return None
        return read_records(found)
    if source.startswith((".", "/", "~")) or Path(source).suffix in SUFFIXES:
        raise DataError(f"data source {source} does not exist")
    return _load_hub(source, split)


def _load_hub(name: str, split: str) -> list[Record] | None:
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise DataError(f"could not load dataset {name!r} from the Hugging Face hub: {err}") from None
    for candidate in SPLIT_NAMES[split]:
        if candidate in ds:
            return [{**r, "_where": f"{name}[{candidate}] row {i}"} for i, r in enumerate(ds[candidate])]
    return None


def require(row: Mapping[str, Any], field: str, kind: str = "field") -> Any:
    """``row[field]`` or a DataError naming the row and the fields it has."""
    if field not in row or row[field] is None:
        have = [k for k in row if k != "_where"]
        raise DataError(f"{row.get('_where', '?')}: missing {kind} {field!r} (row has {have})")
    return row[field]


def text(row: Mapping[str, Any], field: str, required: bool = True) -> str:
    """``row[field]`` as text: strings as they are, numbers written out, a missing optional field as
    "". A list or an object is a DataError, not its Python repr trained on silently."""
    value = require(row, field) if required else row.get(field)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    shown = json.dumps(value, default=str)
    raise DataError(
        f"{row.get('_where', '?')}: field {field!r} must be text, got a {type(value).__name__} "
        f"({shown[:60]}{'...' if len(shown) > 60 else ''})"
    )


def nonempty(rows: Iterable[Record] | None, what: str) -> list[Record]:
    rows = list(rows or [])
    if not rows:
        raise DataError(f"{what} is empty")
    return rows
