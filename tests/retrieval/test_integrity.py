"""Never silently wrong after corruption (issue 14, defect 1): every check that fails names the file.

- index.faiss: its sha256 is compared on every open, and while it is read, before faiss parses it;
- array files: size and a sampled digest on every open, every byte with ``verify=True`` / ``--verify``;
- manifest.json: sealed with its own digest; every field type- and range-checked; paths stay inside;
- model folders: the sha256 of every file recorded at save time and compared at load time; the
  safetensors header checked against the file's size; a bad config.json named.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from robust_helpers import cli, copy_tree, flip

import retlm.checksums as checksums_module
from retlm import RetrievalDatabase
from retlm.checksums import CorruptFileError, check_safetensors, sample_digest, sample_offsets
from retlm.models.auto import load_model
from retlm.retrieval._storage import CorruptDatabaseError

ARRAYS = ("chunks.dat", "doc_ids.dat", "seqs.dat", "embeddings.dat", "knn.dat")


def test_flipped_index_bytes_fail_search_and_db_info_naming_the_file(robust, tmp_path):
    """The issue's probe: 64 flipped bytes in the middle of index.faiss gave rc 0 and scores of 6.8."""
    db = copy_tree(robust.db, tmp_path / "db")
    clean = cli("search", db, "the assert statement", "-k", "2", "--json")
    hits = json.loads(clean.out)[0]["neighbors"]
    assert clean.code == 0 and all(-1.0 <= hit["score"] <= 1.0 for hit in hits)
    flip(db / "index.faiss", count=64)
    for args in (("search", db, "the assert statement", "-k", "2"), ("db-info", db)):
        result = cli(*args)
        assert result.code == 1, result.out
        assert "index.faiss does not match" in result.err and len(result.err_lines) == 1
    with pytest.raises(CorruptDatabaseError, match="index.faiss"):
        RetrievalDatabase.open(db, verify=False)


def test_an_index_read_later_is_checked_when_it_is_read(robust, tmp_path):
    """open(read_index=False) leaves the index to its first use, which checks it before faiss parses it."""
    db = RetrievalDatabase.open(copy_tree(robust.db, tmp_path / "db"), verify=False, read_index=False)
    flip(db.file("index.faiss"), count=64)  # in place: the handle open() keeps reads the new bytes
    with pytest.raises(CorruptDatabaseError, match="index.faiss does not match"):
        db.search(["the assert statement"], k=1)


