"""The fuzz suite of issue 14: random option values, random corruption, random manifest fields.

One property everywhere: a command either fails with a one-line error (exit code 1 or 2, no traceback)
that names the problem, writing nothing outside its named output, or it succeeds; and for corruption,
success means a result equal to the clean run's. Never a silently different result.

- option values of every subcommand (ints, huge, negative, floats, nan, strings, lists, switches) given
  on the command line or through ``--config``;
- byte flips, truncations and appended garbage at random offsets of every database and model file;
- manifest fields replaced by wrong types, negative or huge numbers and paths that leave the folder
  (sealed again, as a hand edit would be: the field checks, not the seal, must catch them; and unsealed,
  as corruption: the seal must).

Runs in the default suite within about a minute (``max_examples`` per test below, 135 in all); the
``ci`` profile (conftest.py) replays the same examples every run, ``HYPOTHESIS_PROFILE=explore`` draws new
ones and ``RETLM_FUZZ_SCALE=10`` draws ten times as many. Each test has a ``_long`` twin marked ``slow``
(ten times the examples, the same body) for ``pytest -m slow``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from robust_helpers import SEQ, TINY_MODEL, C, cli, copy_tree

import retlm.demo.run as demo_module
from retlm.checksums import seal


def fuzz(max_examples: int) -> settings:
    """``RETLM_FUZZ_SCALE=10`` runs ten times as many examples (when hunting, not in CI)."""
    scale = float(os.environ.get("RETLM_FUZZ_SCALE", "1"))
    return settings(
        max_examples=max(1, int(max_examples * scale)), deadline=None, suppress_health_check=list(HealthCheck)
    )


# examples per test in the default run (about 60 s in all on the 2-core box); the slow twins run 10x
OPTIONS, DATABASE, MODEL, MANIFEST = 45, 40, 15, 35
LONG = 10

QUERY = "the assert statement"

# ---- values ----

huge = st.sampled_from([10**9, 10**12, 2**63, -(2**63), 10**30])
ints = st.one_of(st.integers(-5, 70), huge)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -0.0, 1e-30])
)
texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "nan", "1e3", "../../etc", "/nonexistent", "a\nb", "0x10", "café", "1,2", "-1"]
    ),
)
anything = st.one_of(ints, floats, texts, st.booleans(), st.none(), st.lists(st.integers(0, 3), max_size=3))


def on_command_line(value) -> str | None:
    """How a value would be typed on a command line (None: not typeable)."""
    if value is None or isinstance(value, list):
        return None
    return str(value)


# ---- the commands, each with a cheap valid baseline and the options fuzzed ----


def command_specs(robust, out: Path) -> dict:
    config = out / "model.yaml"
    config.write_text(yaml.safe_dump(TINY_MODEL))
    build = [
        "build-db",
        str(robust.corpus),
        "--out",
        str(out / "db"),
        "--chunk-size",
        str(C),
        "--seq-len",
        str(SEQ),
        "--embedder",
        robust.embedder,
        "--embedding-dtype",
        "float32",
        "--no-progress",
    ]
    return {
        "build-db": (
            build,
            [
                "--chunk-size",
                "--neighbors",
                "--seq-len",
                "--glob",
                "--pooling",
                "--batch-size",
                "--embedding-dtype",
                "--index-factory",
                "--exact-threshold",
                "--target-recall",
                "--extra-neighbors",
                "--stage",
                "--shard",
                "--embedder",
                "--no-progress",
            ],
        ),
        "search": (["search", str(robust.db), QUERY, "-k", "2", "--json"], ["-k", "--exclude-doc", "--json"]),
        "db-info": (["db-info", str(robust.db)], ["--verify", "--json"]),
        "train": (
            [
                "train",
                "--db",
                str(robust.db),
                "--model-config",
                str(config),
                "--out",
                str(out / "run"),
                "--max-steps",
                "1",
                "--minutes",
                "0.05",
                "--batch-size",
                "2",
                "--no-progress",
            ],
            [
                "--max-steps",
                "--minutes",
                "--lr",
                "--schedule",
                "--warmup",
                "--batch-size",
                "--grad-accum",
                "--max-grad-norm",
                "--weight-decay",
                "--precision",
                "--seed",
                "--train-fraction",
                "--seq-len",
                "--eval-every",
                "--eval-sequences",
                "--save-every",
                "--save-total-limit",
                "--log-every",
                "--resume",
                "--model-config",
            ],
        ),
        "eval": (
            [
                "eval",
                str(robust.model),
                "--db",
                str(robust.db),
                "--max-sequences",
                "2",
                "--no-progress",
                "--output",
                str(out / "eval.json"),
            ],
            ["--split", "--batch-size", "--max-sequences", "--device", "--precision", "--json"],
        ),
        "generate": (
            ["generate", str(robust.model), QUERY, "--db", str(robust.db), "--max-new-tokens", "6"],
            [
                "--max-new-tokens",
                "--temperature",
                "--top-k",
                "--top-p",
                "--repetition-penalty",
                "--no-repeat-ngram-size",
                "--seed",
                "--neighbours",
                "--sample",
                "--no-retrieval",
                "--show-neighbors",
            ],
        ),
        "demo": (
            ["demo", "--work-dir", str(out / "work"), "--corpus", str(robust.corpus), "--no-progress"],
            [
                "--minutes",
                "--model-config",
                "--seq-len",
                "--chunk-size",
                "--neighbours",
                "--batch-size",
                "--lr",
                "--eval-sequences",
                "--prompt",
                "--max-new-tokens",
                "--repetition-penalty",
                "--no-repeat-ngram-size",
                "--seed",
                "--corpus",
            ],
        ),
    }


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and skip not in (p, *p.parents)
    }


# messages of Python, numpy or torch internals: an error that reaches the user as one of these did not
# name the problem (it escaped the checks that should have caught it)
INTERNAL = re.compile(
    r"NoneType|object has no attribute|unsupported operand|not subscriptable|cannot convert|invalid literal"
    r"|index \d+ is out of bounds|list index out of range|takes \d+ positional|unexpected keyword"
    r"|Expected one of|must be real number|Unacceptable pattern|Non-relative|expected non-negative integer"
    r"|empty\(\)|Unable to allocate|out of memory|overflow|not supported between instances"
)


def check_outcome(result, command: str) -> None:
    """Exit code 0, 1 or 2; no traceback; a failure says what in one line, in retlm's words."""
    assert result.code in (0, 1, 2), (result.code, result.err[-2000:])
    assert "Traceback" not in result.err, result.err[-3000:]
    if result.code:
        errors = [line for line in result.err_lines if "error:" in line]
        assert len(errors) == 1, result.err[-2000:]
        message = errors[0].split("error:", 1)[1].strip()
        assert len(message) > 5, result.err
        assert not INTERNAL.search(message), f"an internal error reached the user: {message}"


