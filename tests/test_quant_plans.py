"""Quantised plans end to end: compile the tiny model in ggml's block formats (q8_0, q4_0), verify,
inspect, and run it on one device and on four.

A plan in format F stores the model quantised once, group by group, with MLP groups sized in whole
blocks of 32 neurons: so the stored model depends on the groups, never on their placement, and at
0% loss the 4-device plan's greedy tokens equal the 1-device plan's (in process and over loopback
with `--sync strict`). Also: the shards hold uint8 blocks, `verify` re-quantises the model and finds
the shards bit for bit, `inspect` reports the stored bytes, the replaced int8/int4 formats are
refused with one line (by the compiler and, for an old plan, by the runtime), and the fail-fast
memory check counts the chosen format.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, cluster_yaml
from halo_runtime.core.coordinator import Coordinator
from halo_runtime.core.exchange import InProcessExchange
from halo_runtime.core.formats import FORMATS
from halo_runtime.core.shards import FAILOVER_PREFIX, load_shard

from halo_compile.report import failover_disk_bytes

BLOCK_FORMATS = ["q8_0", "q4_0"]
PROMPT_IDS = [5, 17, 300, 42, 500]
REMOTE_MB = 0.05
"""Remote memory that makes the 4-device plan spread in both block formats."""
MB = 1024 * 1024


def _cli(module: str, *args, timeout=180) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root (as the README's commands run)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def compiled(tiny_vocab_dir, tmp_path_factory):
    """compiled(fmt, n) -> (plan, directory): n = 4 (one lossy device) or 1, same grouping options."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    made = {}

    def make(fmt: str, n: int):
        if (fmt, n) not in made:
            root = tmp_path_factory.mktemp(f"q-{fmt}-{n}")
            profile = root / "cluster.yaml"
            profile.write_text(cluster_yaml(n, lossy=1 if n > 1 else 0, remote_memory_mb=REMOTE_MB if n > 1 else None))
            # 96 MLP neurons in 3 groups: the only grouping of whole 32-neuron blocks with more than one group
            opts = CompileOptions(calib_tokens=1024, chunk_tokens=128, sample_tokens=512, mlp_groups=3,
                                  relaxed_share=0.3, max_context=256, solver_time=2.0, progress=False, weights=fmt)
            made[fmt, n] = compile_plan(str(tiny_vocab_dir), profile, root / "plan", opts)
        return made[fmt, n]

    return make


