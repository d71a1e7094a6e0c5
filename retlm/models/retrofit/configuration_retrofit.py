"""RetroFitConfig: what a RETRO-fitted causal LM adds to its base, and which base it names.

The base itself (its weights and its own config) is not copied: ``base_model_name_or_path`` names it
(a local folder, stored as an absolute path, or a Hub name), and ``base_config`` keeps the base's
config as it was when the adapter was trained, so that loading can refuse a different base.
"""

from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedConfig

from retlm.layers.neighbor_encoder import CCA_QUERY_POSITIONS, RetrievalLayersConfig

# The base's config fields that an adapter depends on; loading refuses a base that differs in one.
BASE_SIGNATURE = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def default_cca_layers(num_layers: int) -> list[int]:
    """The RETRO paper's default placement, every third layer from the sixth (1-based: 6, 9, 12, ...).

    A base with fewer than six layers gets every second layer from the second (2, 4, ...; as
    ``retro-tiny``), and a one-layer base its only layer.
    """
    if num_layers < 1:
        raise ValueError(f"the base must have at least one decoder layer, got {num_layers}")
    return list(range(6, num_layers + 1, 3)) or list(range(2, num_layers + 1, 2)) or [num_layers]


def check_cca_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """``layers`` as a sorted list of distinct 1-based layer numbers of a ``num_layers``-layer base."""
    chosen = sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 1 <= layer <= num_layers]
    if not chosen or bad:
        raise ValueError(
            f"CCA layers must be decoder layer numbers in 1..{num_layers} (1-based, the CCA follows that "
            f"layer); got {sorted(layers) if not bad else bad}"
        )
    return chosen


class RetroFitConfig(PreTrainedConfig):
    """Configuration of :class:`~retlm.models.retrofit.RetroFitForCausalLM`.

    Args:
        base_model_name_or_path: the frozen base (local folder or Hub name).
        base_config: the base's config as a dict (``base.config.to_dict()``).
        base_signature: the :data:`BASE_SIGNATURE` fields of the base (see :func:`signature_of`).
        cca_layers: 1-based numbers of the base's decoder layers that a chunked cross-attention follows
            (default :func:`default_cca_layers`).
        chunk_size, pad_id: the retrieval database's chunk length and padding id.
        max_seq_len: longest sequence the base accepts (its position table; None: unbounded).
        enc_dim, enc_depth: width and depth of the RETRO encoder of the neighbors (default width: the
            base's hidden size capped at 896, the paper's encoder width; depth 2, as the paper).
        heads, dim_head: attention heads of the encoder and of every CCA (default: the base's heads, and
            ``hidden_size // heads``).
        rotary_dim, ff_mult, norm_eps, cca_query_positions, enc_attn_dropout, enc_ff_dropout,
            cca_dropout: as in :class:`~retlm.models.retro.RetroConfig`.
        hidden_size, num_hidden_layers, vocab_size, embedding_dim: the base's width, depth, vocabulary and
            input-embedding width (filled from the base by ``RetroFitForCausalLM.from_base``).
    """

    model_type = "retrofit"

    base_model_name_or_path: str | None = None
    base_config: dict[str, Any] | None = None
    base_signature: dict[str, Any] | None = None
    cca_layers: list[int] | None = None
    chunk_size: int = 64
    pad_id: int = 0
    max_seq_len: int | None = None
    enc_dim: int | None = None
    enc_depth: int = 2
    heads: int | None = None
    dim_head: int | None = None
    rotary_dim: int | None = None
    ff_mult: int = 4
    norm_eps: float = 1e-8
    cca_query_positions: str = "paper"
    enc_attn_dropout: float = 0.0
    enc_ff_dropout: float = 0.0
    cca_dropout: float = 0.0
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    embedding_dim: int | None = None
    tie_word_embeddings: bool = False  # the base ties its own weights, if it does
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.cca_query_positions not in CCA_QUERY_POSITIONS:
            raise ValueError(
                f"unknown cca_query_positions {self.cca_query_positions!r}; "
                f"expected one of {CCA_QUERY_POSITIONS}"
            )
        for name in ("chunk_size", "enc_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.base_config = dict(self.base_config) if self.base_config is not None else None
        self.base_signature = dict(self.base_signature) if self.base_signature is not None else None
        self.embedding_dim = self.embedding_dim or self.hidden_size
        if self.num_hidden_layers:
            layers = self.cca_layers
            self.cca_layers = (
                check_cca_layers(layers, self.num_hidden_layers)
                if layers is not None
                else default_cca_layers(self.num_hidden_layers)
            )
        elif self.cca_layers is not None:
            self.cca_layers = list(self.cca_layers)
        hidden, heads = self.hidden_size, self.heads
        self.enc_dim = self.enc_dim or (min(hidden, 896) if hidden else None)
        self.dim_head = self.dim_head or (hidden // heads if hidden and heads else None)
        self.pad_token_id = self.pad_id if self.pad_token_id is None else self.pad_token_id
        super().__post_init__(**kwargs)

    def retrieval_layers(self) -> RetrievalLayersConfig:
        """The shape of the adapter's retrieval layers: the encoder reads ``enc_dim`` neighbor vectors and
        cross-attends to, and projects out to, the base's ``hidden_size``."""
        if not (self.hidden_size and self.num_hidden_layers and self.heads and self.cca_layers):
            raise ValueError(
                "this RetroFitConfig names no base shape; build it with RetroFitForCausalLM.from_base"
            )
        return RetrievalLayersConfig(
            enc_dim=self.enc_dim,
            dec_dim=self.hidden_size,
            enc_depth=self.enc_depth,
            heads=self.heads,
            dim_head=self.dim_head,
            rotary_dim=self.rotary_dim,
            chunk_size=self.chunk_size,
            ff_mult=self.ff_mult,
            norm_eps=self.norm_eps,
            cca_query_positions=self.cca_query_positions,
            enc_attn_dropout=self.enc_attn_dropout,
            enc_ff_dropout=self.enc_ff_dropout,
            dec_attn_dropout=self.cca_dropout,
        )


def signature_of(config: Any) -> dict[str, Any]:
    """The :data:`BASE_SIGNATURE` fields of a base's config object (its attribute names resolved, so that
    GPT-2's ``n_embd`` reads as ``hidden_size``)."""
    return {name: getattr(config, name, None) for name in BASE_SIGNATURE}
