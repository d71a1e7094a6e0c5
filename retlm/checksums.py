"""Checksums and structural checks for files retlm writes and reads back (databases and model folders).

What each check costs, and when it runs:

- ``sha256_file``: the full digest, one streamed read of the file (``db-info --verify``; small files on
  every read; ``model.safetensors`` on every load).
- ``sample_digest``: a digest of the file's size and of ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BLOCK``
  bytes at fixed, evenly spaced offsets (the first and the last block included); a file of at most
  ``SAMPLE_BLOCKS * SAMPLE_BLOCK`` bytes is hashed whole. Costs a few hundred KiB of reads whatever the
  size of the file: the check on every open of a database's array files (``bench/integrity.py``).
- ``sha256_handle``: the same through an open file (the faiss index: hashed through the descriptor the
  database keeps, and compared before faiss parses the same file, so a corrupted size field can no
  longer make faiss allocate or crash before the mismatch is seen).
- ``check_safetensors``: the header of a safetensors file is valid json and every tensor lies inside the
  file with the size its dtype and shape need (a truncated file is named, not a loader's message).
- ``write_folder_checksums`` / ``verify_folder``: ``retlm_checksums.json`` beside a model's files holds
  their sha256, written at save time and compared at load time.

These catch corruption (a flipped bit, a truncated copy, a half-written file), not malice: a digest
stored next to the data can be rewritten by whoever rewrites the data (see docs/security.md).

Every failure is a ``CorruptFileError`` (a ``ValueError``) whose message starts with the file's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_BLOCK = 4096
SAMPLE_BLOCKS = 64
READ_BLOCK = 1 << 24
CHECKSUM_FILE = "retlm_checksums.json"
SEAL_KEY = "manifest_sha256"
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on the header

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


class CorruptFileError(ValueError):
    """A file is missing, truncated, or does not match the checksum recorded for it."""


def sha256_file(path: str | os.PathLike, block: int = READ_BLOCK) -> str:
    """The sha256 hex digest of a whole file, read in ``block``-byte pieces."""
    with open(path, "rb") as f:
        return sha256_handle(f, block)


def sample_offsets(size: int, blocks: int | None = None, block: int | None = None) -> list[int]:
    """Start offsets of the sampled blocks of a file of ``size`` bytes: [0] if it is hashed whole."""
    blocks, block = blocks or SAMPLE_BLOCKS, block or SAMPLE_BLOCK
    if size <= blocks * block:
        return [0]
    last = size - block
    return sorted({int(round(i * last / (blocks - 1))) for i in range(blocks)})


def sample_digest(path: str | os.PathLike, blocks: int | None = None, block: int | None = None) -> str:
    """sha256 over the file's size and its sampled blocks (see the module docstring)."""
    blocks, block = blocks or SAMPLE_BLOCKS, block or SAMPLE_BLOCK
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}:{blocks}:{block}:".encode())
    with open(path, "rb") as f:
        if size <= blocks * block:
            digest.update(f.read())
        else:
            fd = f.fileno()
            for offset in sample_offsets(size, blocks, block):
                digest.update(os.pread(fd, block, offset))
    return digest.hexdigest()


def sha256_handle(handle: Any, block: int = READ_BLOCK) -> str:
    """The sha256 hex digest of an open binary file, from its start, through one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    handle.seek(0)
    while n := handle.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def inside(folder: str | os.PathLike, relative: Any, what: str = "path") -> Path:
    """``folder / relative`` after checking that ``relative`` is a relative path that stays inside
    ``folder`` (no absolute path, no ``..``, no symlink out of it)."""
    folder = Path(folder)
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise CorruptFileError(f"{what} must be a non-empty relative path string, got {relative!r}")
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise CorruptFileError(f"{what} {relative!r} leaves the folder {folder}")
    target = folder / relative
    root = folder.resolve()
    resolved = target.resolve()
    if resolved != root and root not in resolved.parents:
        raise CorruptFileError(f"{what} {relative!r} leaves the folder {folder} (it resolves to {resolved})")
    return target


# ---- a digest of a json document inside itself: catches a corrupted manifest field ----


def _canonical(document: dict[str, Any]) -> bytes:
    body = {key: value for key, value in document.items() if key != SEAL_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with ``SEAL_KEY``: the sha256 of its canonical json (every other key)."""
    return {**document, SEAL_KEY: hashlib.sha256(_canonical(document)).hexdigest()}


