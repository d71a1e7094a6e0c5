"""Tiny helpers shared across the package."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any


def quoted(text: str, prefix: str = "    | ") -> str:
    """``text`` with ``prefix`` before every line, blank ones included: its newlines and indentation show
    as they are (how the CLI and the demo print retrieved and generated text)."""
    return textwrap.indent(text, prefix, lambda _: True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())  # mkstemp's 0600 would make every artefact private to its writer
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], value: Any, *, sort_keys: bool = True) -> None:
    """``value`` as indented JSON with a final newline, written atomically (:func:`atomic_write`): the
    run directory's and the database's state files, and reports."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def ensure_writable_dir(path: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """Create folder ``path`` and prove it writable with a probe file (root ignores mode bits, so
    ``os.access`` would lie); raise a one-line error naming ``what`` (e.g. "run directory") otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except FileExistsError as err:
        raise NotADirectoryError(f"{what} {path} exists and is not a directory{hint}") from err
    except OSError as err:
        raise PermissionError(f"{what} {path} is not writable: {err.strerror or err}{hint}") from err
    return path


# ---- resources of this machine ----


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def available_memory_bytes() -> int:
    """Memory this process can still get: MemAvailable, capped by a cgroup limit if one is set."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            available = min(available, max(0, int(limit) - usage))
        break
    return available


RETLM_HOME_ENV = "RETLM_HOME"


def retlm_home() -> Path:
    """The folder where retlm caches what it builds once per machine (converted or exported models):
    ``$RETLM_HOME``, default ``~/.cache/retlm``. Created on first use by whoever writes into it."""
    return Path(os.environ.get(RETLM_HOME_ENV) or Path.home() / ".cache" / "retlm").expanduser()


def deprecated_aliases(module: str, renamed: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving each old public name (``renamed``: old -> new) for one release,
    with a ``DeprecationWarning`` naming the new one. A name that moved to another module is written
    with its module: ``"package.module.Name"``."""
    import importlib
    import warnings

    def __getattr__(name: str) -> object:
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, _, new = renamed[name].rpartition(".")
        home = home or module
        warnings.warn(f"{module}.{name} is deprecated; use {home}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), new)

    return __getattr__


def renamed_argument(
    where: str, old: str, new: str, old_value: object, new_value: object, stacklevel: int = 3
) -> object:
    """The value of a keyword argument renamed from ``old`` to ``new`` (kept for one release):
    ``new_value``, or else ``old_value`` with a ``DeprecationWarning``. None means "not passed"."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
    import warnings

    prefix = f"{where}: " if where else "the keyword "
    warnings.warn(f"{prefix}{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=stacklevel)
    return old_value


def deprecated_keyword(kwargs: dict[str, Any], old: str, new: str) -> Any:
    """Pop the renamed keyword argument ``old`` from ``kwargs`` (None when absent), warning that it is
    deprecated in favour of ``new`` (served for one release; :func:`renamed_argument` for a named one)."""
    return renamed_argument("", old, new, kwargs.pop(old, None), None, stacklevel=4)
