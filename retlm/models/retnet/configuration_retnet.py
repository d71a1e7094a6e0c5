"""RetNet configuration: syncdoth/RetNet's field names plus the switches needed to express torchscale
exactly. Two fields were renamed so that each name means one thing: ``forward_impl`` is
``retention_mode`` and ``chunk_size`` (the chunkwise block, not a retrieval chunk) is
``retention_block_size``; configs with the old keys still load, with a DeprecationWarning."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import yaml
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from retlm.ops.retention import RETENTION_MODES, USE_DEFAULT_GAMMA, check_block_size
from retlm.utils import renamed_argument

NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_ENCODINGS = ("rotary", "xpos")
CONFIGS_DIR = Path(__file__).parent / "configs"
# Old field -> new field; the old keys still load (config.json, yaml, keyword) for one release.
RENAMED_FIELDS = {"forward_impl": "retention_mode", "chunk_size": "retention_block_size"}


def warn_renamed(old: str, new: str) -> None:
    warnings.warn(f"RetNetConfig.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def renamed_retention_kwargs(
    kwargs: dict, retention_mode: str | None, retention_block_size: int | None
) -> tuple[str | None, int | None]:
    """``(retention_mode, retention_block_size)``, taking their deprecated names ``forward_impl`` and
    ``chunk_size`` out of a forward's ``kwargs`` (kept for one release, with a DeprecationWarning)."""
    if "forward_impl" in kwargs:
        retention_mode = renamed_argument(
            "RetNet", "forward_impl", "retention_mode", kwargs.pop("forward_impl"), retention_mode
        )
    if "chunk_size" in kwargs:
        retention_block_size = renamed_argument(
            "RetNet", "chunk_size", "retention_block_size", kwargs.pop("chunk_size"), retention_block_size
        )
    return retention_mode, retention_block_size


class RetNetConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: number of token ids.
        hidden_size: model width d.
        num_layers: number of RetNet blocks.
        num_heads: retention heads H.
        qk_dim: total query/key width (default d; head key dim = qk_dim / H).
        v_dim: total value width (default 2d).
        ffn_proj_size: feed-forward inner width (default 2d).
        use_default_gamma: decays 1 - 2^(-5-h) (torchscale) if True, else the paper's LM schedule
            1 - exp(linspace(log 1/32, log 1/512, H)).
        retention_mode: default retention mode, "parallel" | "chunkwise" | "recurrent" (was
            ``forward_impl``).
        retention_block_size: default block length of the chunkwise mode (was ``chunk_size``).
        norm_type: "rmsnorm" (torchscale) or "layernorm" (syncdoth/RetNet) for the block and final norms.
        norm_eps: epsilon of every norm, the per-head retention norm included (torchscale `layernorm_eps`).
        use_glu: GLU feed-forward ``fc2(act(fc1 x) * gate x)`` (torchscale) or plain ``fc2(act(fc1 x))``.
        activation: any `transformers.ACT2FN` key ("gelu" is the exact erf GELU, "swish").
        use_bias_in_msr / use_bias_in_msr_out / use_bias_in_mlp: biases on the q,k,v,g projections /
            the retention output projection / the feed-forward layers.
        scale_embedding: multiply token embeddings by sqrt(d) (torchscale: ``not no_scale_embedding``).
        layernorm_embedding: normalise the embeddings before the first block.
        position_encoding: "rotary" (torchscale's frequencies, interleaved) or "xpos".
        rotary_base / xpos_scale_base: rotation base and xpos scale base.
        dropout / activation_dropout: dropout on block outputs / inside the feed-forward.
        tie_word_embeddings: share the embedding matrix with the LM head.
    """

    model_type = "retnet"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}

    vocab_size: int = 50257
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 8
    qk_dim: int | None = None
    v_dim: int | None = None
    ffn_proj_size: int | None = None
    use_default_gamma: bool = USE_DEFAULT_GAMMA
    retention_mode: str = "parallel"
    retention_block_size: int = 512
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    use_glu: bool = True
    activation: str = "gelu"
    use_bias_in_msr: bool = False
    use_bias_in_msr_out: bool = False
    use_bias_in_mlp: bool = False
    scale_embedding: bool = False
    layernorm_embedding: bool = False
    position_encoding: str = "rotary"
    rotary_base: float = 10000.0
    xpos_scale_base: float = 512.0
    dropout: float = 0.0
    activation_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        for old, new in RENAMED_FIELDS.items():
            if old in kwargs:
                warn_renamed(old, new)
                setattr(self, new, kwargs.pop(old))
        self.qk_dim = self.qk_dim or self.hidden_size
        self.v_dim = self.v_dim or 2 * self.hidden_size
        self.ffn_proj_size = self.ffn_proj_size or 2 * self.hidden_size
        super().__post_init__(**kwargs)
        self.validate_retnet()

    def validate_retnet(self) -> None:
        """Raise ValueError naming the first inconsistent field and its allowed values."""
        choices = {
            "retention_mode": RETENTION_MODES,
            "norm_type": NORM_TYPES,
            "position_encoding": POSITION_ENCODINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {allowed}")
        if self.activation not in ACT2FN:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACT2FN)}")
        check_block_size(self.retention_block_size, "retention_block_size")
        for name in ("qk_dim", "v_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be divisible by num_heads ({self.num_heads})"
                )
        if (self.qk_dim // self.num_heads) % 2:
            raise ValueError(f"the key head dim qk_dim/num_heads = {self.key_dim} must be even")

    @property
    def forward_impl(self) -> str:
        """Deprecated name of :attr:`retention_mode`."""
        warn_renamed("forward_impl", "retention_mode")
        return self.retention_mode

    @forward_impl.setter
    def forward_impl(self, value: str) -> None:
        warn_renamed("forward_impl", "retention_mode")
        self.retention_mode = value

    @property
    def chunk_size(self) -> int:
        """Deprecated name of :attr:`retention_block_size`."""
        warn_renamed("chunk_size", "retention_block_size")
        return self.retention_block_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        warn_renamed("chunk_size", "retention_block_size")
        self.retention_block_size = value

    @property
    def key_dim(self) -> int:
        """Per-head query/key width."""
        return self.qk_dim // self.num_heads

    @property
    def head_value_dim(self) -> int:
        """Per-head value width."""
        return self.v_dim // self.num_heads


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """A yaml path as given, or else the bundled config of that name (``configs/retnet-1.3b.yml``,
    ``retnet-1.3b.yml`` and ``retnet-1.3b`` all find the packaged file)."""
    path = Path(path)
    if path.exists():
        return path
    for candidate in (CONFIGS_DIR / path.name, CONFIGS_DIR / f"{path.name}.yml"):
        if candidate.exists():
            return candidate
    bundled = sorted(p.stem for p in CONFIGS_DIR.glob("*.yml"))
    raise FileNotFoundError(f"no config file {str(path)!r}; bundled configs are {bundled}")


def load_config_from_yaml(path: str | os.PathLike[str]) -> RetNetConfig:
    """Read a RetNetConfig from a yaml file of its fields (named and laid out as syncdoth/RetNet's)."""
    with open(resolve_config_path(path)) as f:
        fields = yaml.safe_load(f)
    return RetNetConfig.from_dict(fields)
