"""The HF idioms users already know (issue #21): after a bare ``import retlm`` in a fresh process,
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` load all three retlm model types from a run
folder and from its ``model/`` folder, with the logits of retlm's own loader (and loading another
model type imports no retlm model code); ``pipeline("text-generation")`` works for a RetNet folder and a
RETRO-fit run (retrieval off), with the tokens of a direct greedy ``generate``; every run's ``model/``
carries a Hub model card whose figures are the run's.

Runs are tiny and real: RETRO and a RETRO-fit of a small GPT-2 trained 2 steps on the synthetic twin
database (tests/helpers/training_helpers.py), with a 64-word tokenizer so that the folders hold one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import open_twin_database, tiny_model_config, write_twin_database

from retlm import RetNetConfig, RetNetForCausalLM
from retlm.models.auto import load_model, verify_model_dir
from retlm.training import train
from retlm.training.model_card import write_model_card
from retlm.training.retrofit import retrofit

FAST = dict(batch_size=4, lr=1e-2, log_every=1, progress=False, max_steps=2, eval_every=2, save_every=None)
PROMPT_IDS = [5, 9, 17, 4, 30, 22, 11, 8, 40, 6, 12, 13, 50, 7, 9, 21]  # two chunks of 8


def word_tokenizer():
    """A real fast tokenizer for the twin database's 64 ids: ``w4 w5 ...`` (0 pad, 1 unk, 2 eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<s>": 3, **{f"w{i}": i for i in range(4, 64)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<s>"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    db = open_twin_database(write_twin_database(root / "db"))
    db.tokenizer = word_tokenizer()  # saved with the weights by the trainer
    train(db, tiny_model_config(), root / "retro", **FAST)
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=3, eos_token_id=2
    )
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    word_tokenizer().save_pretrained(root / "gpt2")  # the base's tokenizer, which retrofit checks
    retrofit(str(root / "gpt2"), db, root / "retrofit", cca_layers=[2], enc_depth=1, **FAST)
    retnet = RetNetForCausalLM(
        RetNetConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, v_dim=64, ffn_proj_size=64)
    )
    retnet.save_pretrained(root / "retnet" / "model")  # a run folder's layout
    word_tokenizer().save_pretrained(root / "retnet" / "model")
    return {"retnet": root / "retnet", "retro": root / "retro", "retrofit": root / "retrofit"}


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import retlm  # nothing else from retlm: the Auto classes must know its types now
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    runs, out, ids = json.loads(sys.argv[1]), sys.argv[2], torch.tensor([json.loads(sys.argv[3])])
    AutoConfig.from_pretrained(sys.argv[4])  # another model type: no retlm model code is imported
    report = {"model code for gpt2": [m for m in sys.modules if m.startswith("retlm.models.")]}
    for name, run in runs.items():
        for where in (run, run + "/model"):
            config = AutoConfig.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where).eval()
            with torch.no_grad():
                np.save(f"{out}/{name}-{where == run}.npy", model(ids).logits.double().numpy())
            report[f"{name} {where == run}"] = [type(config).__name__, type(model).__name__]
        if name != "retrofit":
            report[f"{name} AutoModel"] = type(AutoModel.from_pretrained(run)).__name__
    print(json.dumps(report))
    """
)


@pytest.mark.heavy
def test_auto_classes_after_a_bare_import_in_a_fresh_process(runs, tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in runs.items()}), str(tmp_path)]
        + [json.dumps(PROMPT_IDS), str(runs["retro"].parent / "gpt2")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert sorted(report.pop("model code for gpt2")) == ["retlm.models.registration"]
    classes = {
        "retnet": ["RetNetConfig", "RetNetForCausalLM"],
        "retro": ["RetroConfig", "RetroForCausalLM"],
        "retrofit": ["RetroFitConfig", "RetroFitForCausalLM"],
    }
    ids = torch.tensor([PROMPT_IDS])
    for name, run in runs.items():
        with torch.no_grad():  # retlm's own loader (checksums verified) gives the reference
            expected = load_model(run).eval()(ids).logits.double().numpy()
        for from_run in (True, False):
            assert report[f"{name} {from_run}"] == classes[name], (name, from_run)
            got = np.load(tmp_path / f"{name}-{from_run}.npy")
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=name)
    assert report["retnet AutoModel"] == "RetNetModel" and report["retro AutoModel"] == "RetroModel"


@pytest.mark.heavy
def test_pipeline_text_generation_for_retnet_and_a_retrofit_run_without_retrieval(runs):
    """From the folders' own tokenizers; the tokens are those of a direct greedy ``generate``."""
    from transformers import pipeline

    prompt = word_tokenizer()("w5 w9 w17 w4", return_tensors="pt")["input_ids"]
    assert prompt[0].tolist() == [5, 9, 17, 4]
    for name, where in (("retnet", runs["retnet"] / "model"), ("retrofit", runs["retrofit"])):
        generate = pipeline("text-generation", model=str(where))
        out = generate("w5 w9 w17 w4", max_new_tokens=6, do_sample=False, return_tensors=True)
        model = load_model(runs[name]).eval()
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)[0]
        assert len(tokens) == prompt.shape[1] + 6
        assert [int(i) for i in out[0]["generated_token_ids"]] == tokens.tolist(), name
        text = generate("w5 w9 w17 w4", max_new_tokens=6, do_sample=False)[0]["generated_text"]
        assert text.startswith("w5 w9 w17 w4") and len(text.split()) >= 4


