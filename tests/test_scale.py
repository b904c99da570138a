"""benchmarks/scale.py's fast path: a tiny random checkpoint written layer by layer, compiled in a
fresh process with per-step timing, and the lazily read checkpoint it relies on."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import scale

STEPS = {"load", "profile", "group", "score", "compensate", "predict", "place", "emit"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from tinytok import VOCAB_SIZE, write_tiny_tokenizer

    root = tmp_path_factory.mktemp("scale")
    tok = root / "tok"
    tok.mkdir()
    write_tiny_tokenizer(tok / "tokenizer.json", VOCAB_SIZE)
    shape = scale.Shape("tiny", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=VOCAB_SIZE,
                        tie=False, calib_tokens=256)
    return shape, scale.write_checkpoint(root / "ckpt", shape, seed=0, tokenizer_dir=tok), root


def test_checkpoint_is_bf16_one_layer_per_file(tiny_ckpt):
    from safetensors import safe_open

    from halo_compile.load import load_model

    shape, ckpt, _ = tiny_ckpt
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == shape.layers + 2 and (ckpt / "tokenizer.json").is_file()
    with safe_open(str(ckpt / index["model.layers.1.mlp.up_proj.weight"]), framework="pt") as st:
        assert st.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.bfloat16
    m = load_model(str(ckpt), progress=False)
    assert m.config.intermediate_size == 96 and not m.config.tie_word_embeddings
    assert len(m.weights) == len(index)
    assert sum(s.numel() for s in m.shapes.values()) == scale.parameters(shape)
    assert m.weights["model.layers.2.mlp.down_proj.weight"].dtype == torch.float32
    # the same seed writes the same weights
    again = scale.write_checkpoint(tiny_ckpt[2] / "again", shape, seed=0, tokenizer_dir=ckpt)
    assert load_model(str(again), progress=False).fingerprint == m.fingerprint


def test_compile_records_every_step(tiny_ckpt):
    from halo_compile.verify import verify_plan

    shape, ckpt, root = tiny_ckpt
    profile = root / "cluster.yaml"
    profile.write_text(scale.profile_yaml(shape, "q8_0"))
    rec = scale.run_compile(ckpt, profile, root / "plan", "q8_0", shape.calib_tokens, timeout=600)
    assert set(rec["steps"]) == STEPS
    for step in rec["steps"].values():
        assert set(step) == {"wall_s", "cpu_s", "peak_rss_mb", "calls"} and step["peak_rss_mb"] > 0
    assert rec["steps"]["profile"]["calls"] == shape.layers + 1 and rec["steps"]["group"]["calls"] == shape.layers
    assert set(rec["total"]) == {"wall_s", "cpu_s", "peak_rss_mb"}
    assert rec["plan"]["weights"] == "q8_0" and rec["plan"]["devices_used"] >= 2  # the profile makes it spread
    assert 0 <= rec["plan"]["recall_min"] <= rec["plan"]["recall_mean"] <= 1
    verify_plan(root / "plan", str(ckpt))
    table = scale.markdown([{**rec, "shape": "tiny", "parameters": scale.parameters(shape), "loadavg": [1.0, 1.5]}])
    assert table.count("\n") == 3 and "| tiny |" in table


def test_profile_reads_one_layer_at_a_time(tiny_ckpt):
    """Memory is bounded by one layer: layer i+1 is not read before layer i has been handed over."""
    import dataclasses
    from collections.abc import Mapping

    from halo_compile.load import load_model
    from halo_compile.profiling import profile_layers

    shape, ckpt, _ = tiny_ckpt
    m = load_model(str(ckpt), progress=False)
    reads = []

    class Spy(Mapping):
        def __getitem__(self, name):
            reads.append(name)
            return m.weights[name]

        def __iter__(self):
            return iter(m.weights)

        def __len__(self):
            return len(m.weights)

    spied = dataclasses.replace(m, weights=Spy())
    for i, stats, w in profile_layers(spied, [list(range(3, 40))] * 2, sample_tokens=16, progress=False):
        later = {r for r in reads if r.startswith("model.layers.") and int(r.split(".")[2]) > i}
        assert not later and len(w) == 9 and stats.mlp_in.shape == (16, shape.hidden)
    assert len(reads) == 1 + 9 * shape.layers  # the embeddings once, each layer tensor once


@pytest.mark.slow
def test_formats_end_to_end_benchmark_runs_small(tiny_ckpt, tmp_path):
    """benchmarks/e2e.py on the tiny shape: every format on 1 and 4 devices, tokens equal across counts."""
    from benchmarks import e2e

    shape, ckpt, _ = tiny_ckpt
    rec = e2e.run_e2e(str(ckpt), tmp_path, e2e.write_profiles(shape, tmp_path / "profiles", scale.profile_yaml),
                      calib_tokens=256, max_tokens=4, reps=1)
    assert set(rec["tpot_p50_ms"]) == {name for name, _, _ in e2e.CONFIGS}
    assert set(rec["tokens_equal_across_devices"]) == set(e2e.FORMATS)  # q8_0 and q4_0 among them
    assert all(rec["tokens_equal_across_devices"].values())
    assert all(len(r[0]["tokens"]) == 4 for r in rec["runs"].values())
    e2e.plot(rec, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0
