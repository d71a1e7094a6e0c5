"""Corpora as users keep them (issue #21): JSONL (plain, gzip, zstandard), Parquet, CSV and a local
Hugging Face dataset give the same documents as a folder of the same texts, and identical chunks;
malformed records, a missing field, an empty source and a binary file posing as JSONL stop with one line
naming the place; `retlm add` from a JSONL equals Python's ``add()``; db-info and the manifest say where
the documents came from.

The text field is ``content`` and the id field ``name`` throughout (not the defaults), and the names are
the folder build's file names, so even ``doc_names.jsonl`` must match byte for byte.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from training_helpers import python_doc_texts

from retlm import RetrievalDatabase
from retlm.cli.main import main
from retlm.retrieval.chunking import EmptySourceError, SkipReport
from retlm.retrieval.sources import (
    BadRecordError,
    SourceError,
    SourceOptions,
    open_source,
    read_parts,
    split_part,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHUNK_FILES = ("chunks.dat", "doc_ids.dat", "seqs.dat", "doc_names.jsonl")
OPTIONS = SourceOptions(text_field="content", id_field="name")


def corpus_texts() -> list[tuple[str, str]]:
    """(file name, text): real prose, plus text with quotes, commas, newlines and non-ASCII characters
    (what CSV quoting and JSON escaping must carry through unchanged)."""
    texts = python_doc_texts(n_docs=10, max_chars=700)
    texts += [
        'He said "yes", then left;\nline two, with a comma\r\nand CRLF.',
        "naïve café — ünïcödé 東京 ✓ " * 9,
    ]
    return [(f"doc-{i:02d}.txt", text) for i, text in enumerate(texts)]


def write_jsonl(path: Path, rows: list[dict], opener=open) -> Path:
    with opener(path, "wb") as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same documents as a folder and in every record format."""
    root = tmp_path_factory.mktemp("sources")
    docs = corpus_texts()
    rows = [{"name": name, "content": text, "extra": len(text)} for name, text in docs]
    folder = root / "folder"
    folder.mkdir()
    for name, text in docs:
        (folder / name).write_bytes(text.encode("utf-8"))
    out = {"folder": folder}
    out["jsonl"] = write_jsonl(root / "corpus.jsonl", rows)
    out["jsonl.gz"] = write_jsonl(root / "corpus.jsonl.gz", rows, gzip.open)
    import zstandard

    raw = (root / "corpus.jsonl").read_bytes()
    compressor = zstandard.ZstdCompressor()
    half = len(raw) // 2 + raw[len(raw) // 2 :].index(b"\n") + 1  # two frames, as pzstd writes them
    (root / "corpus.jsonl.zst").write_bytes(compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    out["jsonl.zst"] = root / "corpus.jsonl.zst"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, root / "corpus.parquet", row_group_size=5)  # several row groups
    out["parquet"] = root / "corpus.parquet"
    shards = root / "parquet-shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 7), shards / "part-0.parquet")
    pq.write_table(table.slice(7), shards / "part-1.parquet")
    (shards / "_SUCCESS").write_bytes(b"")  # what Spark writes beside its shards: not documents
    (shards / ".part-0.parquet.crc").write_bytes(b"\x00\x01crc")
    out["parquet folder"] = shards
    with open(root / "corpus.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "content", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    out["csv"] = root / "corpus.csv"
    try:  # the datasets extra (pip install 'retlm[datasets]')
        import datasets
    except ImportError:
        return out
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "hf"))
    out["hf dataset"] = root / "hf"
    return out


def chunk_build(source, out: Path, embedder: str, **options) -> dict[str, bytes]:
    """Run the chunk stage (reading + tokenizing + chunking); the chunk files' bytes."""
    RetrievalDatabase.build(
        source,
        out,
        stage="chunk",
        chunk_size=16,
        seq_len=64,
        embedder=embedder,
        progress=False,
        **options,
    )
    return {name: (out / name).read_bytes() for name in CHUNK_FILES}


