"""Where a database's documents come from: the one place that reads a corpus.

A source is one of:

- a folder: its files matching ``glob``, sorted by path. A ``.txt`` (or any other) file is one
  document, named by its path relative to the folder; a ``.jsonl``, ``.parquet`` or ``.csv`` file in it
  holds one document per record. The default glob is ``**/*.txt``, or, in a folder without ``.txt``
  files, its ``.jsonl``/``.parquet``/``.csv`` files (a folder of Parquet or JSONL shards);
- a JSON Lines file (``.jsonl``, ``.ndjson``, ``.json``), plain or compressed (gzip, zstandard, bzip2
  or xz, recognised by their magic bytes), one JSON object per line;
- a Parquet file, read one batch of rows at a time (``pyarrow``'s ``iter_batches``);
- a CSV file with a header row (plain or compressed);
- a Hugging Face dataset: a ``save_to_disk`` folder, a ``datasets.Dataset`` object, or a Hub name
  (``owner/name``, with ``split``; needs ``pip install 'retlm[datasets]'`` and the network);
- in Python, an iterable of strings (``doc-<i>``).

A record's text is its ``text_field`` (default ``text``); its name is its ``id_field`` if given, else
``<file>:<number>``: the line number (from 1) of a JSONL record, the row number (from 0) of a Parquet,
CSV or dataset record. Nothing holds more than one batch of records: a 5 GB JSONL streams line by line.

Errors, each one line: a missing file, an unknown format, a binary file posing as JSONL, a field that no
record has (naming the fields there are) and an empty source stop before any work (``SourceError``,
``EmptySourceError``). A malformed record met while reading stops the build naming its file and line or
row (``BadRecordError``), unless ``skip_bad_records``: then it is counted in the ``SkipReport``.

A source is planned into ``Part``s (a file, or a row or byte range of one) in reading order; a Ray build
reads its shards' parts in its tasks (``retlm.retrieval.ray_build``), the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from retlm.errors import OptionError, short_repr
from retlm.options import option
from retlm.retrieval import source_formats as formats
from retlm.retrieval.chunking import Document, EmptySourceError, SkipReport, is_utf8_text, read_text_blocks
from retlm.retrieval.source_formats import (
    BadRecordError,
    SourceError,
    detect_format,
    is_hub_name,
)

DEFAULT_GLOB = "**/*.txt"
RECORD_GLOBS = ("**/*.jsonl*", "**/*.ndjson*", "**/*.json*", "**/*.parquet", "**/*.csv*")
RECORD_FILES = "**/*.{jsonl,ndjson,json,parquet,csv}[.gz|.zst|...]"  # default_glob's name for record_files

__all__ = [
    "BadRecordError",
    "DEFAULT_GLOB",
    "EmptySourceError",
    "Part",
    "Source",
    "SourceError",
    "SourceOptions",
    "open_source",
]


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source (``retlm build-db`` / ``retlm add`` derive their options of the same names)."""

    glob: str | None = option(
        None,
        help="which files of a SOURCE folder are documents (default: **/*.txt, or, in a folder without "
        ".txt files, its .jsonl, .parquet and .csv files)",
    )
    text_field: str = option("text", help="the field (column) of a record that holds its text")
    id_field: str | None = option(
        None,
        help="the field that names a record (shown beside its neighbors); default: the file name and the "
        "record's line (JSONL) or row number",
    )
    split: str | None = option(
        None, help="the split of a Hugging Face dataset (a Hub dataset: default train)"
    )
    skip_bad_records: bool = option(
        False,
        help="count malformed records (bad JSON, a missing or non-text field) and go on, instead of "
        "stopping at the first one",
    )

    def validate(self) -> None:
        glob = self.glob
        if glob is not None and (
            not isinstance(glob, str) or not glob or Path(glob).is_absolute() or "\x00" in glob
        ):
            raise OptionError(
                f"glob must be a non-empty pattern relative to the source folder, got {short_repr(glob)}"
            )
        for name in ("text_field", "id_field", "split"):
            value = getattr(self, name)
            if (value is not None or name == "text_field") and (not isinstance(value, str) or not value):
                raise OptionError(f"{name} must be a non-empty string, got {short_repr(value)}")


