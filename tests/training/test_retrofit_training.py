"""RETRO-fitting through the real trainer: only the adapter trains (the base's tensors stay
bit-identical), runs resume, `retlm eval` / `retlm generate` take the run, the RETRO control of the demo
retrofits from the command line, and a database with another tokenizer is refused in one line.

The synthetic twin database (tests/helpers/training_helpers.py) has a 64-token toy vocabulary, chunks of 8
tokens and sequences of 32; the command-line tests use a real RetrievalDatabase (MiniLM tokenizer, a
tiny random embedder).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_causal_lm
from training_helpers import (
    open_twin_database,
    tiny_model_config,
    write_twin_database,
)

from retlm.cli.main import main
from retlm.models.auto import checkpoints
from retlm.models.retrofit import RetroFitForCausalLM, load_base
from retlm.training import load_model, read_metrics, train
from retlm.training.retrofit import TokenizerMismatch, retrofit

FAST = dict(batch_size=4, lr=1e-2, log_every=1, progress=False)


def tiny_base(family: str, vocab: int = 64, positions: int = 64) -> torch.nn.Module:
    return tiny_causal_lm(family, vocab, positions=positions)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("family", ["gpt2", "llama", "retnet"])
def test_training_changes_the_adapter_and_leaves_every_base_tensor_bit_identical(family, db, tmp_path):
    tiny_base(family).save_pretrained(tmp_path / "base")
    base = load_base(tmp_path / "base")
    before = snapshot(base)
    model = RetroFitForCausalLM.from_base(base, chunk_size=8, cca_layers=[1, 2], enc_depth=1)
    assert model.config.base_model_name_or_path == str((tmp_path / "base").resolve())
    adapter_before = snapshot(model.retrofit)
    result = train(
        db,
        model.config,
        tmp_path / "run",
        model=model,
        max_steps=4,
        save_every=2,
        eval_every=2,
        weight_decay=0.1,
        **FAST,
    )
    assert result.global_step == 4
    after = base.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():  # bitwise, not allclose: weight decay and AdamW never touched it
        assert torch.equal(after[name], tensor), name
    moved = [n for n, t in model.retrofit.state_dict().items() if not torch.equal(t, adapter_before[n])]
    assert any("cca.attn.to_out" in n for n in moved) and any("encoder" in n for n in moved)
    # evaluation ran with and without retrieval; without, the model is the base
    records = [r for r in read_metrics(result.metrics_file) if "eval_loss" in r]
    assert [r["step"] for r in records] == [2, 4] and all("eval_loss_no_retrieval" in r for r in records)
    # checkpoints and the final model hold the adapter alone, and load back with their base
    for folder in [*checkpoints(tmp_path / "run"), result.model_dir]:
        assert all(key.startswith("retrofit.") for key in load_file(folder / "model.safetensors"))
    seq = torch.randint(1, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    retrieved = torch.randint(1, 64, (2, 4, 2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    loaded = load_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=seq, retrieved=retrieved).logits,
            model(input_ids=seq, retrieved=retrieved).logits,
        )
        assert torch.equal(loaded(input_ids=seq).logits, base(input_ids=seq).logits)


@pytest.mark.heavy
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(db, tmp_path):
    tiny_base("gpt2").save_pretrained(tmp_path / "base")

    def run(out):
        model = RetroFitForCausalLM.from_base(
            str(tmp_path / "base"), chunk_size=8, cca_layers=[2], enc_depth=1
        )
        return train(
            db, model.config, out, model=model, max_steps=6, save_every=3, save_total_limit=3, **FAST
        )

    whole = run(tmp_path / "whole")
    # the state of a run killed after its step-3 checkpoint
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", cut / "checkpoint-3")
    shutil.copy(tmp_path / "whole" / "retlm_run.json", cut / "retlm_run.json")
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    resumed = run(cut)
    assert resumed.global_step == 6
    expected = load_file(whole.model_dir / "model.safetensors")
    got = load_file(resumed.model_dir / "model.safetensors")
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    losses = [[r["loss"] for r in read_metrics(r.metrics_file) if "loss" in r] for r in (whole, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_retlm_base_keeps_its_split_and_its_tokenizer_is_checked(db, tmp_path):
    control = train(
        db,
        tiny_model_config(),
        tmp_path / "control",
        max_steps=2,
        retrieval=False,
        seed=3,
        train_fraction=0.8,
        save_every=None,
        **FAST,
    )
    result = retrofit(
        tmp_path / "control",
        db,
        tmp_path / "run",
        cca_layers=[2],
        enc_depth=1,
        max_steps=2,
        save_every=None,
        **FAST,
    )
    run = json.loads((tmp_path / "run" / "retlm_run.json").read_text())
    assert run["fixed"]["seed"] == 3 and run["fixed"]["train_fraction"] == 0.8
    config = load_model(result.model_dir).config
    assert config.base_model_name_or_path == str(control.model_dir.resolve())
    assert config.retlm_data["split"] == load_model(control.model_dir).config.retlm_data["split"]
    with pytest.raises(ValueError, match="held out"):
        retrofit(tmp_path / "control", db, tmp_path / "other", seed=4, max_steps=1, **FAST)
    other = open_twin_database(write_twin_database(tmp_path / "db2"))
    other.manifest["tokenizer"]["name"] = "another-tokenizer"
    with pytest.raises(TokenizerMismatch, match="tokenizer mismatch: .* uses 'another-tokenizer'"):
        retrofit(tmp_path / "control", other, tmp_path / "other", max_steps=1, **FAST)
    with pytest.raises(TokenizerMismatch, match="has only 32 token embeddings"):
        retrofit(tiny_base("gpt2", vocab=32), db, tmp_path / "small", max_steps=1, **FAST)


# ---- the command line, on a real database ----


@pytest.fixture(scope="module")
def real(tmp_path_factory, real_db):
    root, db = tmp_path_factory.mktemp("real"), real_db
    base = tiny_base("gpt2", vocab=len(db.tokenizer))
    base.save_pretrained(root / "gpt2")
    db.tokenizer.save_pretrained(root / "gpt2")  # the base's tokenizer is the database's
    return root, db


@pytest.mark.heavy
def test_retrofit_command_then_eval_and_generate(real, capsys):
    root, db = real
    out = root / "run"
    command = f"retrofit --base {root / 'gpt2'} --db {db.path} --out {out} --cca-layers 1,2 --enc-depth 1"
    command += " --max-steps 3 --eval-every 3 --batch-size 4 --no-progress"
    assert main(command.split()) == 0
    printed = capsys.readouterr().out
    assert "trained 3/3 steps" in printed and "without retrieval" in printed
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "retrofit" and config["cca_layers"] == [1, 2]
    assert config["base_model_name_or_path"] == str((root / "gpt2").resolve())
    assert (
        main(["eval", str(out), "--db", str(db.path), "--no-progress", "--plot", str(out / "overlap.png")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "with retrieval" in printed and "50-100%" in printed and "not bucketed" in printed
    assert (out / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(out), "--db", str(db.path), "--no-progress", "--max-overlap", "12.5%"]) == 0
    assert "more than 12.5% dropped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(out), "--db", str(db.path), "--max-overlap", "2"])
    assert exit_info.value.code == 2 and "fraction in [0, 1]" in capsys.readouterr().err
    prompt = "The with statement"
    assert main(["generate", str(out), "--db", str(db.path), prompt, "--max-new-tokens", "12"]) == 0
    assert prompt.lower() in capsys.readouterr().out.lower()
    # the same command again finds the run finished
    assert main(command.split()) == 0
    assert "already finished" in capsys.readouterr().out


def test_a_base_with_another_tokenizer_is_refused_in_one_line(real, tmp_path, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    root, db = real
    words = WordLevel({f"w{i}": i for i in range(100)} | {"[UNK]": 100}, unk_token="[UNK]")
    tokenizer = Tokenizer(words)
    tokenizer.pre_tokenizer = Whitespace()
    base = tmp_path / "base"
    tiny_base("gpt2", vocab=len(db.tokenizer)).save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(base)
    capsys.readouterr()
    code = main(
        [
            "retrofit",
            "--base",
            str(base),
            "--db",
            str(db.path),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--no-progress",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer mismatch" in err and "--tokenizer" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cca-layers", "x"], "comma-separated layer numbers"),
        (["--enc-depth", "0"], "--enc-depth must be a positive integer"),
        (["--lr", "-1"], "lr must be positive"),
    ],
)
def test_retrofit_usage_errors_exit_2(real, tmp_path, capsys, argv, message):
    root, db = real
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "retrofit",
                "--base",
                str(root / "gpt2"),
                "--db",
                str(db.path),
                "--out",
                str(tmp_path / "r"),
                *argv,
            ]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.heavy
def test_the_demos_control_retrofits_from_the_command_line(real, capsys, tmp_path):
    """`retlm train --no-retrieval` (the demo's control, a RETRO with a RetNet decoder), then
    `retlm retrofit --base RUN_DIR`: the base's split is kept, and retrieval off gives the control."""
    root, db = real
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "decoder: retnet\nenc_dim: 32\nenc_depth: 1\ndec_dim: 32\ndec_depth: 2\n"
        "dec_cross_attn_layers: [2]\nheads: 2\ndim_head: 16\nzero_init_cca: true\n"
    )
    control = tmp_path / "control"
    assert (
        main(
            f"train --db {db.path} --model-config {config} --out {control} --no-retrieval --max-steps 2 "
            "--batch-size 4 --seed 5 --no-progress".split()
        )
        == 0
    )
    out = tmp_path / "run"
    assert (
        main(
            f"retrofit --base {control} --db {db.path} --out {out} --max-steps 2 --batch-size 4 "
            "--eval-every 2 --no-progress".split()
        )
        == 0
    )
    assert "trained 2/2 steps" in capsys.readouterr().out
    run = json.loads((out / "retlm_run.json").read_text())
    assert run["fixed"]["seed"] == 5
    fitted, base = load_model(out), load_model(control)
    assert fitted.config.cca_layers == [2] and isinstance(fitted.base, type(base))
    seq = torch.randint(1, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fitted(input_ids=seq).logits, base(input_ids=seq).logits)