@pytest.fixture(scope="module")
def folder_chunks(sources, tiny_encoder, tmp_path_factory) -> dict[str, bytes]:
    return chunk_build(sources["folder"], tmp_path_factory.mktemp("ref") / "db", tiny_encoder)


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "parquet folder", "csv", "hf dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.heavy
def test_every_format_gives_the_folder_builds_documents_and_chunks(
    fmt, sources, folder_chunks, tiny_encoder, tmp_path
):
    if fmt not in sources:
        pytest.skip("needs the datasets extra: pip install 'retlm[datasets]'")
    got = chunk_build(sources[fmt], tmp_path / "db", tiny_encoder, text_field="content", id_field="name")
    names = [json.loads(line) for line in got["doc_names.jsonl"].decode().splitlines()]
    assert names == [name for name, _ in corpus_texts()]
    for name in ("chunks.dat", "doc_ids.dat", "seqs.dat"):
        ours = np.frombuffer(got[name], dtype="<i4")
        reference = np.frombuffer(folder_chunks[name], dtype="<i4")
        assert len(reference) > 0
        np.testing.assert_array_equal(ours, reference, err_msg=f"{fmt}: {name}")
    assert got["doc_names.jsonl"] == folder_chunks["doc_names.jsonl"]
    info = json.loads((tmp_path / "db" / "chunking.json").read_text())
    (entry,) = info["sources"]
    assert entry["documents"] == len(corpus_texts()) and entry["text_field"] == "content"
    assert entry["bad_records"] == 0 and entry["id_field"] == "name"