@dataclass(frozen=True)
class Part:
    """One file or dataset of a source, or a range of one: what a reader (or a Ray task) reads.

    ``start``/``stop``: rows (Parquet, datasets) or byte offsets at line starts (plain JSONL);
    ``first``: the line or row number of its first record; ``size``: its weight in bytes, for sharding.
    """

    format: str  # "text", "jsonl", "parquet", "csv", "hf-disk", "hf-hub"
    location: str  # an absolute path, or a Hub dataset name
    label: str  # the documents' name prefix: a path relative to the source folder, or a file name
    size: int = 0
    start: int = 0
    stop: int | None = None
    first: int = 0


class Source:
    """A resolved source: its ``parts`` in reading order and a description for the manifest."""

    def __init__(self, given: Any, options: SourceOptions):
        options.validate()
        self.given, self.options = given, options
        self.strings: Iterable[str] | None = None
        self.dataset: Any = None  # a datasets.Dataset passed in Python
        self.glob: str | None = None
        self.parts: list[Part] = []
        if formats.is_dataset_object(given):
            self.kind, self.dataset = "hf-dataset", formats.select_split(given, options.split, "the dataset")
            rows = len(self.dataset) if hasattr(self.dataset, "__len__") else None
            self.parts = [Part("hf-object", "", "dataset", size=0, stop=rows)]
        elif not isinstance(given, str | os.PathLike):
            self.kind, self.strings = "python", given
        else:
            self._resolve_path(Path(given))

    def _resolve_path(self, path: Path) -> None:
        if path.is_dir():
            if formats.is_saved_dataset(path):
                self.kind = "hf-dataset"
                rows = formats.saved_dataset_rows(path, self.options.split)
                label = path.resolve().name
                self.parts = [Part("hf-disk", str(path.resolve()), label, formats.folder_size(path), 0, rows)]
                return
            self.kind = "folder"
            self.glob = self.options.glob or default_glob(path)
            files = record_files(path) if self.glob == RECORD_FILES else matching_files(path, self.glob)
            self.parts = [_file_part(f, f.relative_to(path).as_posix()) for f in files]
            return
        if path.is_file():
            part = _file_part(path, path.name)
            self.kind = part.format if part.format != "text" else "file"
            self.parts = [part]
            return
        if is_hub_name(str(self.given)):
            self.kind = "hf-hub"
            self.parts = [Part("hf-hub", str(self.given), str(self.given))]
            return
        raise SourceError(f"no such file or folder: {self.given} (nor a Hub dataset name 'owner/name')")

    # ---- reading
    def documents(self, report: SkipReport, first_index: int = 0) -> Iterator[Document]:
        """Every document, in reading order (strings are named ``doc-<first_index + i>``)."""
        if self.strings is not None:
            return (Document(name=f"doc-{first_index + i}", text=t) for i, t in enumerate(self.strings))
        return read_parts(self.parts, self.options, report, dataset=self.dataset)

    def check(self) -> None:
        """Before any work: the first part with content holds text (a text file) or has the text field
        (and the id field); ``EmptySourceError`` if no part has anything to read."""
        if self.strings is not None:
            return
        for part in self.parts:
            if part.format == "text":
                path = Path(part.location)
                if path.stat().st_size and _has_text(path):
                    return
            elif formats.peek(part, self.options, dataset=self.dataset):
                return
        if self.kind == "folder" and all(p.format == "text" for p in self.parts):
            paths = [p.location for p in self.parts]
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            raise EmptySourceError(
                f"no text to index in {self.given}: all {len(paths)} file(s) matching {self.glob!r} are "
                f"empty, binary or not UTF-8, and were skipped: {shown}"
            )
        what = f"its {len(self.parts)} files hold" if len(self.parts) > 1 else "it holds"
        raise EmptySourceError(f"no documents in {self.given}: {what} no record")

    def size_bytes(self) -> list[int]:
        """The text bytes of each part, or lower bounds (for the build's disk and memory estimate)."""
        return [p.size for p in self.parts]

    def describe(self) -> dict[str, Any]:
        """The source's entry in the manifest (counts are added after reading, see ``provenance``)."""
        entry: dict[str, Any] = {"source": self._shown(), "format": self.kind}
        if self.kind == "folder":
            entry["glob"] = self.glob
            entry["files"] = len(self.parts)
            entry["file_formats"] = sorted({_format_name(p) for p in self.parts})
        elif self.parts and self.kind != "python":
            entry["format"] = _format_name(self.parts[0]) if self.kind not in ("hf-dataset",) else self.kind
        if self.kind not in ("python",) and any(p.format != "text" for p in self.parts):
            entry["text_field"] = self.options.text_field
            entry["id_field"] = self.options.id_field
        if self.kind in ("hf-dataset", "hf-hub"):
            entry["split"] = self.options.split or ("train" if self.kind == "hf-hub" else None)
        return entry

    def _shown(self) -> str:
        if self.kind == "python":
            return "Python strings"
        if self.kind == "hf-dataset" and self.dataset is not None:
            return "a datasets.Dataset"
        if self.kind == "hf-hub":
            return str(self.given)
        return str(Path(self.given).resolve())