@pytest.mark.parametrize("name", ARRAYS)
def test_any_flipped_byte_of_a_small_array_file_is_caught_on_open(robust, tmp_path, name):
    db = copy_tree(robust.db, tmp_path / "db")
    size = (db / name).stat().st_size
    for offset in (0, size // 3, size - 1):
        flip(db / name, offset)
        with pytest.raises(CorruptDatabaseError, match=f"{name} does not match the sampled checksum"):
            RetrievalDatabase.open(db, verify=False)
        flip(db / name, offset)  # back
    RetrievalDatabase.open(db, verify=True)


def test_truncated_array_file_is_named(robust, tmp_path):
    db = copy_tree(robust.db, tmp_path / "db")
    (db / "knn.dat").write_bytes((db / "knn.dat").read_bytes()[:-4])
    result = cli("db-info", db)
    assert result.code == 1 and "knn.dat is truncated or corrupted" in result.err


def test_sampled_digest_covers_fixed_blocks_and_verify_covers_every_byte(robust, tmp_path, monkeypatch):
    """At scale the cheap check reads 64 blocks of 4 KiB; a flip between them is left to --verify."""
    path = tmp_path / "big.dat"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes())
    clean = sample_digest(path)
    offsets = sample_offsets(1 << 20)
    assert len(offsets) == 64 and offsets[0] == 0 and offsets[-1] == (1 << 20) - 4096
    flip(path, offsets[10] + 7)
    assert sample_digest(path) != clean
    flip(path, offsets[10] + 7)
    flip(path, offsets[10] + 4096 + 100)  # between two sampled blocks
    assert sample_digest(path) == clean

    # the same through a database: with 2 blocks of 64 bytes sampled, a middle byte is only seen by verify
    monkeypatch.setattr(checksums_module, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(checksums_module, "SAMPLE_BLOCK", 64)
    from robust_helpers import build_db

    db = build_db(robust.corpus, tmp_path / "db", robust.embedder).path
    flip(db / "embeddings.dat")
    RetrievalDatabase.open(db, verify=False)
    result = cli("db-info", db, "--verify")
    assert result.code == 1 and "embeddings.dat does not match the checksum" in result.err


def test_manifest_is_sealed_and_its_fields_checked(robust, tmp_path):
    db = copy_tree(robust.db, tmp_path / "db")
    original = json.loads((db / "manifest.json").read_text())

    def write(manifest, reseal):
        if reseal:
            manifest = checksums_module.seal(manifest)
        (db / "manifest.json").write_text(json.dumps(manifest))

    write({**original, "nprobe": 3}, reseal=False)  # a changed field, seal not updated: corruption
    with pytest.raises(CorruptDatabaseError, match="manifest.json does not match its own checksum"):
        RetrievalDatabase.open(db)
    bad_fields = [
        ({"chunk_size": "16"}, "chunk_size"),
        ({"num_chunks": -1}, "num_chunks"),
        ({"num_neighbors": 10**30}, "num_neighbors"),
        ({"pooling": "max"}, "pooling"),
        ({"files": {"chunks.dat": "../../etc/passwd"}}, "leaves the folder"),
        ({"files": {"knn.dat": "/etc/passwd"}}, "leaves the folder"),
        ({"tokenizer": {**original["tokenizer"], "path": "../x"}}, "leaves the folder"),
        ({"seq_len": 65}, "multiple of chunk_size"),
        ({"pad_id": 10**6}, "outside the vocabulary"),
        ({"checksums": {**original["checksums"], "knn.dat": "xyz"}}, "sha256 hex digest"),
    ]
    for change, message in bad_fields:
        write({**original, **change}, reseal=True)  # a deliberately edited manifest: fields are checked
        with pytest.raises(CorruptDatabaseError, match=message) as info:
            RetrievalDatabase.open(db)
        assert "manifest.json" in str(info.value)
    write(original, reseal=False)
    RetrievalDatabase.open(db)


def test_tokenizer_files_are_checked_before_loading(robust, tmp_path):
    db = copy_tree(robust.db, tmp_path / "db")
    vocab = db / "tokenizer" / "tokenizer.json"
    text = vocab.read_text()
    vocab.write_text(text.replace('"assert"', '"assery"', 1))
    with pytest.raises(CorruptDatabaseError, match="tokenizer.json does not match"):
        RetrievalDatabase.open(db, verify=False).search(["the assert statement"], k=1)


# ---- model folders ----


def test_model_checksums_are_recorded_at_save_and_verified_on_load(robust, tmp_path):
    model = copy_tree(robust.model, tmp_path / "model")
    sums = json.loads((model / "retlm_checksums.json").read_text())["sha256"]
    assert {"model.safetensors", "config.json"} <= set(sums)
    load_model(model)
    flip(model / "model.safetensors", offset=(model / "model.safetensors").stat().st_size - 100)
    with pytest.raises(CorruptFileError, match="model.safetensors does not match the sha256"):
        load_model(model)
    result = cli("generate", model, "The assert statement", "--db", robust.db, "--max-new-tokens", "4")
    assert result.code == 1 and "model.safetensors does not match" in result.err
    assert len(result.err_lines) == 1


def test_truncated_safetensors_is_named_even_without_checksums(robust, tmp_path):
    model = copy_tree(robust.model, tmp_path / "model")
    (model / "retlm_checksums.json").unlink()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match=r"model.safetensors is truncated or corrupted"):
        load_model(model)
    with pytest.raises(CorruptFileError, match="shorter than a safetensors header"):
        (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
        check_safetensors(tmp_path / "x.safetensors")


def test_wrong_type_in_config_json_names_the_file(robust, tmp_path):
    model = copy_tree(robust.model, tmp_path / "model")
    (model / "retlm_checksums.json").unlink()  # as if edited by hand
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dec_dim": "wide"}))
    with pytest.raises(ValueError, match=r"config.json is not a valid RETRO config.*dec_dim must be int"):
        load_model(model)
    (model / "config.json").write_text("{ not json")
    result = cli("generate", model, "The assert statement", "--db", robust.db)
    assert result.code == 1 and "config.json" in result.err and "Traceback" not in result.err


@pytest.mark.heavy
def test_resuming_from_a_corrupted_checkpoint_is_refused(robust, tmp_path):
    from robust_helpers import TINY_MODEL

    from retlm.training import train

    run = tmp_path / "run"
    train(robust.db, dict(TINY_MODEL), run, max_steps=1, batch_size=2, save_every=1, progress=False)
    checkpoint = run / "checkpoint-1"
    assert (checkpoint / "retlm_checksums.json").is_file()
    flip(checkpoint / "optimizer.pt", offset=(checkpoint / "optimizer.pt").stat().st_size - 50)
    with pytest.raises(CorruptFileError, match="optimizer.pt does not match"):
        train(robust.db, dict(TINY_MODEL), run, max_steps=2, batch_size=2, save_every=1, progress=False)


def test_files_are_created_with_the_umask(robust, tmp_path):
    """Atomic writes used mkstemp's 0600, so a second user could not read a shared database."""
    from retlm.utils import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o002)
        atomic_write(tmp_path / "b.json", lambda tmp: tmp.write_text("{}"))
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    for name in ("manifest.json", "chunks.dat", "index.faiss"):
        assert (robust.db / name).stat().st_mode & 0o044 == 0o044, name  # group and others can read
    assert (robust.model / "retlm_checksums.json").stat().st_mode & 0o044 == 0o044


def test_the_old_names_warn_and_give_the_moved_objects():
    """``retlm.integrity`` became ``retlm.checksums`` and the format's names moved to
    ``retlm.retrieval.format`` (issue #20): the old spellings still work for one release, with a warning."""
    import importlib
    import sys

    from retlm.retrieval import format, integrity, manifest, sparse

    sys.modules.pop("retlm.integrity", None)
    with pytest.warns(DeprecationWarning, match="use retlm.checksums"):
        old = importlib.import_module("retlm.integrity")
    assert old is checksums_module
    for module, name in ((integrity, "check_manifest"), (manifest, "DATA_FILES"), (sparse, "RETRIEVERS")):
        with pytest.warns(DeprecationWarning, match=f"use retlm.retrieval.format.{name}"):
            assert getattr(module, name) is getattr(format, name)
    with pytest.raises(AttributeError):
        sparse.no_such_name  # noqa: B018