@pytest.mark.parametrize("family", ["llama", "retnet"])
@pytest.mark.heavy
def test_retrofit_command_on_llama_and_retnet_bases(family, real, capsys, tmp_path):
    """`retlm retrofit` on the other supported families (GPT-2: above): the CCA trains, the run holds the
    adapter alone and reloads with its base unchanged, and `retlm eval` takes the run. (That training
    leaves the base's tensors in memory bit-identical is tested above, through the same trainer.)"""
    root, db = real
    base = tmp_path / "base"
    tiny_base(family, vocab=len(db.tokenizer)).save_pretrained(base)
    db.tokenizer.save_pretrained(base)
    saved = load_file(base / "model.safetensors")
    out = tmp_path / "run"
    command = f"retrofit --base {base} --db {db.path} --out {out} --cca-layers 2 --enc-depth 1"
    assert main((command + " --max-steps 2 --batch-size 4 --lr 1e-2 --no-progress").split()) == 0
    assert "trained 2/2 steps" in capsys.readouterr().out
    fitted = load_model(out)
    assert type(fitted) is RetroFitForCausalLM and fitted.config.cca_layers == [2]
    # safetensors de-duplicates tied weights on save; every tensor that was saved is unchanged
    state = fitted.base.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    trained = load_file(out / "model" / "model.safetensors")
    assert all(key.startswith("retrofit.") for key in trained)
    assert any("to_out" in key and trained[key].abs().max() > 0 for key in trained)  # the CCA moved
    assert main(["eval", str(out), "--db", str(db.path), "--no-progress"]) == 0
    assert "50-100%" in capsys.readouterr().out
