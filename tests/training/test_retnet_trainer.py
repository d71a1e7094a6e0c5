"""RetNet under transformers.Trainer with gradient checkpointing: the loss falls on a small text, and
checkpointed gradients equal plain ones."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from retlm import RetNetConfig, RetNetForCausalLM
from retlm.compat import output_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (
    "Retention networks replace attention with a decaying recurrence. "
    "The same function can be computed in parallel, in chunks, or one token at a time. "
    "Parallel training is fast, recurrent decoding is cheap, and chunks sit in between. "
) * 6


class CharacterDataset(Dataset):
    """Fixed-length windows of a text, one token per byte; labels equal inputs (the model shifts)."""

    def __init__(self, text: str, seq_len: int) -> None:
        self.data = torch.tensor(list(text.encode()), dtype=torch.long)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len) // 8

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        window = self.data[idx * 8 : idx * 8 + self.seq_len]
        return {"input_ids": window, "labels": window.clone()}


def tiny_model(**overrides) -> RetNetForCausalLM:
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        v_dim=128,
        ffn_proj_size=128,
        retention_block_size=16,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(**fields))


# A late transformers 5 release renamed gradient_checkpointing to activation_checkpointing; where the
# new name exists both spellings must work, and before it only the old one exists.
HAS_ACTIVATION_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")
NEW_NAME_ONLY_LATER = pytest.mark.skipif(
    not HAS_ACTIVATION_CHECKPOINTING, reason="this transformers has no activation_checkpointing yet"
)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "retention_mode, flag",
    [
        ("parallel", "gradient_checkpointing"),
        pytest.param("chunkwise", "activation_checkpointing", marks=NEW_NAME_ONLY_LATER),
        ("chunkwise", "gradient_checkpointing"),
    ],
)
@pytest.mark.heavy
def test_trainer_with_gradient_checkpointing_lowers_the_loss(
    tmp_path, retention_mode: str, flag: str
) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_model(retention_mode=retention_mode)
    args = TrainingArguments(
        **{flag: True},
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        warmup_steps=0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=CharacterDataset(TEXT, seq_len=32))
    trainer.train()

    assert model.model.gradient_checkpointing, "Trainer did not switch gradient checkpointing on"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5
    print(f"{retention_mode} losses: {losses}")
    assert losses[-1] < 0.6 * losses[0], f"loss did not fall: {losses}"


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_gradients_equal_plain_gradients(reentrant: bool) -> None:
    """Checkpointing recomputes every block in backward (its retention runs twice) and gives the
    gradients of a plain backward; no cache is returned while it is on."""
    ids = CharacterDataset(TEXT, seq_len=40)[0]["input_ids"][None].repeat(2, 1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(retention_mode="chunkwise").train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable({"use_reentrant": reentrant})
        runs = []
        for layer in model.model.layers:
            layer.retention.register_forward_pre_hook(lambda module, args, runs=runs: runs.append(module))
        out = model(ids, labels=ids, use_cache=True)
        out.loss.backward()
        assert (output_cache(out) is None) == checkpointing
        assert len(runs) == len(model.model.layers) * (2 if checkpointing else 1)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
