"""The Ray engine of the database build: on a local 2-CPU Ray cluster it must write the same database as
the single-process build (every file, byte for byte), and a worker killed in the middle of a shard must
be retried and resume that shard, with the same result.

The two cluster tests are marked ``ray`` (``pytest -m ray``, ``make test-ray``: a step of its own in CI,
as they take about 2 minutes); they need ``pip install 'retlm[ray]'`` and are skipped without it.
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from retlm import RetrievalDatabase
from retlm.cli.main import main
from retlm.demo.corpus import pydoc_topics
from retlm.retrieval.embedding import embed_block
from retlm.retrieval.ray_build import MissingExtraError, require_ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'retlm[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_texts(folder: Path, count: int, chars: int) -> Path:
    folder.mkdir()
    for name, text in list(pydoc_topics())[:count]:
        (folder / f"{name}.txt").write_text(text[:chars])
    (folder / "binary.txt").write_bytes(b"\x00\xff not text")  # skipped by both builds, and recorded
    return folder


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.ray
def test_ray_build_equals_the_single_process_build(ray_cluster, tiny_encoder, tmp_path):
    """An IVF fast-scan index (exact_threshold lowered), 3 shards through the CLI; a plain build beside."""
    texts = write_texts(tmp_path / "texts", 30, 1500)
    options = ["--chunk-size", "16", "--seq-len", "64", "--embedder", tiny_encoder, "--batch-size", "32"]
    options += ["--exact-threshold", "100", "--no-progress"]
    with pytest.warns(UserWarning, match="skipped 1 non-UTF-8"):
        assert main(["build-db", str(texts), "--out", str(tmp_path / "local"), *options]) == 0
    with pytest.warns(UserWarning, match="skipped 1 non-UTF-8"):
        code = main(["build-db", str(texts), "--out", str(tmp_path / "ray"), *options, "--engine", "ray"])
    assert code == 0
    local, ray = files_of(tmp_path / "local"), files_of(tmp_path / "ray")
    assert list(ray) == list(local)  # no shards or temporary files left behind
    for name in local:
        assert ray[name] == local[name], name
    db = RetrievalDatabase.open(tmp_path / "ray")
    assert db.manifest["index_type"].startswith("IVF") and db.manifest["num_docs"] == 30
    assert db.manifest["skipped_files"] == [str(texts / "binary.txt")]


@pytest.mark.ray
def test_a_killed_worker_is_retried_and_its_shard_resumes(ray_cluster, tmp_path):
    """SIGKILL the worker embedding shard 1 of 2 (real MiniLM, batches of 1: blocks of ``BLOCK_BATCHES`` =
    16 rows, so the shard of 86 rows has 6) once it has written 16 rows; Ray retries the task, the shard
    continues from its progress marker (its row count never drops back), and the database equals an
    uninterrupted single-process build."""
    texts = write_texts(tmp_path / "texts", 8, 1200)
    options = dict(chunk_size=16, seq_len=64, batch_size=1, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 non-UTF-8"):
        RetrievalDatabase.build(texts, tmp_path / "local", **options)
    # a shard must hold several blocks, or it can finish (and drop its progress marker) right after the kill
    assert embed_block(1) == 16

    out, errors = tmp_path / "ray", []

    def build() -> None:
        try:
            RetrievalDatabase.build(texts, out, engine="ray", num_shards=2, **options)
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    import psutil

    thread = threading.Thread(target=build)
    with pytest.warns(UserWarning, match="skipped 1 non-UTF-8"):
        thread.start()
        marker = out / "shards" / "embeddings-00001-of-00002.dat.progress"
        rows_seen, killed_at, deadline = [], None, time.monotonic() + 240
        while thread.is_alive():
            assert time.monotonic() < deadline, "the Ray build did not finish"
            try:
                rows_seen.append(json.loads(marker.read_text())["rows_done"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            if killed_at is None and rows_seen and rows_seen[-1] >= 16:
                workers = [
                    p.pid
                    for p in psutil.process_iter(["cmdline"])
                    if (p.info["cmdline"] or [""])[0].startswith("ray::embed 1/2")
                ]
                assert len(workers) == 1, workers
                os.kill(workers[0], signal.SIGKILL)
                killed_at = rows_seen[-1]
            time.sleep(0.002)
        thread.join()
    assert not errors, errors
    assert killed_at is not None, "the shard finished before its worker could be killed"
    shard_rows = json.loads((tmp_path / "local" / "manifest.json").read_text())["num_chunks"] // 2
    assert 16 <= killed_at < max(rows_seen), (killed_at, rows_seen[-1], shard_rows)
    assert all(a <= b for a, b in zip(rows_seen[:-1], rows_seen[1:], strict=True)), "restarted from 0"
    local, ray = files_of(tmp_path / "local"), files_of(out)
    assert list(ray) == list(local)
    for name in local:
        assert ray[name] == local[name], name


@pytest.mark.ray
def test_ray_build_of_jsonl_and_parquet_sources_equals_the_single_process_build(
    ray_cluster, tiny_encoder, tmp_path
):
    """A plain JSONL cut into line-aligned byte ranges and a Parquet file cut into row ranges (3 shards),
    one record malformed and skipped: every file equals the single-process build's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": text[:900], "key": name} for name, text in list(pydoc_topics())[:24]]
    lines = [json.dumps(row) for row in rows]
    lines[7] = '{"body": broken'
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet", row_group_size=4)
    options = dict(chunk_size=16, seq_len=64, embedder=tiny_encoder, batch_size=32, progress=False)
    source = dict(text_field="body", id_field="key", skip_bad_records=True)
    for name in ("corpus.jsonl", "corpus.parquet"):
        with pytest.warns(UserWarning, match="skipped 1 bad record") if name.endswith("l") else _no_warning():
            RetrievalDatabase.build(tmp_path / name, tmp_path / f"{name}-local", **options, **source)
            ray = RetrievalDatabase.build(
                tmp_path / name, tmp_path / f"{name}-ray", engine="ray", num_shards=3, **options, **source
            )
        local, built = files_of(tmp_path / f"{name}-local"), files_of(tmp_path / f"{name}-ray")
        assert list(built) == list(local)
        for file in local:
            assert built[file] == local[file], (name, file)
        expected = 23 if name.endswith("l") else 24
        assert ray.num_docs == expected and ray.manifest["sources"][0]["documents"] == expected


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_missing_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'retlm\[ray\]'"):
        require_ray()
    texts = write_texts(tmp_path / "texts", 2, 200)
    assert main(["build-db", str(texts), "--out", str(tmp_path / "db"), "--engine", "ray"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'retlm[ray]'" in err and len(err.strip().splitlines()) == 1


def test_ray_options_need_the_ray_engine(tmp_path):
    texts = write_texts(tmp_path / "texts", 2, 200)
    for extra in (["--address", "auto"], ["--shards", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["build-db", str(texts), "--out", str(tmp_path / "db"), *extra])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["build-db", str(texts), "--out", str(tmp_path / "db"), "--engine", "ray", "--stage", "embed"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="engine must be one of"):
        RetrievalDatabase.build([], tmp_path / "x", engine="spark")