class ReachedFirstStep(Exception):
    """The demo's validation passed: stop instead of building, training, evaluating."""


@pytest.fixture
def no_demo_work(monkeypatch):
    def stop(opts):
        raise ReachedFirstStep("REACHED-FIRST-STEP")

    monkeypatch.setattr(demo_module, "build_database", stop)


@fuzz(OPTIONS)
@given(data=st.data())
@pytest.mark.heavy
def test_random_option_values_give_one_line_errors_or_success(robust, no_demo_work, data):
    command = data.draw(
        st.sampled_from(
            [
                "build-db",
                "search",
                "db-info",
                "train",
                "eval",
                "generate",
                "demo",
                "search",
                "generate",
                "eval",
            ]
        ),
        label="command",
    )
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as configs:
        out = Path(tmp)
        base, options = command_specs(robust, out)[command]
        option = data.draw(st.sampled_from(options), label="option")
        value = data.draw(anything, label="value")
        through_config = data.draw(st.booleans(), label="through --config")
        argv = list(base)
        if option in argv:  # the baseline sets it: drop the baseline's value
            i = argv.index(option)
            del argv[i : i + (1 if option in ("--json", "--no-progress") else 2)]
        switch = option in (
            "--json",
            "--verify",
            "--sample",
            "--no-retrieval",
            "--show-neighbors",
            "--no-progress",
        )
        if through_config:
            config = Path(configs) / "options.yaml"
            config.write_text(yaml.safe_dump({option.lstrip("-"): value}))
            argv += ["--config", str(config)]
        else:
            typed = on_command_line(value)
            assume(typed is not None)
            argv += [option] if switch else [option, typed]
        if command == "train" and option == "--minutes":
            argv += ["--max-steps", "1"] if "--max-steps" not in argv else []
        sandbox = robust.root
        before = snapshot(sandbox, skip=out)
        result = cli(*argv)
        if command == "demo" and "REACHED-FIRST-STEP" in result.err:
            return  # validation passed: the first step was about to start
        check_outcome(result, command)
        assert snapshot(sandbox, skip=out) == before, "a command wrote outside its named output"