def test_default_names_are_file_and_line_or_row(sources):
    report = SkipReport()
    jsonl = [
        d.name for d in open_source(sources["jsonl"], SourceOptions(text_field="content")).documents(report)
    ]
    assert jsonl[:3] == ["corpus.jsonl:1", "corpus.jsonl:2", "corpus.jsonl:3"]  # lines count from 1
    parquet = open_source(sources["parquet folder"], SourceOptions(text_field="content")).documents(report)
    assert [d.name for d in parquet][6:9] == ["part-0.parquet:6", "part-1.parquet:0", "part-1.parquet:1"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf dataset"])
def test_row_and_byte_ranges_read_the_same_documents_as_the_whole(fmt, sources):
    """The Ray engine's shards: a file cut into ranges gives the same documents, in order."""
    if fmt not in sources:
        pytest.skip("needs the datasets extra: pip install 'retlm[datasets]'")
    source = open_source(sources[fmt], OPTIONS)
    (part,) = source.parts
    pieces = split_part(part, 4)
    assert len(pieces) == 4
    whole = [(d.name, d.text) for d in read_parts([part], OPTIONS, SkipReport())]
    cut = [(d.name, d.text) for d in read_parts(pieces, OPTIONS, SkipReport())]
    assert cut == whole and len(whole) == len(corpus_texts())
    no_ids = SourceOptions(text_field="content")
    assert [d.name for d in read_parts(pieces, no_ids, SkipReport())] == [
        d.name for d in read_parts([part], no_ids, SkipReport())
    ]


# ---- bad input


def rows_with(*bad_lines: bytes) -> bytes:
    good = [json.dumps({"content": f"document number {i} has some words"}).encode() for i in range(4)]
    return b"\n".join(good[:2] + list(bad_lines) + good[2:]) + b"\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"content": "unterminated', "data.jsonl line 3 is not valid JSON"),
        (b'["a", "list"]', "data.jsonl line 3 is a JSON list, not an object"),
        (b'{"body": "x", "id": 1}', "data.jsonl line 3 has no field 'content'; its fields are: body, id"),
        (b'{"content": null}', "data.jsonl line 3: field 'content' is null, not text"),
        (b'{"content": 17}', "data.jsonl line 3: field 'content' is int, not text"),
    ],
)
def test_a_malformed_record_stops_naming_its_line_or_is_counted(line, message, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(rows_with(line))
    options = SourceOptions(text_field="content")
    with pytest.raises(BadRecordError, match="--skip-bad-records") as err:
        list(open_source(path, options).documents(SkipReport()))
    assert message in str(err.value) and "\n" not in str(err.value)
    report = SkipReport()
    docs = list(
        open_source(path, SourceOptions(text_field="content", skip_bad_records=True)).documents(report)
    )
    assert [d.name for d in docs] == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:4", "data.jsonl:5"]
    assert report.bad_records == 1 and message in report.bad_examples[0]


def test_a_field_no_record_has_names_the_fields_there_are(sources, tmp_path):
    for fmt, what in (
        ("jsonl", "corpus.jsonl line 1 has no field"),
        ("parquet", "no column"),
        ("csv", "no column"),
    ):
        source = open_source(sources[fmt], SourceOptions(text_field="body"))
        with pytest.raises(SourceError, match=what) as err:
            source.check()  # before any work, even with --skip-bad-records
        assert "name, content, extra" in str(err.value), fmt
    if "hf dataset" in sources:
        with pytest.raises(SourceError, match="has no column 'body'; its fields are: name, content, extra"):
            open_source(sources["hf dataset"], SourceOptions(text_field="body")).check()
    with pytest.raises(SourceError, match="column 'extra' holds int64, not text"):
        list(open_source(sources["parquet"], SourceOptions(text_field="extra")).documents(SkipReport()))


def test_a_ragged_csv_row_is_a_bad_record(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,id\n"first, quoted\nover two lines",a\nsecond,b,EXTRA\nthird,c\n', encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"data.csv row 1 \(line 4\): 3 fields where the header has 2"):
        list(open_source(path, SourceOptions()).documents(SkipReport()))
    report = SkipReport()
    docs = list(open_source(path, SourceOptions(id_field="id", skip_bad_records=True)).documents(report))
    assert [(d.name, d.text) for d in docs] == [("a", "first, quoted\nover two lines"), ("c", "third")]
    assert report.bad_records == 1


def test_empty_sources_are_refused_before_any_work(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    (tmp_path / "header.csv").write_text("text,id\n")
    for name in ("empty.jsonl", "blank.jsonl", "none.parquet", "header.csv"):
        with pytest.raises(EmptySourceError, match="no record"):
            open_source(tmp_path / name).check()
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(EmptySourceError, match="matches the glob"):
        open_source(empty)


def test_binary_posing_as_jsonl_and_other_impostors(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + rng.bytes(5000))
    with pytest.raises(
        SourceError, match=r"binary.jsonl is not JSON Lines: binary data .*a NUL byte at offset 8"
    ):
        open_source(tmp_path / "binary.jsonl").check()
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(SourceError, match="a byte that is not UTF-8 at offset 13"):
        open_source(tmp_path / "latin1.jsonl").check()
    (tmp_path / "array.json").write_text('[{"text": "a"}, {"text": "b"}]')
    with pytest.raises(SourceError, match="holds a JSON array, not JSON Lines"):
        open_source(tmp_path / "array.json").check()
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(SourceError, match="fake.parquet is not a Parquet file"):
        open_source(tmp_path / "fake.parquet")
    # compression is recognised by its magic bytes, not the file name
    (tmp_path / "plain-name.jsonl").write_bytes(gzip.compress(b'{"text": "gzip inside"}\n'))
    docs = list(open_source(tmp_path / "plain-name.jsonl").documents(SkipReport()))
    assert [d.text for d in docs] == ["gzip inside"]
    # a byte-order mark (as some Windows tools write) is not part of the first record or column name
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [d.text for d in open_source(tmp_path / "bom.jsonl").documents(SkipReport())] == [
        "first",
        "second",
    ]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,id\nhello,1\n")
    assert [d.text for d in open_source(tmp_path / "bom.csv").documents(SkipReport())] == ["hello"]
    with pytest.raises(SourceError, match="no such file or folder: .*missing.jsonl"):
        open_source(tmp_path / "missing.jsonl")


def test_a_missing_datasets_extra_is_named(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    for name in ("state.json", "dataset_info.json"):  # what save_to_disk writes beside the Arrow files
        (tmp_path / "saved" / name).write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(SourceError, match=r"needs the datasets package: pip install 'retlm\[datasets\]'"):
        open_source(tmp_path / "saved")


def test_a_dataset_dict_needs_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {name: datasets.Dataset.from_list([{"text": f"{name} text"}]) for name in ("train", "test")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match="has the splits test, train; choose one with --split"):
        open_source(tmp_path / "dd")
    docs = list(open_source(tmp_path / "dd", SourceOptions(split="test")).documents(SkipReport()))
    assert [(d.name, d.text) for d in docs] == [("dd:0", "test text")]
    objects = list(open_source(splits["train"]).documents(SkipReport()))  # a Dataset object, in Python
    assert [d.text for d in objects] == ["train text"]


# ---- the command line: build, add, db-info


def cli(*args) -> int:
    """``retlm ARGS`` in this process: its exit code (usage errors exit through argparse)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exit_info:
        return int(exit_info.code)


def cli_build(source, out, embedder, *extra) -> int:
    options = ["--chunk-size", "16", "--seq-len", "64", "--embedder", embedder, "--no-progress"]
    return cli("build-db", source, "--out", out, *options, *extra)


def test_cli_builds_from_jsonl_and_db_info_tells_where_the_documents_came_from(
    sources, tiny_encoder, tmp_path, capsys
):
    assert cli_build(sources["jsonl.zst"], tmp_path / "db", tiny_encoder, "--text-field", "content") == 0
    db = RetrievalDatabase.open(tmp_path / "db")
    (entry,) = db.manifest["sources"]
    assert entry == {
        "source": str(sources["jsonl.zst"].resolve()),
        "format": "jsonl.zst",
        "text_field": "content",
        "id_field": None,
        "documents": len(corpus_texts()),
        "empty_documents": 0,
        "bad_records": 0,
        "unreadable_files": 0,
    }
    assert db.doc_name(0) == "corpus.jsonl.zst:1"
    capsys.readouterr()
    assert main(["db-info", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert (
        f"1. {sources['jsonl.zst'].resolve()} (jsonl.zst; text field 'content'; named file:line/row)" in out
    )
    assert f"{len(corpus_texts())} documents" in out


def test_cli_refuses_bad_sources_in_one_line(sources, tiny_encoder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(rows_with(b"{not json"))
    cases = [
        ((sources["jsonl"], "--text-field", "body"), 2, "has no field 'body'; its fields are: name, content"),
        ((tmp_path / "nowhere",), 2, "no such file or folder"),
        ((bad, "--text-field", "content"), 1, "bad.jsonl line 3 is not valid JSON"),
    ]
    for args, code, message in cases:
        assert cli_build(args[0], tmp_path / "db", tiny_encoder, *args[1:]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "db").exists()  # a failed first stage leaves no folder
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert (
            cli_build(bad, tmp_path / "db", tiny_encoder, "--text-field", "content", "--skip-bad-records")
            == 0
        )
    assert RetrievalDatabase.open(tmp_path / "db").manifest["sources"][0]["bad_records"] == 1


def test_retlm_add_from_jsonl_equals_python_add(tiny_encoder, tmp_path, capsys):
    first, more = python_doc_texts(n_docs=16, max_chars=600)[:10], python_doc_texts(16, 600)[10:]
    options = dict(chunk_size=16, seq_len=64, embedder=tiny_encoder, progress=False)
    RetrievalDatabase.build(first, tmp_path / "cli", **options)
    shutil.copytree(tmp_path / "cli", tmp_path / "python")
    rows = [{"body": text, "key": f"doc-{10 + i}"} for i, text in enumerate(more)]
    write_jsonl(tmp_path / "more.jsonl", rows)
    args = ["add", tmp_path / "cli", tmp_path / "more.jsonl", "--text-field", "body", "--id-field", "key"]
    assert main([*map(str, args), "--no-progress"]) == 0
    assert "added 6 documents" in capsys.readouterr().out
    python = RetrievalDatabase.open(tmp_path / "python").add(more)  # named doc-10 ... as the records' key
    added = RetrievalDatabase.open(tmp_path / "cli", verify=True)
    assert added.num_docs == python.num_docs == 16 and added.manifest["generation"] == 1
    for name in ("chunks.dat", "doc_ids.dat", "seqs.dat", "doc_names.jsonl", "embeddings.dat", "knn.dat"):
        assert added.file(name).read_bytes() == python.file(name).read_bytes(), name
    formats = [entry["format"] for entry in added.manifest["sources"]]
    assert formats == ["python", "jsonl"] and added.manifest["sources"][1]["documents"] == 6
    assert cli("add", tmp_path / "cli", tmp_path / "more.jsonl", "--no-progress") == 2
    assert "has no field 'text'; its fields are: body, key" in capsys.readouterr().err
    assert RetrievalDatabase.open(tmp_path / "cli").num_docs == 16  # the refused add wrote nothing


def test_records_are_parsed_as_they_are_read(tmp_path):
    """A JSONL line is parsed as it is read: a reader stopped after the first document has not read the
    file's end (which is malformed here and would raise)."""
    body = b"".join(json.dumps({"text": f"doc {i} " + "x" * 100}).encode() + b"\n" for i in range(20000))
    (tmp_path / "big.jsonl").write_bytes(body + b"{broken\n")
    docs = open_source(tmp_path / "big.jsonl").documents(SkipReport())
    assert next(docs).name == "big.jsonl:1"
    with pytest.raises(BadRecordError, match="big.jsonl line 20001"):
        list(docs)