def _mlp_groups_are_whole_blocks(plan):
    for layer in range(plan.model.num_layers):
        sizes = [len(g.members) for g in plan.layer_groups(layer, "mlp")]
        assert len(sizes) > 1 and all(s % 32 == 0 for s in sizes), f"layer {layer}: {sizes}"
        members = sorted(n for g in plan.layer_groups(layer, "mlp") for n in g.members)
        assert members == list(range(plan.model.intermediate_size))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_shards_store_blocks_and_verify_passes(compiled, tiny_vocab_dir, fmt):
    plan, directory = compiled(fmt, 4)
    f = FORMATS[fmt]
    text = (directory / "plan.json").read_text()
    assert f'"weights": "{fmt}"' in text and '"weights_fingerprint"' in text
    _mlp_groups_are_whole_blocks(plan)
    cfg, workers = plan.model, 0
    for dev, report in zip(plan.device_names, plan.device_reports):
        shard = load_shard(directory, plan, dev)
        projections = {k: t for k, t in shard.items() if k.endswith("_proj")}
        for name, t in projections.items():  # rows of whole blocks: 34 (q8_0) or 18 (q4_0) bytes per 32 inputs
            assert t.dtype == np.uint8 and t.ndim == 2 and t.shape[1] % f.block_bytes == 0, name
        for name in [k for k in shard if k.endswith("layernorm") or k == "norm"]:
            assert shard[name].dtype == np.float32 and shard[name].shape == (cfg.hidden_size,), name
        if dev == plan.coordinator:
            assert shard["embed_tokens"].dtype == np.uint8
            assert shard["embed_tokens"].shape == f.stored_shape(cfg.vocab_size, cfg.hidden_size)
        elif projections:
            workers += 1
            # the plan counts what a worker stores: its shard is those bytes exactly, besides the
            # groups it keeps for failover (counted by inspect, `report.failover_disk_bytes`)
            own = sum(t.nbytes for k, t in shard.items() if not k.startswith(FAILOVER_PREFIX))
            assert report.weight_bytes == own
        kept = sum(t.nbytes for k, t in shard.items() if k.startswith(FAILOVER_PREFIX))
        assert kept == failover_disk_bytes(plan).get(dev, 0), dev
    assert workers >= 2, "the 4-device plan should spread"
    proc = _cli("halo_compile.cli", "verify", directory, "--model", tiny_vocab_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert all(line.startswith("ok  ") for line in lines) and len(lines) == 3, proc.stdout
    assert f"{fmt} weights reassemble to the plan's quantised model (fingerprint {plan.weights_fingerprint[:12]})" \
        in lines[1]
    assert f"quantised to {fmt} by the plan's groups is what the shards hold, bit for bit" in lines[2]


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_verify_catches_a_changed_block(compiled, tmp_path, fmt):
    """One scale byte of one block on one worker: the reassembled model's fingerprint tells."""
    import hashlib

    from halo_runtime.core.plan import PlanError
    from safetensors.numpy import load_file, save_file

    from halo_compile.verify import verify_plan

    plan, directory = compiled(fmt, 4)
    copy = tmp_path / "plan"
    shutil.copytree(directory, copy)
    worker = next(d for d in plan.device_names[1:] if plan.groups_on(d, 0, "mlp"))
    name = plan.shard_file(worker)
    tensors = load_file(str(copy / name))
    tensors["layers.0.mlp.down_proj"][0, 1] ^= 0x40  # the high byte of the first block's fp16 scale
    save_file(tensors, str(copy / name))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((copy / name).read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PlanError) as e:
        verify_plan(copy)
    assert f"{fmt} weights fingerprint" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_inspect_shows_the_stored_bytes(compiled, fmt):
    plan, directory = compiled(fmt, 4)
    proc = _cli("halo_compile.cli", "inspect", directory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("weights:"))
    expected = ", ".join(f"{r.name} {r.weight_bytes / MB:.1f} MB" for r in plan.device_reports)
    assert line == f"weights: {fmt}, fingerprint {plan.weights_fingerprint[:12]}; stored bytes per device: {expected}"
    # and the reported bytes are the format's: the same model in q4_0 stores fewer than in q8_0
    one = {f: compiled(f, 1)[0].device_reports[0].weight_bytes for f in BLOCK_FORMATS}
    assert one["q4_0"] < one["q8_0"]


def _in_process(plan, directory, n=8):
    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards))
    gen = coord.generate(PROMPT_IDS, n, keep_logits=True)
    return gen.tokens, np.stack(gen.logits), shards


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_distributed_equals_single_device_in_process(compiled, fmt):
    plan4, dir4 = compiled(fmt, 4)
    plan1, dir1 = compiled(fmt, 1)
    assert plan4.weights == plan1.weights == fmt
    # the quantised model depends on the groups, never on where they are placed
    assert plan4.weights_fingerprint == plan1.weights_fingerprint != ""
    assert len({g.device for g in plan4.groups}) >= 3, "the 4-device plan should spread"
    tokens4, logits4, _ = _in_process(plan4, dir4)
    tokens1, logits1, shards1 = _in_process(plan1, dir1)
    assert tokens4 == tokens1
    # partial sums added in another order: the same logits to fp32 rounding
    assert np.abs(logits4 - logits1).max() <= 1e-4 * np.abs(logits1).max()
    # and they are the torch reference's of the dequantised model, to ggml's rounding of the inputs
    from halo_compile.reference import FullModel
    from halo_compile.slicing import assemble

    ref = FullModel(plan1.model, assemble(plan1, shards1))
    want = [ref.logits(torch.tensor(PROMPT_IDS))[-1]]
    for t in tokens1[:-1]:
        want.append(ref.logits(torch.tensor([t]))[-1])
    want = torch.stack(want).numpy()
    assert np.abs(logits1 - want).max() <= 0.03 * np.abs(want).max()


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_distributed_equals_single_device_over_loopback(compiled, fmt):
    runs = []
    for n in (4, 1):
        _, directory = compiled(fmt, n)
        proc = _cli("halo_runtime.cli", "local", "--plan", directory, "--prompt", "The capital of France is",
                    "--max-tokens", "8", "--ignore-eos", "--sync", "strict", "--wire", "fp32", "--plr", "0",
                    "--draft", "none", "--json", "--quiet", timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout))
    four, one = runs
    assert four["weights"] == one["weights"] == fmt
    assert len(four["tokens"]) == 8 and four["tokens"] == one["tokens"]
    assert set(four["devices"]) >= {"dev1", "dev2", "dev3"} and not one["devices"]
    assert all(d["computed"] > 0 for d in four["devices"].values())


@pytest.mark.parametrize("old,new", [("int8", "q8_0"), ("int4", "q4_0")])
def test_the_compiler_refuses_replaced_formats_with_one_line(tiny_vocab_dir, tmp_path, old, new):
    profile = tmp_path / "c.yaml"
    profile.write_text(cluster_yaml(1))
    proc = _cli("halo_compile.cli", "plan", tiny_vocab_dir, "--cluster", profile, "--weights", old,
                "-o", tmp_path / "out", timeout=120)
    # click's usage error: exit code 2, a usage line, a hint line, then the one line that says what to do
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error == (f"Error: Invalid value: weight format '{old}' was replaced by {new} (ggml's blocks of 32); "
                     f"recompile the plan with --weights {new}")
    assert not (tmp_path / "out").exists()


