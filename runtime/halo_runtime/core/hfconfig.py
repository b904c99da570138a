"""An HF LLaMA `config.json` -> ModelConfig: the one reader, for the compiler and for draft checkpoints.

Example:
    >>> from halo_runtime.core.hfconfig import ConfigError, config_from_hf
    >>> base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
    ...         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    >>> config_from_hf(base, "config.json").head_dim
    8
    >>> config_from_hf({**base, "model_type": "gpt2"}, "c.json")
    Traceback (most recent call last):
    halo_runtime.core.hfconfig.ConfigError: c.json: unsupported architecture 'gpt2' (HALO supports LLaMA-architecture models)
"""
from __future__ import annotations

from .config import ModelConfig


class ConfigError(ValueError):
    """A config.json HALO cannot run; the message is one line naming the file and field."""


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """Map an HF LLaMA config.json dict onto ModelConfig; `where` names the file in errors."""
    arch = cfg.get("model_type")
    if arch != "llama":
        raise ConfigError(f"{where}: unsupported architecture {arch!r} (HALO supports LLaMA-architecture models)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{where}: {flag} is true; HALO supports bias-free LLaMA layers only")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {cfg['hidden_act']!r} unsupported (HALO supports silu)")

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}: missing field {key!r}")
        return cfg[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in rope}}
    else:
        raise ConfigError(f"{where}: rope type {rope_type!r} unsupported (HALO supports default and llama3)")
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=int(need("num_hidden_layers")),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=scaling, max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
