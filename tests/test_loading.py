"""Parallel neuron-group loading (issue 7): profile fields, the load cost model, residency, the
bounded group cache, and streaming devices in `exact` and `predictive` mode.

The real-model check (a 50% budget gives the unconstrained run's tokens) is at the end.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from halo_runtime.core.plan import Device, Group
from halo_runtime.core.planjson import from_plain
from halo_runtime.core.residency import Residency, choose_resident, window_bytes
from halo_runtime.storage.groupcache import GroupCache, LoadConfig, Part, Storage
from safetensors.numpy import save_file

from halo_compile.cluster import ProfileError, parse_profile
from halo_compile.place import GroupCost, PlaceOptions, load_ms, place, predicted_token_ms, stream_share
from halo_compile.placecost import group_ms

MB = 1024 * 1024


# ---- profile fields -------------------------------------------------------------------------------

def profile(dev1: str, defaults: str = "") -> str:
    return (f"name: t\n{defaults}devices:\n"
            "  - {name: a, address: 'h:1', memory_mb: 100, compute_gflops: 1}\n"
            f"  - {{name: b, address: 'h:2', memory_mb: 10, compute_gflops: 1{dev1}}}\n")


def test_profile_storage_bandwidth_is_read():
    p = parse_profile(profile(", storage_mbps: 90"), "t.yaml")
    assert p.devices[1].storage_mbps == 90.0 and p.devices[0].storage_mbps == 0.0


@pytest.mark.parametrize("value, message", [
    ("0", "t.yaml: devices[1] (b).storage_mbps: must be positive, got 0"),
    ("-5", "t.yaml: devices[1] (b).storage_mbps: must be positive, got -5"),
    ("fast", "t.yaml: devices[1] (b).storage_mbps: expected a number, got 'fast'"),
    (".inf", "t.yaml: devices[1] (b).storage_mbps: expected a number, got inf"),
])
def test_profile_storage_bandwidth_errors_name_file_field_device(value, message):
    with pytest.raises(ProfileError) as e:
        parse_profile(profile(f", storage_mbps: {value}"), "t.yaml")
    assert str(e.value) == message and "\n" not in str(e.value)


def test_profile_coordinator_never_streams():
    """A storage figure on the coordinator (here from `defaults:`, meant for the other boards) is ignored."""
    p = parse_profile(profile("", defaults="defaults: {storage_mbps: 50}\n"), "t.yaml")
    assert [d.storage_mbps for d in p.devices] == [0.0] + [50.0] * (len(p.devices) - 1)


# ---- plan schema ----------------------------------------------------------------------------------

def test_new_plan_fields_are_omitted_at_their_defaults_and_round_trip():
    from halo_runtime.core.planjson import to_plain as _to_plain

    dev = Device("b", "h:2", 10, 1.0)
    assert "storage_mbps" not in _to_plain(dev)
    assert from_plain(Device, _to_plain(Device("b", "h:2", 10, 1.0, storage_mbps=90.0)), "x").storage_mbps == 90.0
    g = Group("L0.mlp.0", 0, "mlp", 0, (1, 2), "b", False, 0.1)
    assert not {"streamed", "select_rate"} & set(_to_plain(g))
    g2 = Group("L0.mlp.0", 0, "mlp", 0, (1, 2), "b", False, 0.1, streamed=True, select_rate=0.25)
    assert from_plain(Group, _to_plain(g2), "x") == g2
    with pytest.raises(ValueError, match="select_rate"):
        Group("L0.mlp.0", 0, "mlp", 0, (1,), "b", False, 0.1, select_rate=1.5)


# ---- cost model (pure functions) ------------------------------------------------------------------

def dev(name="d", memory=10**8, gflops=1.0, storage=0.0):
    return Device(name, f"h:{1 + abs(hash(name)) % 60000}", memory, gflops, storage_mbps=storage)


@pytest.mark.parametrize("rate, nbytes, mbps, expected", [
    (1.0, 10**6, 100, 10.0),       # 1 MB at 100 MB/s
    (0.5, 10**6, 100, 5.0),        # selected on half the tokens
    (0.0, 10**6, 100, 0.0),        # never selected
    (1.0, 10**6, 0, 0.0),          # no storage: never streamed
    (0.25, 8 * 10**6, 400, 5.0),
])
def test_load_ms(rate, nbytes, mbps, expected):
    g = GroupCost("L0.mlp.0", 0, "mlp", False, 0.1, nbytes, 0, 1000, select_rate=rate)
    assert load_ms(g, dev(storage=mbps)) == pytest.approx(expected)


@pytest.mark.parametrize("memory, storage, expected", [
    (10**9, 100, 0.0),     # plenty of memory: nothing streamed
    (5 * 10**5, 100, 0.5),  # half of its expected 1 MB fits
    (1, 100, 1.0),         # (almost) nothing fits
    (5 * 10**5, 0, 0.0),   # no storage: the memory limit holds instead
])
def test_stream_share(memory, storage, expected):
    groups = [GroupCost(f"L0.mlp.{i}", 0, "mlp", True, 0.25, 10**6 // 2, 0, 1000) for i in range(4)]
    devices = [dev("a", 10**9), dev("b", memory, storage=storage)]  # equal compute: 1 MB expected each
    assert stream_share(groups, devices, {})["b"] == pytest.approx(expected, abs=1e-5)
    assert stream_share(groups, devices, {})["a"] == 0.0


def test_group_ms_adds_the_expected_share_of_the_load():
    g = GroupCost("L0.mlp.0", 0, "mlp", False, 0.1, 10**6, 0, 2 * 10**6, select_rate=0.5)
    d = dev(gflops=1.0, storage=100)
    assert group_ms(g, d, 0.0) == pytest.approx(2.0)
    assert group_ms(g, d, 0.5) == pytest.approx(2.0 + 0.5 * 5.0)


def test_predicted_token_ms_charges_streamed_loads_to_their_round():
    groups = [GroupCost("L0.mlp.0", 0, "mlp", True, 0.5, 10**6, 0, 10**6),
              GroupCost("L0.mlp.1", 0, "mlp", True, 0.5, 10**6, 0, 10**6)]
    devices = [Device("a", "h:1", 10**9, 1.0), Device("b", "h:2", 10**9, 1.0, latency_ms=0.0, storage_mbps=100)]
    assignment = {"L0.mlp.0": "a", "L0.mlp.1": "b"}
    opts = PlaceOptions(message_bytes=1)
    base = predicted_token_ms(groups, assignment, devices, "a", options=opts)
    slowed = predicted_token_ms(groups, assignment, devices, "a", options=opts, load={"L0.mlp.1": 10.0})
    assert slowed == pytest.approx(base + 10.0)


@pytest.mark.parametrize("mbps", [20, 200])
def test_placement_keeps_a_streaming_device_balanced(mbps):
    """A device with 1/10 of the RAM it would need streams; the slower its storage, the fewer
    groups the solver gives it, and every group may still go there (no memory error)."""
    groups = [GroupCost(f"L{l}.mlp.{i}", l, "mlp", True, 1 / 8, 10**6, 0, 10**6, select_rate=0.5)
              for l in range(2) for i in range(8)]
    devices = [Device("a", "h:1", 10**9, 1.0), Device("b", "h:2", 10**9, 1.0),
               Device("c", "h:3", 10**5, 1.0, storage_mbps=mbps)]
    p = place(groups, devices, "a", {}, {"b": 0.0, "c": 0.0}, PlaceOptions(max_deterministic_time=2))
    on = {d.name: sum(v == d.name for v in p.assignment.values()) for d in devices}
    assert on["c"] < on["b"]
    if mbps == 20:  # 1 MB at 20 MB/s costs 25 ms per selected group: far slower than computing it
        assert on["c"] == 0


# ---- residency ------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, expected", [
    (105, {"attn", "hot", "warm", "cold"}),
    (75, {"attn", "hot", "cold"}),     # warm (30) no longer fits after attn+hot; cold (5) does
    (45, {"attn", "cold"}),
    (4, set()),
])
def test_choose_resident_is_greedy_by_priority(budget, expected):
    units = [("cold", 5, 0.1), ("warm", 30, 0.5), ("hot", 30, 0.9), ("attn", 40, 2.0)]
    assert choose_resident(units, budget) == frozenset(expected)


def test_window_is_two_largest_layers():
    assert window_bytes([3, 9, 4, 9]) == 18 and window_bytes([5]) == 5


def test_residency_checks_its_budget():
    with pytest.raises(ValueError, match="exceed"):
        Residency(10, frozenset(), 8, 5, 100)


# ---- the group cache ------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    w = np.arange(40 * 8, dtype=np.float32).reshape(40, 8)
    save_file({"w": w, "d": np.ascontiguousarray(w.T)}, str(tmp_path / "s.safetensors"))
    return tmp_path / "s.safetensors", w


def parts_of(n=10):
    # group i: rows 4i..4i+4 of w and the same columns of d (128 bytes each, 256 per group)
    return {f"g{i}": (Part("w", 0, 4 * i, 4 * i + 4), Part("d", 1, 4 * i, 4 * i + 4)) for i in range(n)}


def test_storage_reads_rows_and_columns_and_drops_pages(store):
    path, w = store
    s = Storage(path, cold=True)
    (rows, cols), n = s.read((Part("w", 0, 4, 8), Part("d", 1, 4, 8)))
    assert np.array_equal(rows, w[4:8]) and np.array_equal(cols, w.T[:, 4:8]) and n == 2 * 4 * 8 * 4
    s.close()


def test_storage_throttles_to_its_bandwidth(store):
    import time

    mbps = 0.01  # 10 kB/s: 256 bytes take 25.6 ms
    s = Storage(store[0], mbps=mbps)
    t = time.perf_counter()
    _, nbytes = s.read(parts_of()["g0"])
    # a lower bound only (a busy machine makes reads slower, never faster): the bytes at that bandwidth
    assert time.perf_counter() - t >= 0.99 * nbytes / (mbps * 1e6) and nbytes == 256
    s.close()


def test_cache_stays_within_its_window_and_returns_the_right_tensors(store):
    path, w = store
    parts = parts_of()
    res = Residency(budget=256 * 4, resident=frozenset({"g0"}), window=256 * 3, resident_bytes=256,
                    streamed_bytes=256 * 9)
    cache = GroupCache(Storage(path), parts, res)
    peak = []
    try:
        for token in range(3):
            for i in range(10):
                cache.prefetch([f"g{(i + k) % 10}" for k in range(1, 4)])
                (rows, cols), = cache.get([f"g{i}"])
                assert np.array_equal(rows, w[4 * i:4 * i + 4]) and np.array_equal(cols, w.T[:, 4 * i:4 * i + 4])
                cache.release([f"g{i}"])
                peak.append(cache.streamed_bytes)
    finally:
        cache.close()
    st = cache.stats.summary()
    assert max(peak) <= res.window
    assert st["needed"] == 30 and st["hits"] + st["waited"] + st["demand"] == 30
    assert st["hits"] >= 3  # g0 is resident
    assert st["bytes_loaded"] == 256 * st["loads"]


def test_cache_demand_loads_what_was_not_prefetched(store):
    path, _ = store
    res = Residency(budget=512, resident=frozenset(), window=512, resident_bytes=0, streamed_bytes=2560)
    cache = GroupCache(Storage(path), parts_of(), res)
    try:
        cache.get(["g5"])
        cache.get(["g5"])
    finally:
        cache.close()
    assert cache.stats.demand == 1 and cache.stats.hits == 1 and cache.stats.loads == 1


def test_cache_is_safe_with_concurrent_prefetch(store):
    path, w = store
    res = Residency(budget=1024, resident=frozenset(), window=768, resident_bytes=0, streamed_bytes=2560)
    cache = GroupCache(Storage(path), parts_of(), res)
    errors = []

    def consume():
        try:
            for _ in range(5):
                for i in range(10):
                    (rows, _), = cache.get([f"g{i}"])
                    assert np.array_equal(rows, w[4 * i:4 * i + 4])
                    cache.release([f"g{i}"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    for _ in range(5):
        cache.prefetch([f"g{i}" for i in range(10)])
    t.join(timeout=30)
    cache.close()
    assert not errors and not t.is_alive() and cache.streamed_bytes <= 768


def test_load_config_validates():
    with pytest.raises(ValueError, match="load mode"):
        LoadConfig(budget=10, mode="lazy")
    with pytest.raises(ValueError, match="positive"):
        LoadConfig(budget=0)


# ---- a compiled plan with a streaming device ------------------------------------------------------

STREAM_PROFILE = """name: stream
coordinator: dev0
devices:
  - {name: dev0, address: '127.0.0.1:7950', memory_mb: 4096, compute_gflops: 0.01, latency_ms: 0.01}
  - {name: dev1, address: '127.0.0.1:7951', memory_mb: 0.2, compute_gflops: 2, latency_ms: 0.01, storage_mbps: 2000}
  - {name: dev2, address: '127.0.0.1:7952', memory_mb: 4096, compute_gflops: 1, latency_ms: 0.01}
