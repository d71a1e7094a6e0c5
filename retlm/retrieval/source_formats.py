"""The record formats of ``retlm.retrieval.sources``: JSON Lines (plain or compressed), Parquet, CSV and
Hugging Face datasets, each read as a stream of ``(line or row number, record)``.

A record is a mapping of field names to values. A record that cannot be parsed is yielded as a
``BadRecordError`` (the caller stops or skips it); a file that is not of its format at all, or a field
that the file's schema lacks, raises ``SourceError``.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retlm.errors import OptionError

if TYPE_CHECKING:
    from retlm.retrieval.sources import Part, SourceOptions

MISSING = object()
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSIONS = {  # magic bytes -> name
    b"\x1f\x8b": "gz",
    b"\x28\xb5\x2f\xfd": "zst",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
}
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
BATCH_ROWS = 512  # Parquet and dataset rows read at once
SNIFF_BYTES = 4096
DATASETS_EXTRA = "pip install 'retlm[datasets]'"


class SourceError(OptionError):
    """The source cannot be read as asked: no such file, not of its format, a field it lacks."""


class BadRecordError(ValueError):
    """One record of a source is malformed (the message names its file and line or row)."""


def _reason(err: BaseException) -> str:
    """An exception's message on one line, cut to 200 characters."""
    return " ".join(str(err).split())[:200]


# ---- formats and compression


def detect_format(path: Path) -> str:
    """``jsonl``, ``parquet``, ``csv`` or ``text``, from the file name (without a compression suffix)."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    return "text"


def compression_of(path: Path) -> str | None:
    """The compression of a file by its magic bytes (``gz``, ``zst``, ``bz2``, ``xz``), or None."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary stream of the file's content, decompressed as it is read (never whole in memory)."""
    compression = compression_of(path)
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise SourceError(f"{path} is zstandard-compressed: pip install zstandard") from None
        raw = open(path, "rb")  # noqa: SIM115 (closed with the reader: closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def where(part: Part, number: int) -> str:
    """``data.jsonl line 17`` / ``shard-0.parquet row 3``: a record's place, for messages."""
    unit = "line" if part.format == "jsonl" else "row"
    return f"{part.label} {unit} {number}"