# ---- corruption of every database and model file ----


def corrupt(path: Path, how: str, offset: float, count: int) -> None:
    data = bytearray(path.read_bytes())
    at = min(int(offset * len(data)), max(len(data) - 1, 0))
    if how == "flip" and data:
        for i in range(at, min(at + count, len(data))):
            data[i] ^= 0xFF if count > 1 else 1 << (i % 8)
    elif how == "truncate":
        del data[at:]
    else:  # append
        data += bytes(range(count))
    path.write_bytes(bytes(data))


def eval_args(model: Path, db: Path) -> tuple:
    return ("eval", model, "--db", db, "--max-sequences", "2", "--json", "--no-progress")


@pytest.fixture(scope="module")
def clean_outputs(robust):
    """The clean runs' outputs. ``search_all`` asks for every chunk (-k num_chunks), with full-precision
    json scores, so a change to any vector of the index or any token of chunks.dat shows; ``eval`` prints
    losses over the whole vocabulary, so a change to a weight the greedy generation does not reach shows."""
    k_all = json.loads((robust.db / "manifest.json").read_text())["num_chunks"]
    search = cli("search", robust.db, QUERY, "-k", "3", "--json")
    search_all = cli("search", robust.db, QUERY, "-k", k_all, "--json")
    generate = cli("generate", robust.model, QUERY, "--db", robust.db, "--max-new-tokens", "6")
    evaluation = cli(*eval_args(robust.model, robust.db))
    info = cli("db-info", robust.db, "--json")
    assert search.code == search_all.code == generate.code == evaluation.code == info.code == 0
    assert len(json.loads(search_all.out)[0]["neighbors"]) == k_all
    return {
        "search": search.out,
        "k_all": k_all,
        "search_all": search_all.out,
        "generate": generate.out,
        "eval": evaluation.out,
        "info": info.out,
    }


corruption = st.tuples(st.sampled_from(["flip", "truncate", "append"]), st.floats(0, 1), st.integers(1, 64))


@fuzz(DATABASE)
@given(data=st.data())
@pytest.mark.heavy
def test_corrupted_database_files_are_named_or_harmless(robust, clean_outputs, data):
    files = sorted(
        p.relative_to(robust.db) for p in robust.db.rglob("*") if p.is_file() and p.name != ".lock"
    )
    name = data.draw(st.sampled_from(files), label="file")
    how, offset, count = data.draw(corruption, label="corruption")
    with tempfile.TemporaryDirectory() as tmp:
        db = copy_tree(robust.db, Path(tmp) / "db")
        corrupt(db / name, how, offset, count)
        assume((db / name).read_bytes() != (robust.db / name).read_bytes())
        for args, clean in (
            (("search", db, QUERY, "-k", clean_outputs["k_all"], "--json"), clean_outputs["search_all"]),
            (("db-info", db, "--json"), None),
        ):
            result = cli(*args)
            check_outcome(result, args[0])
            if result.code:
                assert Path(name).name in result.err, (name, result.err)
            elif clean is not None:
                assert result.out == clean, f"{name} corrupted ({how}) gave a different result"