"""


@pytest.fixture(scope="module")
def stream_plan(tiny_vocab_dir, tmp_path_factory):
    from halo_compile.pipeline import CompileOptions, compile_plan

    root = tmp_path_factory.mktemp("stream-plan")
    (root / "cluster.yaml").write_text(STREAM_PROFILE)
    opts = CompileOptions(calib_tokens=1024, chunk_tokens=128, sample_tokens=512, mlp_groups=5,
                          relaxed_share=0.3, max_context=64, solver_time=2.0, progress=False)
    return compile_plan(str(tiny_vocab_dir), root / "cluster.yaml", root / "plan", opts)


def test_compiled_plan_marks_streamed_groups_and_inspect_shows_them(stream_plan):
    from halo_runtime.core.plan import load_plan
    from halo_runtime.storage.streaming import plan_budget

    from halo_compile.report import inspect_text

    plan, directory = stream_plan
    rep = {r.name: r for r in plan.device_reports}["dev1"]
    mine = [g for g in plan.groups if g.device == "dev1"]
    assert mine and any(g.streamed for g in mine) and rep.streamed_bytes > 0 and rep.load_ms > 0
    assert rep.resident_bytes + rep.streamed_bytes == rep.weight_bytes
    assert rep.resident_bytes + rep.kv_cache_bytes <= plan.device("dev1").memory_bytes
    assert all(not g.streamed for g in plan.groups if g.device != "dev1")
    assert any(g.select_rate < 1.0 for g in mine if g.kind == "mlp")
    assert load_plan(directory) == plan  # the new fields survive plan.json
    text = inspect_text(plan)
    assert "streaming" in text and "dev1" in text.split("streaming")[1]
    assert plan_budget(plan, "dev1") == plan.device("dev1").memory_bytes - rep.kv_cache_bytes
    assert plan_budget(plan, "dev2") is None


def test_streaming_plan_is_deterministic(stream_plan, tiny_vocab_dir, tmp_path):
    from halo_compile.pipeline import CompileOptions, compile_plan

    _, directory = stream_plan
    (tmp_path / "cluster.yaml").write_text(STREAM_PROFILE)
    opts = CompileOptions(calib_tokens=1024, chunk_tokens=128, sample_tokens=512, mlp_groups=5,
                          relaxed_share=0.3, max_context=64, solver_time=2.0, progress=False)
    _, again = compile_plan(str(tiny_vocab_dir), tmp_path / "cluster.yaml", tmp_path / "plan", opts)
    for name in ("plan.json", "manifest.json"):
        assert (again / name).read_bytes() == (directory / name).read_bytes(), name


def _run(plan, directory, computes, tokens=6, prompt=(1, 5, 9, 14)):
    from halo_runtime.core.coordinator import Coordinator
    from halo_runtime.core.exchange import InProcessExchange
    from halo_runtime.core.shards import load_shard

    shards = {d: load_shard(directory, plan, d) for d in plan.device_names}
    coord = Coordinator(plan, shards[plan.coordinator], InProcessExchange(plan, shards, computes=computes))
    return coord.generate(list(prompt), tokens, keep_logits=True)


@pytest.mark.parametrize("share", [1.0, 0.8, 0.7])  # 3 layers: streaming needs 2/3 for its window
def test_exact_streaming_gives_the_full_shards_output_on_the_tiny_plan(stream_plan, share):
    """Same weights, same ggml graph: the same logits (held to fp32 rounding, not to the bit) and the
    same tokens."""
    from halo_runtime.storage.streaming import open_streaming

    plan, directory = stream_plan
    ref = _run(plan, directory, {})
    rep = {r.name: r for r in plan.device_reports}["dev2"]
    dev = open_streaming(plan, directory, "dev2", LoadConfig(budget=int(rep.weight_bytes * share), mode="exact"))
    try:
        got = _run(plan, directory, {"dev2": dev})
    finally:
        dev.close()
    assert got.tokens == ref.tokens
    for a, b in zip(got.logits, ref.logits):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    st = dev.cache.stats.summary()
    if share < 1.0:
        assert st["loads"] > 0 and st["needed"] == st["hits"] + st["waited"] + st["demand"]


def test_predictive_mode_computes_only_the_selected_groups(stream_plan):
    from halo_runtime.core.device import DeviceCompute
    from halo_runtime.core.predictor import predict_groups
    from halo_runtime.core.shards import load_shard
    from halo_runtime.storage.streaming import open_streaming

    plan, directory = stream_plan
    name = "dev2"
    rep = {r.name: r for r in plan.device_reports}[name]
    full = DeviceCompute(plan, name, load_shard(directory, plan, name))
    dev = open_streaming(plan, directory, name, LoadConfig(budget=rep.weight_bytes * 3 // 4, mode="predictive"))
    rng = np.random.default_rng(0)
    n_groups, hidden = len(plan.layer_groups(0, "mlp")), plan.model.hidden_size
    # a predictor that selects every other group, whatever the input
    bias = np.array([1.0 if i % 2 == 0 else -1.0 for i in range(n_groups)], np.float32)
    dev.predictors = [{"down": np.zeros((4, hidden), np.float32), "up": np.zeros((n_groups, 4), np.float32),
                       "bias": bias} for _ in range(plan.model.num_layers)]
    try:
        for layer in range(plan.model.num_layers):
            if not full.has_mlp(layer):
                continue
            x, m = rng.standard_normal((2, 1, plan.model.hidden_size)).astype(np.float32)
            if dev.has_attention(layer):
                dev.attention(layer, x, 0)
            else:  # the device learns x from the attention request; here we hand it over
                dev.selected[layer] = dev._predict(layer, x)
            crit, rlx = dev.mlp(layer, m)
            flags = predict_groups(x, dev.predictors[layer])[0]
            groups = plan.groups_on(name, layer, "mlp")
            parts = full.mlp_groups(layer, m)
            want_c = sum((p for g, p in zip(groups, parts) if g.critical and flags[g.index]), np.zeros((1, 64)))
            want_r = sum((p for g, p in zip(groups, parts) if not g.critical and flags[g.index]), np.zeros((1, 64)))
            if crit is not None:
                np.testing.assert_allclose(crit, want_c, rtol=1e-5, atol=1e-5)
            if rlx is not None:
                np.testing.assert_allclose(rlx, want_r, rtol=1e-5, atol=1e-5)
    finally:
        dev.close()
    assert dev.cache.stats.skipped > 0


def test_streaming_budget_below_two_layers_is_a_clear_error(stream_plan):
    from halo_runtime.storage.streaming import open_streaming

    plan, directory = stream_plan
    with pytest.raises(ValueError, match="needed to stream"):
        open_streaming(plan, directory, "dev2", LoadConfig(budget=1000))


# ---- the real model: a 50% budget gives the unconstrained run's tokens ----------------------------

@pytest.mark.slow
def test_real_model_exact_at_half_budget_gives_the_same_tokens(builtin_model, tmp_path_factory):
    from conftest import cluster_yaml
    from halo_runtime.core.tokenizer import Tokenizer
    from halo_runtime.storage.streaming import open_streaming

    from halo_compile.pipeline import CompileOptions, compile_plan

    root = tmp_path_factory.mktemp("real-stream")
    (root / "cluster.yaml").write_text(cluster_yaml(2, coordinator_gflops=1.0, base_port=7960))
    opts = CompileOptions(calib_tokens=256, chunk_tokens=256, sample_tokens=256, mlp_groups=8,
                          max_context=64, solver_time=1.0, compensation_rank=0, progress=False)
    plan, directory = compile_plan("smollm2-135m", root / "cluster.yaml", root / "plan", opts)
    prompt = Tokenizer.from_file(builtin_model.tokenizer_file).encode("The capital of France is")
    remote = "dev1"
    ref = _run(plan, directory, {}, tokens=12, prompt=prompt)
    shard = (directory / plan.shard_file(remote)).stat().st_size
    dev = open_streaming(plan, directory, remote, LoadConfig(budget=shard // 2, mode="exact", cold=True))
    try:
        got = _run(plan, directory, {remote: dev}, tokens=12, prompt=prompt)
    finally:
        dev.close()
    st = dev.cache.stats.summary()
    print(f"\n50% budget, exact: {json.dumps({k: round(v, 3) for k, v in st.items()})}")
    assert got.tokens == ref.tokens
    assert dev.residency.streamed_bytes > 0 and st["loads"] > 0
    assert dev.residency.resident_bytes + dev.residency.window <= shard // 2


def test_worker_with_too_small_a_budget_is_a_one_line_error(stream_plan):
    import os
    import subprocess
    import sys

    plan, directory = stream_plan
    r = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "worker", "--plan", str(directory), "--device",
                        "dev2", "--bind", "127.0.0.1:0", "--memory-budget", "0.001"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert r.stderr.startswith("halo-run: error: device dev2: a memory budget of 1,000 bytes is below")
    assert r.stderr.count("\n") == 1


def test_eval_measures_predictive_mode(stream_plan):
    from halo_compile.evaluate import EvalOptions, evaluate

    _, directory = stream_plan
    opts = EvalOptions(plrs=(0.0,), tokens=96, context=32, progress=False, recall_windows=0)
    exact = evaluate(directory, opts)
    pred = evaluate(directory, EvalOptions(**{**opts.__dict__, "predictive": ("dev2",)}))
    assert "predictive" not in exact and 0.0 < pred["predictive"]["dev2"]["computed_share"] <= 1.0
    assert exact["results"][0]["ppl"] == pytest.approx(exact["full_ppl"], rel=1e-4)  # no loss: the full model
    assert pred["results"][0]["ppl"] != exact["results"][0]["ppl"] or pred["predictive"]["dev2"]["computed_share"] == 1
    with pytest.raises(ValueError, match="--predictive dev0"):
        evaluate(directory, EvalOptions(**{**opts.__dict__, "predictive": ("dev0",)}))
