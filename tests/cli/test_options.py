"""Options written once: each command's argparse options and ``--config`` keys are derived from one typed
dataclass (``retlm.options``), and the Python keywords are that dataclass's fields."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys

import pytest
import yaml

from retlm.cli.db import AddOptions, BuildCommandOptions, SearchOptions
from retlm.cli.generate import GenerateOptions
from retlm.cli.main import _apply_config, build_parser
from retlm.cli.retrofit import RetrofitOptions
from retlm.cli.serve import ServeOptions
from retlm.cli.train import EvalOptions
from retlm.demo import DemoOptions
from retlm.options import cli_fields, options_from
from retlm.training.options import TrainOptions

COMMANDS = {
    "build-db": (BuildCommandOptions, ["TEXT", "--out", "DB"]),
    "add": (AddOptions, ["DB", "TEXT"]),
    "search": (SearchOptions, ["DB", "a query"]),
    "generate": (GenerateOptions, ["CKPT", "a prompt", "--db", "DB"]),
    "demo": (DemoOptions, []),
    "retrofit": (RetrofitOptions, ["--base", "gpt2", "--db", "DB", "--out", "RUN"]),
    "train": (TrainOptions, ["--db", "DB", "--out", "RUN"]),
    "eval": (EvalOptions, ["CKPT", "--db", "DB"]),
    "serve": (ServeOptions, ["MODEL"]),
}


def _sub(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


def _parse(argv):
    return _apply_config(build_parser(), [str(a) for a in argv])


def _flag(f: dataclasses.Field) -> str:
    default = f"--no-{f.name}" if f.metadata.get("negate") else "--" + f.name
    return f.metadata.get("flag", default).replace("_", "-")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_an_option_with_help_and_its_default_shown(command):
    cls, _ = COMMANDS[command]
    options_part = _sub(command).format_help().split("options:", 1)[1]
    blocks = {}
    for block in re.split(r"\n  (?=-)", options_part):
        text = " ".join(block.split())
        blocks[text.split(" ")[0].rstrip(",")] = text
    positional = " ".join(_sub(command).format_help().split("options:", 1)[0].split())
    fields = cli_fields(cls)
    assert len(fields) >= 5
    for f in fields:
        help_start = " ".join(f.metadata["help"].split()[:4])
        if f.metadata.get("positional"):
            assert f"{f.metadata['metavar']} {help_start}" in positional, (command, f.name)
            continue
        block = blocks.get(_flag(f))
        assert block is not None, (command, _flag(f), sorted(blocks))
        assert help_start in block, (command, f.name, block)
        shown = f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool)
        assert ("(default" in block) == (shown or "(default" in f.metadata["help"]), (command, block)
    no_help = [f.name for f in dataclasses.fields(cls) if "help" not in f.metadata]
    assert no_help == [], f"{cls.__name__} fields without help text: {no_help}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_defaults_of_the_command_line_are_the_dataclass_defaults(command):
    cls, required = COMMANDS[command]
    got = options_from(_parse([command, *required]), cls)
    given = {
        f.name: getattr(got, f.name) for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
    }
    expected = cls(**given)
    assert got == expected, command


@pytest.mark.parametrize("command", ["build-db", "generate", "demo"])
def test_neighbors_alias_equals_neighbors(command):
    cls, required = COMMANDS[command]
    one = options_from(_parse([command, *required, "--neighbors", "3"]), cls)
    other = options_from(_parse([command, *required, "--neighbours", "3"]), cls)
    assert one == other and one.num_neighbors == 3
    assert "--neighbors" in _sub(command).format_help()


def test_yaml_config_and_flags_give_the_same_options(tmp_path):
    flags = ["--neighbours", "3", "--chunk-size", "32", "--pooling", "cls", "--no-progress", "--no-wait"]
    by_flags = options_from(_parse(["build-db", "TEXT", "--out", "DB", *flags]), BuildCommandOptions)
    for spelling in ("neighbors", "neighbours", "num_neighbors"):
        config = tmp_path / f"{spelling}.yaml"
        values = {spelling: 3, "chunk-size": 32, "pooling": "cls", "no_progress": True, "no_wait": True}
        config.write_text(yaml.safe_dump(values))
        by_yaml = options_from(
            _parse(["build-db", "TEXT", "--out", "DB", "--config", config]), BuildCommandOptions
        )
        assert by_yaml == by_flags, spelling
    assert by_flags.num_neighbors == 3 and by_flags.chunk_size == 32
    assert by_flags.progress is False and by_flags.wait is False
    assert by_flags != BuildCommandOptions(source=by_flags.source, out=by_flags.out)


def test_command_line_wins_over_config_and_zero_means_none(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("neighbors: 5\neval_sequences: 0\nlr: 0.01\n")
    opts = options_from(_parse(["demo", "--config", config, "--neighbors", "4"]), DemoOptions)
    assert opts == DemoOptions(num_neighbors=4, eval_sequences=None, lr=0.01)


def test_one_option_twice_in_a_config_is_a_one_line_usage_error(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("neighbors: 2\nneighbours: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        _parse(["build-db", "TEXT", "--out", "DB", "--config", config])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'neighbours' sets --neighbors a second time" in last


def test_build_options_are_keywords_of_the_database_build():
    from retlm.retrieval import BuildOptions

    kwargs = dataclasses.asdict(BuildCommandOptions(source="T", out="D").build_options())
    assert set(kwargs) <= {f.name for f in dataclasses.fields(BuildOptions)}
    assert BuildOptions(**kwargs) == BuildOptions()  # the command's defaults are the library's
    ray = BuildCommandOptions(source="T", out="D", engine="ray", num_shards=3).build_options()
    assert ray.engine == "ray" and ray.num_shards == 3 and isinstance(ray, BuildOptions)
    parsed = options_from(
        _parse(["build-db", "TEXT", "--out", "DB", "--engine", "ray", "--shards", "3"]), BuildCommandOptions
    )
    assert parsed.build_options() == ray


def test_eval_options_are_keywords_of_evaluate():
    from retlm.training.evaluation import evaluate

    params = inspect.signature(evaluate).parameters
    args = _parse(["eval", "CKPT", "--db", "DB", "--max-overlap", "12.5%", "--no-progress"])
    opts = options_from(args, EvalOptions)
    assert set(opts.evaluate_kwargs()) <= set(params)
    assert opts.max_overlap == 0.125 and opts.progress is False and opts.plot is None


def test_train_options_are_the_train_commands_arguments():
    """`retlm train` derives its arguments from ``TrainOptions`` itself (one definition), and its
    command-line conversions (``0`` -> None, ``--no-retrieval``) give the ``TrainOptions`` they mean."""
    from retlm.cli.train import training_options

    parsed = training_options(_parse(["train", "--db", "DB", "--out", "RUN"]))
    assert TrainOptions(**parsed) == TrainOptions()
    zeros = ["--max-grad-norm", "0", "--eval-sequences", "0", "--save-every", "0", "--no-retrieval"]
    parsed = training_options(_parse(["train", "--db", "DB", "--out", "RUN", *zeros]))
    assert TrainOptions(**parsed) == TrainOptions(
        max_grad_norm=None, eval_sequences=None, save_every=None, retrieval=False
    )
    offered = {a.dest for a in _sub("train")._actions}
    for f in dataclasses.fields(TrainOptions):
        assert (f"no_{f.name}" if f.metadata.get("negate") else f.name) in offered, f.name


def test_building_the_parsers_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from retlm.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.heavy
def test_the_lazy_training_names_stay_functions_after_their_modules_load():
    # A submodule named like one of the package's names would replace it on the package once imported
    # (the trainer imports its evaluation module), and `from retlm.training import evaluate` would then
    # return a module: every lazy name must differ from the submodules of retlm.training.
    code = (
        "import inspect, retlm.training as t, retlm.training.trainer, retlm.training.evaluation; "
        "print(sorted(n for n in t.__all__ if inspect.ismodule(getattr(t, n))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_retrofit_offers_no_no_retrieval_and_keeps_its_base_defaults():
    args = _parse(["retrofit", "--base", "gpt2", "--db", "DB", "--out", "RUN", "--cca-layers", "2,4"])
    assert not hasattr(args, "no_retrieval") and args.seed is None and args.train_fraction is None
    assert options_from(args, RetrofitOptions).adapter_kwargs()["cca_layers"] == [2, 4]


def test_config_alias_bombs_and_big_files_are_refused_before_parsing(tmp_path, capsys):
    from retlm.options import MAX_CONFIG_BYTES

    bomb = tmp_path / "bomb.yaml"
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    rows += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb.write_text("\n".join(rows) + "\nneighbors: *i\n")
    big = tmp_path / "big.yaml"
    big.write_text("neighbors: 2\n" + "#" * MAX_CONFIG_BYTES)
    for config, reason in ((bomb, "aliases (*name) are not accepted"), (big, "at most 1048576 are read")):
        with pytest.raises(SystemExit) as exit_info:
            _parse(["build-db", "TEXT", "--out", "DB", "--config", config])
        assert exit_info.value.code == 2
        assert reason in capsys.readouterr().err.strip().splitlines()[-1]


def test_option_errors_show_values_cut_short(tmp_path, capsys):
    from retlm.errors import OptionError, check_int, short_repr

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({"pooling": "x" * 100_000, "chunk_size": 2}))
    with pytest.raises(SystemExit):
        _parse(["build-db", "TEXT", "--out", "DB", "--config", config])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(--pooling) must be one of mean, cls" in last and len(last) < 300
    nested = [[list(range(10_000))] * 1000] * 1000  # a billion items, by reference
    assert len(short_repr(nested)) <= 80 and len(short_repr(10**10_000)) <= 80
    with pytest.raises(OptionError, match=r"^k must be a positive integer, got \[0, 0, 0, 0, \.\.\.\]$"):
        check_int("k", [0] * 1_000_000)
    for value in (True, 0, 1.0, "3"):
        with pytest.raises(OptionError, match="k must be a positive integer"):
            check_int("k", value)
    check_int("k", 3)
    check_int("k", 0, low=0)


def test_build_takes_one_options_object_or_its_keywords():
    from retlm.retrieval import BuildConfig, BuildOptions, RetrievalDatabase

    with pytest.raises(TypeError, match="chunk_sise"):
        RetrievalDatabase.build(["text"], "unused", chunk_sise=32)
    for options in (BuildOptions(engine="ray", stage="embed"), BuildOptions(num_shards=2)):
        with pytest.raises(ValueError, match="engine 'ray'|apply to engine 'ray' only"):
            RetrievalDatabase.build(["text"], "unused", options)
    with pytest.raises(ValueError, match="num_shards must be a positive integer"):
        BuildOptions(engine="ray", num_shards=0).validate()
    assert BuildOptions(chunk_size=32).content("openvino") == BuildConfig(
        chunk_size=32, embed_backend="openvino"
    )


def test_the_demo_offers_build_db_options_with_defaults_of_its_own():
    from retlm.errors import OptionError
    from retlm.retrieval import BuildConfig, BuildOptions

    build = {f.name: f for f in dataclasses.fields(BuildConfig)}
    demo = {f.name: f for f in dataclasses.fields(DemoOptions)}
    for name in ("tokenizer", "retriever", "seq_len", "chunk_size", "num_neighbors"):
        assert demo[name].metadata == build[name].metadata  # help, flag, aliases, choices: one home
    assert (demo["retriever"].default, build["retriever"].default) == ("hybrid", "dense")
    assert (demo["seq_len"].default, build["seq_len"].default) == (256, 512)
    opts = DemoOptions(chunk_size=32, seq_len=96, num_neighbors=3, retriever="bm25", progress=False)
    expected = dict(chunk_size=32, seq_len=96, num_neighbors=3, retriever="bm25", tokenizer="gpt2")
    assert opts.build_options() == BuildOptions(**expected, glob="*.txt", progress=False)
    assert opts.build_options().content() == BuildConfig(**expected, embed_backend="torch")
    with pytest.raises(OptionError, match="^--seq-len must be a multiple of --chunk-size 32 "):
        dataclasses.replace(opts, seq_len=100).build_options().validate(flags=True)


def test_the_old_error_names_are_deprecated_aliases_of_option_error():
    import retlm.cli.main
    import retlm.options
    from retlm.errors import OptionError

    for module, name in ((retlm.cli.main, "UsageError"), (retlm.options, "UsageProblem")):
        with pytest.warns(DeprecationWarning, match="retlm.errors.OptionError"):
            assert getattr(module, name) is OptionError