def check_seal(document: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a document whose content no longer matches its seal. An unsealed one passes."""
    stored = document.get(SEAL_KEY)
    if stored is None:
        return
    if stored != hashlib.sha256(_canonical(document)).hexdigest():
        raise CorruptFileError(
            f"{path} does not match its own checksum ({SEAL_KEY}): a field was corrupted or edited"
        )


# ---- model folders ----


def write_folder_checksums(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, str]:
    """Record the sha256 of ``names`` (default: every file of ``folder``) in ``folder/CHECKSUM_FILE``."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUM_FILE)
    sums = {name: sha256_file(folder / name) for name in names if (folder / name).is_file()}
    tmp = folder / f".{CHECKSUM_FILE}.tmp"
    tmp.write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / CHECKSUM_FILE)
    return sums


def read_folder_checksums(folder: str | os.PathLike) -> dict[str, str] | None:
    """The recorded checksums of a folder, or None if it has no ``CHECKSUM_FILE``."""
    file = Path(folder) / CHECKSUM_FILE
    if not file.is_file():
        return None
    try:
        sums = json.loads(file.read_text())["sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{file} is not a valid checksum file ({type(err).__name__}: {err})") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CorruptFileError(f"{file} is not a valid checksum file (expected name -> sha256 strings)")
    return sums


def verify_folder(folder: str | os.PathLike, names: Iterable[str] | None = None) -> bool:
    """Compare ``names`` (default: all recorded) with the checksums in ``CHECKSUM_FILE``.

    Returns False when the folder records no checksums (nothing to compare), True when every named file
    that has a recorded checksum matches it; raises ``CorruptFileError`` naming the first that does not,
    or a recorded file that is missing.
    """
    folder = Path(folder)
    sums = read_folder_checksums(folder)
    if sums is None:
        return False
    for name in sums if names is None else names:
        if name not in sums:
            continue
        file = inside(folder, name, f"{folder / CHECKSUM_FILE}: file name")
        if not file.is_file():
            raise CorruptFileError(f"{file} is missing (recorded in {CHECKSUM_FILE})")
        if sha256_file(file) != sums[name]:
            raise CorruptFileError(
                f"{file} does not match the sha256 recorded in {CHECKSUM_FILE} when it was saved "
                "(corrupted or modified; if you changed it on purpose, delete "
                f"{folder / CHECKSUM_FILE})"
            )
    return True


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse a safetensors file whose header is invalid or whose tensors do not fit its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path} is truncated: {size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CorruptFileError(
                f"{path} is truncated or corrupted: its header claims {length} bytes, the file has {size}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{path} is corrupted: its safetensors header is not valid json ({err})"
        ) from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} is corrupted: its safetensors header is not a json object")
    data = size - 8 - length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            count = int(np.prod([int(d) for d in info["shape"]], dtype=np.int64))
            itemsize = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path} is corrupted: bad header entry for tensor {name!r}") from None
        if not 0 <= begin <= stop or stop - begin != count * itemsize:
            raise CorruptFileError(
                f"{path} is corrupted: tensor {name!r} has offsets {begin}..{stop} "
                f"for {count} x {itemsize} bytes"
            )
        end = max(end, stop)
    if end != data:
        raise CorruptFileError(
            f"{path} is truncated or corrupted: its tensors need {end} data bytes, the file holds {data}"
        )
