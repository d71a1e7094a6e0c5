"""From a retrieval database to model inputs: the dataset, the document split and the collator."""

from retlm.data.collator import IGNORE_INDEX, RetroCollator
from retlm.data.retro_dataset import RETRODataset
from retlm.data.split import (
    DocumentSplit,
    SplitSequences,
    open_database,
    sequence_doc_ids,
    split_datasets,
    spread_subset,
)

__all__ = [
    "IGNORE_INDEX",
    "DocumentSplit",
    "RETRODataset",
    "RetroCollator",
    "SplitSequences",
    "open_database",
    "sequence_doc_ids",
    "split_datasets",
    "spread_subset",
]