@fuzz(MODEL)
@given(data=st.data())
@pytest.mark.heavy
def test_corrupted_model_files_are_named_or_harmless(robust, clean_outputs, data):
    files = sorted(p.name for p in robust.model.iterdir() if p.is_file())
    name = data.draw(st.sampled_from(files), label="file")
    how, offset, count = data.draw(corruption, label="corruption")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(shutil.copytree(robust.model, Path(tmp) / "model"))
        corrupt(model / name, how, offset, count)
        assume((model / name).read_bytes() != (robust.model / name).read_bytes())
        generate = ("generate", model, QUERY, "--db", robust.db, "--max-new-tokens", "6")
        for args, clean in (
            (generate, clean_outputs["generate"]),
            (eval_args(model, robust.db), clean_outputs["eval"]),
        ):
            result = cli(*args)
            check_outcome(result, args[0])
            if result.code:
                assert name in result.err, (name, result.err)
                break  # refused: the next command would refuse it the same way
            same = result.out.replace(str(model), str(robust.model))  # eval names the checkpoint it read
            assert same == clean, f"{name} corrupted ({how}) changed the output of {args[0]}"


# ---- manifest fields ----


def manifest_paths(manifest: dict) -> list[tuple[str, ...]]:
    paths = []
    for key, value in manifest.items():
        if key == "manifest_sha256":
            continue
        paths.append((key,))
        if isinstance(value, dict) and key in ("tokenizer", "files", "checksums", "shapes", "build"):
            paths += [(key, sub) for sub in value]
    return paths


bad_values = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            "",
            "16",
            "x" * 300,
            [],
            {},
            [1, 2],
            -1,
            -(2**40),
            2**62,
            10**30,
            1.5,
            math.inf,
            "../outside",
            "/etc/passwd",
            "../../../../etc/passwd",
            "tokenizer/../../x",
        ]
    ),
    st.integers(-(2**70), 2**70),
)


@fuzz(MANIFEST)
@given(data=st.data())
@pytest.mark.heavy
def test_random_manifest_fields_are_refused_naming_the_file(robust, clean_outputs, data):
    manifest = json.loads((robust.db / "manifest.json").read_text())
    path = data.draw(st.sampled_from(manifest_paths(manifest)), label="field")
    value = data.draw(bad_values, label="value")
    resealed = data.draw(st.booleans(), label="resealed")
    target = manifest
    for key in path[:-1]:
        target = target[key]
    assume(target.get(path[-1]) != value)
    target[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        db = copy_tree(robust.db, Path(tmp) / "db")
        text = json.dumps(seal(manifest) if resealed else manifest, allow_nan=True)
        (db / "manifest.json").write_text(text)
        result = cli("search", db, QUERY, "-k", "3", "--json")
        check_outcome(result, "search")
        if not resealed:
            assert result.code == 1 and "manifest.json" in result.err  # its seal (or format version)
        elif result.code:
            assert "manifest.json" in result.err or any(
                f in result.err
                for f in (
                    "chunks.dat",
                    "doc_ids.dat",
                    "seqs.dat",
                    "knn.dat",
                    "embeddings.dat",
                    "index.faiss",
                    "embedder",
                )
            ), result.err
        else:  # accepted: it must not have changed what a search returns
            assert result.out == clean_outputs["search"], f"manifest {path}={value!r} changed the result"
        assert "/etc/passwd" not in result.out


# ---- the same bodies, ten times the examples: `pytest -m slow tests/test_fuzz.py` ----


@pytest.mark.slow
@fuzz(LONG * OPTIONS)
@given(data=st.data())
def test_random_option_values_long(robust, no_demo_work, data):
    body = test_random_option_values_give_one_line_errors_or_success.hypothesis.inner_test
    body(robust, no_demo_work, data)


@pytest.mark.slow
@fuzz(LONG * DATABASE)
@given(data=st.data())
def test_corrupted_database_files_long(robust, clean_outputs, data):
    test_corrupted_database_files_are_named_or_harmless.hypothesis.inner_test(robust, clean_outputs, data)


@pytest.mark.slow
@fuzz(LONG * MODEL)
@given(data=st.data())
def test_corrupted_model_files_long(robust, clean_outputs, data):
    test_corrupted_model_files_are_named_or_harmless.hypothesis.inner_test(robust, clean_outputs, data)


@pytest.mark.slow
@fuzz(LONG * MANIFEST)
@given(data=st.data())
def test_random_manifest_fields_long(robust, clean_outputs, data):
    body = test_random_manifest_fields_are_refused_naming_the_file.hypothesis.inner_test
    body(robust, clean_outputs, data)
