"""On-disk helpers: checked memmaps, resumable row-block writers, checksums, atomic json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from retlm.checksums import CorruptFileError, sha256_file
from retlm.utils import write_json

__all__ = [
    "CorruptDatabaseError",
    "sha256_file",
    "file_dtype",
    "open_memmap",
    "read_json",
    "ResumableRows",
]


class CorruptDatabaseError(CorruptFileError):
    """A database file is missing, truncated, or does not match its manifest."""


def file_dtype(dtype: str) -> np.dtype:
    """``dtype`` as the array files store it: little-endian on every machine."""
    return np.dtype(dtype).newbyteorder("<")


def open_memmap(path: Path, dtype: str, shape: tuple[int, ...], mode: str = "r") -> np.ndarray:
    """A read-only view of a raw little-endian array file, after checking its size against ``shape``."""
    path = Path(path)
    if not path.is_file():
        raise CorruptDatabaseError(f"missing database file: {path}")
    expected = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise CorruptDatabaseError(
            f"{path} is truncated or corrupted: {actual} bytes, expected {expected} "
            f"for {np.dtype(dtype).name}{list(shape)}"
        )
    if expected == 0:  # numpy cannot map an empty file
        return np.empty(shape, dtype=file_dtype(dtype))
    return np.memmap(path, dtype=file_dtype(dtype), mode=mode, shape=shape)


MAX_JSON_BYTES = 64 << 20  # manifest.json and the build's state files: far below this


def read_json(path: Path) -> Any:
    """A database's json file (``manifest.json``, ...), refused before parsing above ``MAX_JSON_BYTES``."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_JSON_BYTES:
            raise CorruptDatabaseError(
                f"{path} holds {size} bytes; a database's json file holds at most {MAX_JSON_BYTES}"
            )
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CorruptDatabaseError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptDatabaseError(f"{path} is not valid json: {err}") from None


def is_complete(path: Path) -> bool:
    """A resumable output is complete once its file exists and no progress marker is left beside it."""
    path = Path(path)
    return path.is_file() and not path.with_name(path.name + ".progress").exists()


class ResumableRows:
    """Fill a ``(num_rows, *row_shape)`` array file block by block, surviving a kill.

    Rows go into ``<path>.partial`` (preallocated); after each block the memmap is flushed and
    ``<path>.progress`` (json, written atomically) records how many rows are final. A restart with the same
    ``key`` continues from there; on completion the partial file is renamed onto ``path``. Blocks must be
    computed deterministically from their row range for the result to be byte-identical to an
    uninterrupted run.
    """

    def __init__(self, path: Path, num_rows: int, row_shape: tuple[int, ...], dtype: str, key: dict):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.marker = self.path.with_name(self.path.name + ".progress")
        self.shape = (num_rows, *row_shape)
        self.dtype = file_dtype(dtype)
        self.key = key
        self.rows_done = self._resume_point()

    def _resume_point(self) -> int:
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.partial.is_file() and self.marker.is_file() and self.partial.stat().st_size == expected:
            try:
                state = json.loads(self.marker.read_text())
            except (json.JSONDecodeError, OSError):
                state = {}
            if state.get("key") == self.key:
                return int(state["rows_done"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "wb") as f:
            f.truncate(expected)
        self._save(0)
        return 0

    def _save(self, rows_done: int) -> None:
        write_json(self.marker, {"key": self.key, "rows_done": rows_done})

    def write(self, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` at ``start`` (which must be where the previous block ended) and mark them done."""
        if start != self.rows_done:
            raise RuntimeError(f"rows must be written in order: expected start {self.rows_done}, got {start}")
        if len(rows):
            out = np.memmap(self.partial, dtype=self.dtype, mode="r+", shape=self.shape)
            out[start : start + len(rows)] = rows
            out.flush()
            del out
        self.rows_done = start + len(rows)
        self._save(self.rows_done)

    def finish(self) -> None:
        if self.rows_done != self.shape[0]:
            raise RuntimeError(f"{self.path}: only {self.rows_done} of {self.shape[0]} rows written")
        os.replace(self.partial, self.path)
        self.marker.unlink(missing_ok=True)
