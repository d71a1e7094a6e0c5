"""torch Datasets over the retrieval database's memmaps."""

from retlm.data.retro_dataset import RETRODataset

__all__ = ["RETRODataset"]