def open_source(source: Any, options: SourceOptions | None = None) -> Source:
    """``source`` (a path, a Hub name, a ``datasets.Dataset`` or an iterable of strings), resolved."""
    return source if isinstance(source, Source) else Source(source, options or SourceOptions())


def provenance(source: Source | dict[str, Any], report: SkipReport, documents: int) -> dict[str, Any]:
    """The manifest's record of one source (a ``Source`` or its ``describe()``): what it was and what
    was read from it."""
    return {
        **(source.describe() if isinstance(source, Source) else source),
        "documents": int(documents),
        "empty_documents": int(report.empty),
        "bad_records": int(report.bad_records),
        "unreadable_files": len(report.unreadable),
    }


def read_parts(
    parts: Iterable[Part], options: SourceOptions, report: SkipReport, dataset: Any = None
) -> Iterator[Document]:
    """The documents of ``parts``, in order (a text file is skipped into ``report`` if it is binary)."""
    for part in parts:
        if part.format == "text":
            path = Path(part.location)
            if is_utf8_text(path):
                yield Document(name=part.label, path=path)
            else:
                report.unreadable.append(part.location)
            continue
        for number, record in formats.records(part, options, dataset=dataset):
            doc = _record_document(part, number, record, options, report)
            if doc is not None:
                yield doc


def _record_document(
    part: Part, number: int, record: Any, options: SourceOptions, report: SkipReport
) -> Document | None:
    where = formats.where(part, number)
    if isinstance(record, BadRecordError):
        return _bad(str(record), options, report)
    text = record.get(options.text_field, formats.MISSING)
    if text is formats.MISSING:
        return _bad(formats.missing_field(where, options.text_field, list(record)), options, report)
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return _bad(f"{where}: field {options.text_field!r} is {kind}, not text", options, report)
    name = f"{part.label}:{number}"
    if options.id_field is not None:
        value = record.get(options.id_field)
        if value is None or isinstance(value, dict | list):
            shown = "missing" if value is None else type(value).__name__
            return _bad(f"{where}: id field {options.id_field!r} is {shown}", options, report)
        name = str(value)
    return Document(name=name, text=text)


def _bad(message: str, options: SourceOptions, report: SkipReport) -> None:
    if not options.skip_bad_records:
        raise BadRecordError(f"{message}; fix the record, or pass --skip-bad-records to skip such records")
    report.bad_records += 1
    if len(report.bad_examples) < 3:
        report.bad_examples.append(message[:300])
    return None


# ---- folders


def default_glob(root: Path) -> str:
    """``**/*.txt``, unless the folder has no ``.txt`` file but has JSONL, Parquet or CSV files: then
    those (``RECORD_FILES``; not the other files beside them, such as Spark's ``_SUCCESS`` markers)."""
    if next((p for p in root.glob(DEFAULT_GLOB) if p.is_file()), None) is not None:
        return DEFAULT_GLOB
    return RECORD_FILES if record_files(root) else DEFAULT_GLOB


def record_files(root: Path) -> list[Path]:
    """The JSONL, Parquet and CSV files of folder ``root`` (at any depth), sorted by path."""
    found = {p for pattern in RECORD_GLOBS for p in root.glob(pattern) if p.is_file()}
    return sorted(p for p in found if detect_format(p) != "text")