def test_the_runtime_refuses_an_old_int8_plan_with_one_line(compiled, tmp_path):
    _, directory = compiled("q8_0", 1)
    copy = tmp_path / "plan"
    shutil.copytree(directory, copy)
    plan_json = copy / "plan.json"
    plan_json.write_text(plan_json.read_text().replace('"weights": "q8_0"', '"weights": "int8"'))
    proc = _cli("halo_runtime.cli", "local", "--plan", copy, "--prompt", "hi", "--max-tokens", "2", "--json",
                "--quiet", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("halo-run: error: "), proc.stderr
    assert "weight format 'int8' was replaced by q8_0" in lines[0] and "--weights q8_0" in lines[0]


def test_check_blocks_names_the_dimension_that_is_not_whole_blocks():
    from halo_runtime.core.config import ModelConfig

    from halo_compile.load import ModelError
    from halo_compile.pipeline import check_blocks

    def cfg(**kw):
        base = {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_layers": 1, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 16}
        return ModelConfig(**{**base, **kw})

    for fmt in ("fp32", "bf16", "q8_0", "q4_0"):
        check_blocks(cfg(), fmt)  # the suite's tiny model fits every format
    for kw, dim in (({"hidden_size": 48, "num_heads": 3, "num_kv_heads": 3}, "hidden_size is 48"),
                    ({"intermediate_size": 80}, "intermediate_size is 80"),
                    ({"num_heads": 2, "num_kv_heads": 2, "head_dim": 24}, "x head_dim is 24")):
        for fmt in ("fp32", "bf16"):
            check_blocks(cfg(**kw), fmt)
        with pytest.raises(ModelError, match=re.escape(dim)):
            check_blocks(cfg(**kw), "q8_0")


def test_too_small_cluster_fails_before_profiling(tiny_vocab_dir, tmp_path):
    profile = tmp_path / "small.yaml"
    profile.write_text(cluster_yaml(2, memory_mb=0.05, remote_memory_mb=0.05))
    started = time.perf_counter()
    proc = _cli("halo_compile.cli", "plan", tiny_vocab_dir, "--cluster", profile, "--weights", "q8_0",
                "-o", tmp_path / "out", timeout=120)
    elapsed = time.perf_counter() - started
    lines = [line for line in proc.stderr.strip().splitlines() if "Writing model shards" not in line]
    assert proc.returncode == 2 and lines[0].startswith("[1/7] load"), proc.stderr
    error = lines[-1]   # the only line after loading: profiling ([2/7]) never started
    assert len(lines) == 2 and error.startswith("halo-compile: error: "), proc.stderr
    assert "q8_0 weights" in error and "short by" in error and "the cluster has" in error
    # under 15 s on an idle machine (interpreter start-up dominates); generous for a busy shared one
    assert elapsed < 60 and not (tmp_path / "out").exists()


def test_capacity_counts_the_chosen_format(tiny_vocab_dir):
    from halo_runtime.core.plan import Device

    from halo_compile.load import load_model
    from halo_compile.place import InfeasibleError, check_capacity

    m = load_model(str(tiny_vocab_dir), progress=False)
    # 0.2 MB: the tiny model's q8_0 and q4_0 weights and KV cache fit, its fp32 weights do not
    devices = [Device("a", "127.0.0.1:1", 200_000, 1.0)]
    for fmt in BLOCK_FORMATS:
        check_capacity(m.config, devices, "a", m.weights, 64, fmt)
    with pytest.raises(InfeasibleError, match="fp32 weights"):
        check_capacity(m.config, devices, "a", m.weights, 64, "fp32")


def test_a_plan_places_with_the_compute_measured_for_its_format(tiny_vocab_dir, tmp_path):
    """`halo-run probe` measures each weight format: a q8_0 compile uses the q8_0 figure, and the
    devices' power gives the plan an energy per token."""
    from halo_compile.pipeline import CompileOptions, compile_plan

    profile = tmp_path / "cluster.yaml"
    profile.write_text("name: one\ncoordinator: a\ndevices:\n"
                       "  - {name: a, address: '127.0.0.1:7900', memory_mb: 4096, compute_gflops: 1.0,\n"
                       "     compute_gflops_by_format: {fp32: 1.0, q8_0: 3.5}, power_w: [2.0, 6.0]}\n")
    opts = CompileOptions(calib_tokens=512, chunk_tokens=128, sample_tokens=256, mlp_groups=3,
                          max_context=128, solver_time=1.0, progress=False, weights="q8_0")
    plan, _ = compile_plan(str(tiny_vocab_dir), profile, tmp_path / "plan", opts)
    assert plan.devices[0].compute_gflops == 3.5
    report = plan.device_reports[0]
    # one device: busy for its whole predicted compute time, which is the token's time
    assert report.energy_mj == pytest.approx(6.0 * report.predicted_time_ms, rel=1e-3)
    assert plan.predicted_token_mj == pytest.approx(report.energy_mj)
