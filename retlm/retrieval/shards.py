"""Shards of the build's row-parallel stages (``embed``, ``neighbors``): which rows a shard ``i/n``
covers, where its file lies (``shards/{kind}-i-of-n.dat``) and how the shard files are merged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from retlm.errors import short_repr
from retlm.retrieval._storage import is_complete
from retlm.retrieval.format import SHARDS_DIR


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    try:
        i, n = (
            (int(x) for x in shard.split("/")) if isinstance(shard, str) else (int(shard[0]), int(shard[1]))
        )
    except (ValueError, TypeError, IndexError):
        raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {short_repr(shard)}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard i/n needs 0 <= i < n, got {i}/{n}")
    return i, n


def shard_rows(num_rows: int, shard: tuple[int, int] | None, align: int = 1) -> tuple[int, int]:
    """Rows ``lo:hi`` of shard ``(i, n)``; inner boundaries are multiples of ``align`` (a batch size), so a
    sharded stage runs the same batches as an unsharded one and writes the same bytes."""
    if shard is None:
        return 0, num_rows
    i, n = shard

    def boundary(j: int) -> int:
        return num_rows if j == n else j * num_rows // n // align * align

    return boundary(i), boundary(i + 1)


def shard_file(path: Path, kind: str, shard: tuple[int, int]) -> Path:
    return path / SHARDS_DIR / f"{kind}-{shard[0]:05d}-of-{shard[1]:05d}.dat"


def merge_shards(path: Path, kind: str) -> None:
    """Concatenate complete shard files ``shards/{kind}-i-of-n.dat`` into ``{kind}.dat`` (atomically)."""
    target = path / f"{kind}.dat"
    if is_complete(target):
        return
    files = sorted((path / SHARDS_DIR).glob(f"{kind}-*-of-*.dat"))
    if not files:
        raise RuntimeError(
            f"{path}: no {kind} found: run the '{'embed' if kind == 'embeddings' else 'neighbors'}' "
            "stage (for every shard) first"
        )
    counts = {f.stem.split("-of-")[1] for f in files}
    if len(counts) != 1:
        raise RuntimeError(f"{path / SHARDS_DIR}: {kind} shards of different shard counts: {sorted(counts)}")
    n = int(counts.pop())
    missing = [i for i in range(n) if not is_complete(shard_file(path, kind, (i, n)))]
    if missing:
        raise RuntimeError(f"{path}: {kind} shards {missing} of {n} are not finished")
    tmp = path / f".{kind}.dat.tmp"
    with open(tmp, "wb") as out:
        for i in range(n):
            with open(shard_file(path, kind, (i, n)), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    os.replace(tmp, target)
