"""RETRODataset: retro-pytorch's item conventions on small memmaps, read-only files, from_database,
and the seed README's dataset example (small dims)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from retlm import RETRO, RETRODataset
from retlm.retrieval.format import FORMAT_VERSION

C, K, SEQ_LEN, NUM_CHUNKS, NUM_SEQS, EOS = 4, 3, 16, 40, 9, 102


def save_memmap(path, array):
    f = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    f[:] = array
    del f


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    chunks = rng.integers(1, 200, size=(NUM_CHUNKS, C + 1)).astype(np.int32)
    chunks[chunks == EOS] = 7
    chunks[[3, 11, 20], [2, 0, 4]] = EOS  # document ends (the last one in the next-token column)
    knn = rng.integers(-1, NUM_CHUNKS, size=(NUM_CHUNKS, K)).astype(np.int32)
    knn[5] = [3, -1, 11]
    seqs = np.array([0, 4, 8, 12, 16, 20, 24, 2, 36], dtype=np.int32)
    paths = {name: tmp_path / f"{name}.dat" for name in ("chunks", "knn", "seqs")}
    for name, array in zip(paths, (chunks, knn, seqs), strict=True):
        save_memmap(paths[name], array)
    return paths, chunks, knn, seqs


def make(paths, **overrides):
    args = dict(
        num_chunks=NUM_CHUNKS,
        chunk_size=C,
        seq_len=SEQ_LEN,
        num_sequences=NUM_SEQS,
        num_neighbors=K,
        chunk_memmap_path=paths["chunks"],
        chunk_nn_memmap_path=paths["knn"],
        seq_memmap_path=paths["seqs"],
    )
    return RETRODataset(**{**args, **overrides})


def load_seed_dataset(monkeypatch):
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None:
        pytest.skip("retro-pytorch is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("retro_pytorch")
    package.__path__ = []
    retrieval = types.ModuleType("retro_pytorch.retrieval")
    retrieval.EOS_ID = EOS
    monkeypatch.setitem(sys.modules, "retro_pytorch", package)
    monkeypatch.setitem(sys.modules, "retro_pytorch.retrieval", retrieval)
    modules = {}
    for name in ("utils", "data"):
        module_spec = importlib.util.spec_from_file_location(f"retro_pytorch.{name}", root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(module_spec)
        monkeypatch.setitem(sys.modules, f"retro_pytorch.{name}", modules[name])
        module_spec.loader.exec_module(modules[name])
    return modules["data"]


def seqs_chunks(i, dataset):
    """The chunk ids of sequence ``i`` of ``dataset`` (within the files)."""
    begin = int(dataset.store.seqs[i])
    return np.arange(begin, begin + SEQ_LEN // C)


def digest(paths):
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in paths.items()}


def test_items_equal_retro_pytorch_and_files_stay_untouched(files, monkeypatch, tmp_path):
    paths, *_ = files
    seed_data = load_seed_dataset(monkeypatch)
    copies = {}
    for name, path in paths.items():  # the seed opens r+ and grows its files: give it copies
        copies[name] = tmp_path / f"seed_{name}.dat"
        shutil.copy(path, copies[name])
    seed = seed_data.RETRODataset(
        num_chunks=NUM_CHUNKS,
        chunk_size=C,
        seq_len=SEQ_LEN,
        num_sequences=NUM_SEQS - 1,  # the last sequence runs past the end, where the seed reads junk
        num_neighbors=K,
        chunk_memmap_path=str(copies["chunks"]),
        chunk_nn_memmap_path=str(copies["knn"]),
        seq_memmap_path=str(copies["seqs"]),
    )
    before = digest(paths)
    ours = make(paths)
    # Where the two rules differ (the neighbor-layout fix, see retlm.retrieval.layout): retro-pytorch
    # drops a continuation when the row holds EOS anywhere, including the extra column, which is the
    # next chunk's first token. Chunk 20 holds EOS only there: its document goes on into chunk 21, so
    # its continuation is chunk 21 (generation's layout too). And the last chunk has no next one:
    # retro-pytorch clips the index and repeats the chunk, here it is padding.
    _, chunks, knn, _ = files
    body_eos = (chunks[:, :C] == EOS).any(axis=1)
    last = np.arange(NUM_CHUNKS) == NUM_CHUNKS - 1
    differs = np.flatnonzero(~body_eos & ((chunks[:, C] == EOS) | last))
    assert 20 in differs and NUM_CHUNKS - 1 in differs
    seen = 0
    for i in range(len(seed)):
        seq, retrieved = ours[i]
        expected_seq, expected_retrieved = seed[i]
        assert seq.shape == (SEQ_LEN + 1,) and retrieved.shape == (SEQ_LEN // C, K, 2 * C)
        assert torch.equal(seq, expected_seq.long())
        ids = torch.from_numpy(knn[seqs_chunks(i, ours)]).long()
        same = ~torch.from_numpy(np.isin(ids.numpy(), differs))
        assert torch.equal(retrieved[same], expected_retrieved[same])
        assert torch.equal(retrieved[..., :C], expected_retrieved[..., :C])  # the neighbors themselves
        for u, j in zip(*np.nonzero(~same.numpy()), strict=True):
            cid = int(ids[u, j])
            seen += 1
            expected = chunks[cid + 1, :C] if cid + 1 < NUM_CHUNKS else np.zeros(C)
            assert torch.equal(retrieved[u, j, C:], torch.from_numpy(expected).long())
            assert (expected_retrieved[u, j, C:] == 0).all() or cid == NUM_CHUNKS - 1
    assert seen  # the fixture exercises the fix
    ours[len(ours) - 1]  # past the end: padded, not an error
    assert digest(paths) == before


def test_conventions(files):
    paths, chunks, knn, seqs = files
    ds = make(paths)
    seq, retrieved = ds[1]  # chunks 4..7: neighbors of chunk 5 are [3, -1, 11]
    row = retrieved[1]
    assert torch.equal(row[0, :C], torch.from_numpy(chunks[3, :C]).long())
    assert (row[0, C:] == 0).all()  # chunk 3 holds EOS: its continuation is dropped
    assert (row[1] == 0).all()  # -1: all pad
    assert torch.equal(row[2, :C], torch.from_numpy(chunks[11, :C]).long())
    assert (row[2, C:] == 0).all()
    seq, _ = ds[0]  # chunks 0..3: EOS at chunk 3 column 2 = position 14
    assert seq[14] == EOS and (seq[15:] == 0).all() and (seq[:14] != 0).all()
    seq, retrieved = ds[2]  # chunks 8..11, no EOS before 11's first token at position 12
    assert seq[12] == EOS and (seq[13:] == 0).all()
    c0 = int(knn[8, 0])
    if c0 >= 0 and not (chunks[c0] == EOS).any():
        assert torch.equal(
            retrieved[0, 0, C:], torch.from_numpy(chunks[min(c0 + 1, NUM_CHUNKS - 1), :C]).long()
        )


def test_bad_files_are_refused(files):
    paths, *_ = files
    with pytest.raises(ValueError, match="fewer than"):
        make(paths, num_chunks=NUM_CHUNKS + 1)
    with pytest.raises(FileNotFoundError):
        make(paths, seq_memmap_path=paths["seqs"].with_name("absent.dat"))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        make(paths, seq_len=SEQ_LEN + 1)


def test_from_database_reads_the_manifest(files, tmp_path):
    paths, *_ = files
    db = tmp_path / "db"
    db.mkdir()
    for name, filename in (("chunks", "chunks.dat"), ("knn", "knn.dat"), ("seqs", "seqs.dat")):
        shutil.copy(paths[name], db / filename)
    manifest = dict(
        format_version=FORMAT_VERSION,
        chunk_size=C,
        num_chunks=NUM_CHUNKS,
        num_neighbors=K,
        num_seqs=NUM_SEQS,
        seq_len=SEQ_LEN,
        pad_id=0,
        eos_id=EOS,
    )
    (db / "manifest.json").write_text(json.dumps(manifest))
    direct = make(paths)
    from_db = RETRODataset.from_database(db)
    assert len(from_db) == NUM_SEQS
    for i in range(NUM_SEQS):
        assert all(torch.equal(a, b) for a, b in zip(from_db[i], direct[i], strict=True))
    fewer = RETRODataset.from_database(types.SimpleNamespace(path=db), num_neighbors=2)
    assert torch.equal(fewer[3][1], direct[3][1][:, :2])
    shorter = RETRODataset.from_database(db, seq_len=8)
    assert shorter[0][0].shape == (9,) and shorter[0][1].shape == (2, K, 2 * C)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        RETRODataset.from_database(db, num_neighbors=4)


def test_seed_readme_dataset_example_small_dims(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    num_chunks, chunk_size, num_seqs, num_neighbors = 200, 8, 20, 2  # README: 1000, 64, 100, 2
    shape = (num_chunks, chunk_size + 1)
    save_memmap("./train.chunks.dat", np.int32(np.random.randint(0, 8192, size=shape)))
    save_memmap(
        "./train.chunks.knn.dat", np.int32(np.random.randint(0, 200, size=(num_chunks, num_neighbors)))
    )
    save_memmap("./train.seq.dat", np.int32(np.random.randint(0, 128, size=(num_seqs,))))
    ds = RETRODataset(
        num_sequences=num_seqs,
        num_chunks=num_chunks,
        num_neighbors=num_neighbors,
        chunk_size=chunk_size,
        seq_len=64,  # README: 2048
        chunk_memmap_path="./train.chunks.dat",
        chunk_nn_memmap_path="./train.chunks.knn.dat",
        seq_memmap_path="./train.seq.dat",
    )
    dl = iter(DataLoader(ds, batch_size=2))
    retro = RETRO(
        max_seq_len=64,
        enc_dim=32,
        enc_depth=3,
        dec_dim=24,
        dec_depth=4,
        dec_cross_attn_layers=(1, 3),
        heads=2,
        dim_head=16,
        dec_attn_dropout=0.25,
        dec_ff_dropout=0.25,
        chunk_size=chunk_size,
        num_tokens=8192,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the README calls .cuda()
    retro = retro.to(device)
    seq, retrieved = map(lambda t: t.to(device), next(dl))
    assert seq.shape == (2, 65) and retrieved.shape == (2, 8, 2, 16)
    loss = retro(seq, retrieved, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
