"""What every scorer of a model on a ``RETRODataset`` shares: the summed score (``Score``), the loss of
already shifted labels (``causal_lm_loss``) and the batches of one rank's share (``scoring_batches``).
Used by the held-out evaluation (:mod:`retlm.training.evaluation`) and the overlap buckets
(:mod:`retlm.training.leakage`); neither imports the other for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from retlm.data import IGNORE_INDEX, RetroCollator


@dataclass
class Score:
    """Sums over scored tokens; the ratios are properties."""

    nll: float  # natural-log negative log-likelihood, summed
    tokens: int
    bytes: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits (batch, seq, vocab)`` against already shifted ``labels (batch, seq)``."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def _shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def scoring_batches(
    dataset: Dataset, batch_size: int, collate: RetroCollator, rank: int, world_size: int, desc: str | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of this rank's share of ``dataset``, with a progress bar when ``desc`` is set."""
    loader = DataLoader(_shard(dataset, rank, world_size), batch_size=batch_size, collate_fn=collate)
    return iter(tqdm(loader, desc=desc, leave=False, dynamic_ncols=True) if desc else loader)