def is_hub_name(text: str) -> bool:
    """``owner/name``: how a Hugging Face Hub dataset is named."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.endswith((".", "-"))


def records(part: Part, options: SourceOptions, dataset: Any = None) -> Iterator[tuple[int, Any]]:
    """``(number, record)`` of every record of ``part``; a malformed one as a ``BadRecordError``."""
    if part.format == "jsonl":
        return _jsonl_records(part, options)
    if part.format == "parquet":
        return _parquet_records(part, options)
    if part.format == "csv":
        return _csv_records(part, options)
    return _dataset_records(part, options, dataset)


def peek(part: Part, options: SourceOptions, dataset: Any = None) -> bool:
    """Whether ``part`` has a record; raises ``SourceError`` if it is not of its format, or if its schema
    (or, for JSONL, its first record) lacks the text or id field."""
    for number, record in records(part, options, dataset):
        if isinstance(record, BadRecordError):
            raise SourceError(str(record))
        if part.format == "jsonl":
            for field in _fields(options):
                if field not in record:
                    raise SourceError(missing_field(where(part, number), field, list(record)))
        return True
    return False


def _fields(options: SourceOptions) -> list[str]:
    return [options.text_field] + ([options.id_field] if options.id_field else [])


def missing_field(place: str, field: str, names: list[str]) -> str:
    shown = ", ".join(map(str, names[:20])) + (" ..." if len(names) > 20 else "") or "none"
    return (
        f"{place} has no field {field!r}; its fields are: {shown} (choose one with --text-field/--id-field)"
    )


# ---- JSON Lines


def _jsonl_records(part: Part, options: SourceOptions) -> Iterator[tuple[int, Any]]:
    path = Path(part.location)
    with open_binary(path) as f:
        if part.start == 0:
            _check_json_lines(f, part)
        else:
            f.seek(part.start)
        number, offset = (part.first or 1), part.start
        for line in f:
            if part.stop is not None and offset >= part.stop:
                break
            if offset == 0 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]  # a byte-order mark is no JSON
                offset += len(codecs.BOM_UTF8)
            offset += len(line)
            if line.strip():
                yield number, _parse_line(line, part, number)
            number += 1


def _check_json_lines(f: io.BufferedIOBase, part: Part) -> None:
    """Refuse a binary file, or a JSON array, named like JSON Lines (from its first bytes)."""
    try:
        head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES]  # type: ignore[attr-defined]
    except (OSError, EOFError, ValueError) as err:  # a corrupt gzip / zstd stream
        raise SourceError(f"{part.label}: cannot decompress it ({_reason(err)})") from None
    nul, bad = head.find(b"\x00"), None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the sample
            bad = err.start
    if nul >= 0 or bad is not None:
        detail = f"a NUL byte at offset {nul}" if nul >= 0 else f"a byte that is not UTF-8 at offset {bad}"
        raise SourceError(f"{part.label} is not JSON Lines: binary data in its first bytes ({detail})")
    if head.lstrip().startswith(b"["):
        raise SourceError(f"{part.label} holds a JSON array, not JSON Lines (one JSON object per line)")


def _parse_line(line: bytes, part: Part, number: int) -> Any:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return BadRecordError(f"{where(part, number)} is not UTF-8 text")
    except json.JSONDecodeError as err:
        return BadRecordError(f"{where(part, number)} is not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(record, dict):
        return BadRecordError(f"{where(part, number)} is a JSON {type(record).__name__}, not an object")
    return record


def line_ranges(path: Path, pieces: int, block: int = 1 << 24) -> list[tuple[int, int, int]]:
    """``pieces`` byte ranges ``(start, stop, first line number)`` of a plain text file, each starting at
    a line start (one pass counting newlines)."""
    size = path.stat().st_size
    targets = [size * j // pieces for j in range(1, pieces)]
    starts, lines = [(0, 1)], 1
    with open(path, "rb") as f:
        position = 0
        while targets and (data := f.read(block)):
            while targets and targets[0] < position + len(data):
                cut = data.find(b"\n", max(targets[0] - position, 0))
                if cut < 0:
                    break
                begin = position + cut + 1
                starts.append((begin, lines + data.count(b"\n", 0, cut + 1)))
                targets = [t for t in targets if t >= begin]
            lines += data.count(b"\n")
            position += len(data)
    starts = [s for i, s in enumerate(starts) if s[0] < size and (i == 0 or s[0] > starts[i - 1][0])]
    bounds = [s[0] for s in starts] + [size]
    return [(a, b, line) for (a, line), b in zip(starts, bounds[1:], strict=True)]


# ---- Parquet


def parquet_rows(path: Path) -> int:
    pq = _pyarrow_parquet()
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as err:  # pyarrow's ArrowInvalid: not a Parquet file
        raise SourceError(f"{path} is not a Parquet file ({_reason(err)})") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("reading Parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _parquet_records(part: Part, options: SourceOptions) -> Iterator[tuple[int, Any]]:
    pq = _pyarrow_parquet()
    with pq.ParquetFile(part.location) as file:
        names = file.schema_arrow.names
        _check_columns(part.label, names, options)
        _check_text_type(part.label, file.schema_arrow.field(options.text_field).type, options.text_field)
        columns = _fields(options)
        stop = file.metadata.num_rows if part.stop is None else part.stop
        row, groups = 0, []
        for g in range(file.num_row_groups):  # the row groups that hold rows [start, stop)
            n = file.metadata.row_group(g).num_rows
            if row + n > part.start and row < stop:
                groups.append(g)
            row += n
        if not groups:
            return
        row = sum(file.metadata.row_group(g).num_rows for g in range(groups[0]))
        for batch in file.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns):
            values = {name: batch.column(name).to_pylist() for name in columns}
            for i in range(batch.num_rows):
                if part.start <= row < stop:
                    yield row, {name: values[name][i] for name in columns}
                row += 1


def _check_columns(label: str, names: list[str], options: SourceOptions) -> None:
    for field in _fields(options):
        if field not in names:
            raise SourceError(
                missing_field(label, field, list(names)).replace(" has no field", " has no column")
            )


def _check_text_type(label: str, kind: Any, field: str) -> None:
    import pyarrow as pa

    is_view = getattr(pa.types, "is_string_view", lambda kind: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise SourceError(f"{label}: column {field!r} holds {kind}, not text (choose one with --text-field)")


# ---- CSV


def _csv_records(part: Part, options: SourceOptions) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))  # one document a field
    with io.TextIOWrapper(open_binary(Path(part.location)), encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as err:
            raise SourceError(f"{part.label} is not a CSV file with a header row ({err})") from None
        if header is None:
            return
        _check_columns(part.label, header, options)
        row = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise SourceError(f"{part.label} near line {reader.line_num + 1} is not UTF-8 text") from None
            except csv.Error as err:
                yield row, BadRecordError(f"{where(part, row)} (line {reader.line_num}): {err}")
                row += 1
                continue
            if values:
                if len(values) != len(header):
                    message = f"{len(values)} fields where the header has {len(header)}"
                    yield row, BadRecordError(f"{where(part, row)} (line {reader.line_num}): {message}")
                else:
                    yield row, dict(zip(header, values, strict=True))
                row += 1


# ---- Hugging Face datasets


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SourceError(
            f"reading a Hugging Face dataset needs the datasets package: {DATASETS_EXTRA}"
        ) from None
    return datasets


def is_dataset_object(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def select_split(dataset: Any, split: str | None, what: str) -> Any:
    """One split of a ``DatasetDict`` (``split``, or its only one), or the dataset itself."""
    if not isinstance(getattr(dataset, "column_names", None), dict):  # a Dataset: no splits
        if split is not None:
            raise SourceError(f"{what} has no splits; drop --split {split}")
        return dataset
    splits = sorted(dataset.keys())
    if split is None and len(splits) == 1:
        return dataset[splits[0]]
    if split not in splits:
        raise SourceError(f"{what} has the splits {', '.join(splits)}; choose one with --split")
    return dataset[split]


def load_saved(path: Path, split: str | None) -> Any:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a broken folder
        raise SourceError(f"{path}: cannot load the dataset ({_reason(err)})") from None
    return select_split(loaded, split, str(path))


def saved_dataset_rows(path: Path, split: str | None) -> int:
    return len(load_saved(path, split))


def _open_dataset(part: Part, options: SourceOptions, dataset: Any) -> Any:
    if part.format == "hf-object":
        return dataset
    if part.format == "hf-disk":
        return load_saved(Path(part.location), options.split)
    datasets = _datasets()
    try:
        return datasets.load_dataset(part.location, split=options.split or "train", streaming=True)
    except Exception as err:  # offline, no such dataset, no such split
        reason = " ".join(str(err).split())[:200]
        raise SourceError(f"cannot load the Hub dataset {part.location!r} ({reason})") from None


def _dataset_records(part: Part, options: SourceOptions, dataset: Any) -> Iterator[tuple[int, Any]]:
    ds = _open_dataset(part, options, dataset)
    columns = _fields(options)
    names = getattr(ds, "column_names", None)
    if names:
        _check_columns(part.label, list(names), options)
    if part.format == "hf-hub" or not hasattr(ds, "__len__"):  # streamed: an IterableDataset
        for row, record in enumerate(ds):
            if row == 0 and not names:
                _check_columns(part.label, list(record), options)
            yield row, {name: record.get(name) for name in columns}
        return
    stop = len(ds) if part.stop is None else part.stop
    view = ds.select_columns(columns)
    if (part.start, stop) != (0, len(ds)):
        view = view.select(range(part.start, stop))
    row = part.start
    for batch in view.iter(batch_size=BATCH_ROWS):
        for i in range(len(batch[columns[0]])):
            yield row, {name: batch[name][i] for name in columns}
            row += 1