def matching_files(root: Path, glob: str) -> list[Path]:
    """The files of folder ``root`` matching ``glob``, in reading order (sorted by path); raises
    ``EmptySourceError`` if there are none."""
    if not root.is_dir():
        raise EmptySourceError(f"source folder does not exist: {root} (pass a list of strings to index text)")
    try:
        paths = sorted(p for p in Path(root).glob(glob) if p.is_file())
    except (ValueError, NotImplementedError) as err:  # a pattern pathlib refuses
        raise OptionError(f"glob {short_repr(glob)} is not a valid pattern: {err}") from None
    if not paths:
        raise EmptySourceError(f"no file in {root} matches the glob {short_repr(glob)}")
    return paths


def iter_documents(
    source: str | os.PathLike | Iterable[str] | Source,
    glob: str | None = None,
    report: SkipReport | None = None,
    first_index: int = 0,
    options: SourceOptions | None = None,
) -> Iterator[Document]:
    """The documents of ``source`` (see the module docstring); ``EmptySourceError`` before any work if a
    folder has no matching file. Non-UTF-8 or binary text files are skipped into ``report``."""
    report = report if report is not None else SkipReport()
    if options is None:
        options = SourceOptions(glob=glob)
    return open_source(source, options).documents(report, first_index)


def _has_text(path: Path) -> bool:
    """UTF-8, no NUL byte, and at least one non-space character (streams the file)."""
    found = False
    try:
        for block in read_text_blocks(path):
            if "\x00" in block:
                return False
            found = found or bool(block.strip())
    except (UnicodeDecodeError, OSError):
        return False
    return found


def scan_source(root: Path, glob: str | None = None) -> list[Path]:
    """The files of folder ``root`` matching ``glob``, after checking that one of them has something to
    read (see ``Source.check``)."""
    source = Source(Path(root), SourceOptions(glob=glob))
    source.check()
    return [Path(p.location) for p in source.parts]


def empty_error(source: Source, report: SkipReport) -> EmptySourceError:
    """The error of a source that gave no chunk at all (found after reading it)."""
    skipped = report.unreadable
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    parts = [f"{len(skipped)} binary or non-UTF-8 ({shown})"] if skipped else []
    if report.empty:
        parts.append(f"{report.empty} without a single token")
    if report.bad_records:
        parts.append(f"{report.bad_records} bad record(s), e.g. {report.bad_examples[0]}")
    what = f"every file matching {source.glob!r}" if source.kind == "folder" else "every document"
    return EmptySourceError(f"no text to index in {source.given}: {what} was skipped: {'; '.join(parts)}")


# ---- files


def _file_part(path: Path, label: str) -> Part:
    fmt = detect_format(path)
    rows = formats.parquet_rows(path) if fmt == "parquet" else None
    return Part(fmt, str(path.resolve()), label, size=path.stat().st_size, stop=rows)


def _format_name(part: Part) -> str:
    """``jsonl``, ``jsonl.zst``, ``parquet``, ``csv.gz``, ``txt``, ... (what the manifest shows)."""
    if part.format in ("hf-disk", "hf-hub", "hf-object"):
        return "hf-dataset" if part.format != "hf-hub" else "hf-hub"
    if part.format == "text":
        return Path(part.location).suffix.lstrip(".") or "text"
    compression = formats.compression_of(Path(part.location))
    return part.format + (f".{compression}" if compression else "")


def split_part(part: Part, pieces: int) -> list[Part]:
    """``part`` cut into at most ``pieces`` contiguous ranges (row ranges of Parquet files and datasets,
    line-aligned byte ranges of plain JSONL files); other parts stay whole."""
    if pieces <= 1:
        return [part]
    if part.format == "jsonl" and formats.compression_of(Path(part.location)) is None:
        return [
            replace(part, start=a, stop=b, first=line, size=b - a)
            for a, b, line in formats.line_ranges(Path(part.location), pieces)
        ]
    if part.format in ("parquet", "hf-disk") and part.stop:
        rows = part.stop - part.start
        bounds = sorted({part.start + rows * j // pieces for j in range(pieces + 1)})
        return [
            replace(part, start=a, stop=b, first=a, size=part.size * (b - a) // max(rows, 1))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
    return [part]