def test_the_registered_types_are_the_config_classes():
    from retlm import RetNetConfig, RetroConfig, RetroFitConfig
    from retlm.models.registration import MODEL_TYPES

    assert MODEL_TYPES == tuple(c.model_type for c in (RetNetConfig, RetroConfig, RetroFitConfig))


def test_a_run_folder_is_taken_where_a_model_folder_is(runs):
    from transformers import AutoConfig, AutoTokenizer

    from retlm.models.registration import local_model_dir

    assert local_model_dir(runs["retro"]) == str(runs["retro"] / "model")
    assert local_model_dir(runs["retro"] / "model") == runs["retro"] / "model"  # a model folder: as is
    assert local_model_dir("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert AutoTokenizer.from_pretrained(runs["retrofit"]).convert_tokens_to_ids("w9") == 9
    assert AutoConfig.from_pretrained(runs["retro"]).chunk_size == 8


def card_of(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_every_run_model_folder_has_a_model_card_with_the_runs_figures(runs):
    metrics = [json.loads(line) for line in (runs["retro"] / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in metrics if "eval_loss" in r][-1]
    card = card_of(runs["retro"] / "model")
    assert card.data.library_name == "retlm" and card.data.pipeline_tag == "text-generation"
    assert {"retlm", "retro", "retnet", "retrieval-augmented-generation"} <= set(card.data.tags)
    assert card.data.base_model is None  # trained from scratch
    text = card.text
    assert f"| with retrieval | {last_eval['eval_loss']:.4f} | {last_eval['eval_perplexity']:.2f} |" in text
    no_retrieval = last_eval["eval_loss_no_retrieval"], last_eval["eval_perplexity_no_retrieval"]
    assert f"| without retrieval | {no_retrieval[0]:.4f} | {no_retrieval[1]:.2f} |" in text
    manifest = json.loads((runs["retro"].parent / "db" / "manifest.json").read_text())
    row = f"| {manifest['num_docs']} | {manifest['num_chunks']} | 8 | 2 | toy-letters (64 tokens) |"
    assert row in text
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert "| steps | 2 (planned 2) |" in text and f"| last training loss | {losses[-1]:.4f} |" in text
    parameters = sum(p.numel() for p in load_model(runs["retro"]).parameters())
    assert f"- parameters: {parameters:,}" in text
    verify_model_dir(runs["retro"] / "model")  # the card is sealed with the weights

    fit = card_of(runs["retrofit"] / "model")
    assert "retrofit" in fit.data.tags and fit.data.base_model is None  # a local base: named in the text
    base = (runs["retrofit"].parent / "gpt2").resolve()
    assert f"base model (frozen; only the retrieval adapter was trained): `{base}`" in fit.text


def test_a_hub_base_and_hub_datasets_go_into_the_front_matter(runs, tmp_path):
    config = load_model(runs["retrofit"]).config
    config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M"
    run = json.loads((runs["retrofit"] / "retlm_run.json").read_text())
    run["database_summary"]["sources"] = [
        {"source": "allenai/c4", "format": "hf-hub", "documents": 10, "text_field": "text"},
        {"source": "/data/local.jsonl", "format": "jsonl", "documents": 5, "text_field": "body"},
    ]
    (tmp_path / "retlm_run.json").write_text(json.dumps(run))
    write_model_card(tmp_path, tmp_path, config, global_step=2)
    card = card_of(tmp_path)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and card.data.datasets == ["allenai/c4"]
    assert "- source: `/data/local.jsonl` (jsonl, text field `body`): 5 documents" in card.text
    assert "No held-out evaluation" in card.text  # no metrics.jsonl in this folder
