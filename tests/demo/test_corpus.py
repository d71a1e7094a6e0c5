"""The bundled corpus: present offline, English prose, one file per document, idempotent writes."""

import pytest

from retlm.demo.corpus import pydoc_topics, stdlib_docstrings, write_python_docs_corpus


@pytest.mark.heavy
def test_corpus_sizes_match_the_documented_scale():
    topics = dict(pydoc_topics())
    modules = dict(stdlib_docstrings())
    assert len(topics) > 50 and sum(map(len, topics.values())) > 300_000
    assert len(modules) > 200 and sum(map(len, modules.values())) > 1_000_000
    assert "module-json" in modules and "JSON" in modules["module-json"]
    assert not any(name.startswith("module-test.") for name in modules)


@pytest.mark.heavy
def test_write_corpus_is_idempotent(tmp_path):
    out = write_python_docs_corpus(tmp_path / "corpus", progress=False)
    files = sorted(out.glob("*.txt"))
    assert len(files) == len(list(pydoc_topics())) + len(list(stdlib_docstrings()))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    write_python_docs_corpus(out, progress=False)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert not list(out.glob(".*.tmp"))
