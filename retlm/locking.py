"""One writer at a time: an exclusive lock file per output, held by every process that writes it.

Built on ``filelock`` (``flock(2)``: the kernel drops the lock when its holder dies, even by SIGKILL,
so a crashed writer never leaves a stale lock). The holder writes its PID into the lock file through
the locked descriptor, so a second writer can say who it is waiting for:

    with writer_lock(db / ".lock", what=f"database {db}", wait=True):
        ...   # build or add

``wait=True`` prints one line to stderr (``waiting for PID N ...``) and blocks until the lock is free;
``wait=False`` raises ``LockedError`` ("... is locked by PID N ...") at once. Readers take no lock: a
writer publishes its result by an atomic rename (see ``RetrievalDatabase.add``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


class LockedError(RuntimeError):
    """Another process holds the lock (``wait=False``); the message names its PID."""


class _PidWriter:
    """``on_acquired`` hook: write this process's PID into the locked file; ``clear`` empties it again
    before release, so a finished database holds an empty lock file (byte-identical across runs)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def __call__(self, fd: int) -> None:
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def clear(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            self.fd = None


def holder_pid(lock_file: str | os.PathLike) -> int | None:
    """The PID the current (or last) holder wrote into ``lock_file``, or None."""
    try:
        text = Path(lock_file).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def writer_lock(
    lock_file: str | os.PathLike,
    *,
    what: str,
    wait: bool = True,
    say: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock ``lock_file`` for the body (see the module docstring).

    ``what`` names the locked thing in messages ("database db/"); ``say`` prints the waiting message
    (default: one line on stderr).
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    pid_writer = _PidWriter()
    lock = FileLock(
        lock_file, is_singleton=False, thread_local=False, on_acquired=pid_writer, preserve_lock_file=True
    )
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = holder_pid(lock_file)
        holder = f"PID {pid}" if pid is not None else "another process"
        if not wait:
            raise LockedError(
                f"{what} is locked by {holder} (another build or add is writing it; "
                f"wait for it, or run again without --no-wait): {lock_file}"
            ) from None
        (say or _stderr)(f"{what} is locked by {holder}; waiting for it to finish ...")
        lock.acquire()
    try:
        yield
    finally:
        pid_writer.clear()
        lock.release()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
