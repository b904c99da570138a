"""The shape and numerics of a LLaMA-architecture decoder: the one ModelConfig, free of any array
library, so that a plan (and a board that only reads one) needs nothing heavier to describe a model.

Example:
    >>> from halo_runtime.core.config import ModelConfig
    >>> cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2, head_dim=2)
    >>> cfg.group_size
    2
    >>> ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
    ...             num_heads=3, num_kv_heads=2, head_dim=2)
    Traceback (most recent call last):
    ...
    ValueError: model config: num_heads 3 is not a multiple of num_kv_heads 2
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-architecture decoder."""

    vocab_size: int
    """Number of token ids."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """MLP neurons per layer."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (GQA); each serves num_heads // num_kv_heads query heads."""
    head_dim: int
    """Width of one attention head."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: dict | None = None
    """None for plain RoPE, or llama3 scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}."""
    max_position_embeddings: int = 2048
    """Longest context the checkpoint was trained for."""
    tie_word_embeddings: bool = False
    """True when the LM head reuses the token embedding matrix."""
    bos_token_id: int | None = None
    """Token prepended to prompts, if the model uses one."""
    eos_token_id: int | None = None
    """Token that ends generation."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("llama3", "default"):
            raise ValueError(f"model config: unsupported rope_scaling {self.rope_scaling.get('rope_type')!r} "
                             "(supported: default, llama3)")

    @property
    def group_size(self) -> int:
        """Query heads that read one KV head."""
        return self.num_heads // self.num_kv_heads
