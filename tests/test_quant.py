"""Weight formats and matrix-vector kernels: round trips, error bounds, slicing by neuron group
never splitting a scale, a group's contribution independent of the groups beside it, and every
kernel agreeing with the dequantised reference."""
from __future__ import annotations

import random

import pytest
import torch
from halo_runtime.core import kernels as K
from halo_runtime.core.quant import (
    FORMATS,
    INT4_BLOCK,
    QuantWeight,
    cat_rows,
    cat_segments,
    dequantise,
    dequantise_columns,
    from_tensors,
    quantise,
    quantise_columns,
    take_rows,
    take_segments,
    to_tensors,
)
from safetensors.torch import load_file, save_file

FORMAT_NAMES = list(FORMATS)


def _partition(n: int, k: int, seed: int) -> list[list[int]]:
    """k groups of uneven sizes over columns 0..n-1, members scattered (like co-activation groups)."""
    rng = random.Random(seed)
    cols = list(range(n))
    rng.shuffle(cols)
    cuts = sorted(rng.sample(range(1, n), k - 1))
    return [sorted(cols[a:b]) for a, b in zip([0, *cuts], [*cuts, n])]


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 3] = 0.5  # an outlier, as real checkpoints have
    w[1] = 0.0     # an all-zero row
    return w


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_round_trip_error_bounds(fmt):
    w = _weight(48, 200)
    segments = (70, 33, 97)
    q = quantise(w, fmt, segments)
    d = dequantise(q)
    err = (d - w).abs()
    if fmt == "fp32":
        assert torch.equal(d, w)
    elif fmt == "bf16":
        assert bool((err <= w.abs() * 2 ** -8).all())
    elif fmt == "int8":
        assert bool((err <= q.scales[:, None] / 2 + 1e-9).all())
        assert float(err.max()) <= float(w.abs().max()) / 254 + 1e-9
    else:  # Q4_0-style: half a step, or one step for a value clamped at the far end of its block
        from halo_runtime.core.quant import _layout
        step = q.scales.float().abs()[:, _layout(segments).block_index]
        assert bool((err <= step + 1e-9).all())
        assert float((err <= step / 2 + 1e-9).float().mean()) > 0.95
    assert torch.equal(d[1], torch.zeros(200)), "an all-zero row stays zero"
    assert q.nbytes == sum(t.numel() * t.element_size() for t in to_tensors("w", q).values())


def test_bytes_per_weight():
    assert [FORMATS[f].bytes_per_weight(2048) for f in FORMAT_NAMES] == [4.0, 2.0, 1 + 4 / 2048, 0.5625]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_safetensors_round_trip(tmp_path, fmt):
    q = quantise(_weight(8, 75), fmt, (31, 44))
    save_file(to_tensors("layers.0.mlp.down_proj", q), tmp_path / "s.safetensors")
    back = from_tensors(load_file(tmp_path / "s.safetensors"), "layers.0.mlp.down_proj", fmt, (31, 44))
    assert torch.equal(back.values, q.values)
    assert (back.scales is None) == (q.scales is None)
    if q.scales is not None:
        assert torch.equal(back.scales, q.scales)


def test_from_tensors_names_the_bad_tensor():
    q = quantise(_weight(8, 64), "int4", (32, 32))
    t = to_tensors("down", q)
    with pytest.raises(ValueError, match="missing tensor down.scale"):
        from_tensors({"down": t["down"]}, "down", "int4", (32, 32))
    with pytest.raises(ValueError, match="tensor down: .*scales"):
        from_tensors({"down": t["down"], "down.scale": t["down.scale"][:, :1]}, "down", "int4", (32, 32))
    with pytest.raises(ValueError, match="tensor down: .*values"):
        from_tensors({"down": t["down"].to(torch.int8), "down.scale": t["down.scale"]}, "down", "int4", (32, 32))
    with pytest.raises(ValueError, match="non-finite"):
        quantise(torch.tensor([[1.0, float("nan")]]), "int8")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_slicing_by_group_never_splits_a_scale(fmt):
    rows, cols = 40, 300
    w = _weight(rows, cols, seed=1)
    groups = _partition(cols, 7, seed=2)
    q = quantise_columns(w, fmt, groups)
    full = dequantise(q)
    assert torch.equal(dequantise_columns(q, groups), quantise(w, fmt).values.float() if fmt == "fp32"
                       else dequantise_columns(q, groups))
    # a device takes any groups in any order: its slice dequantises to exactly those columns
    devices = [[4, 0], [6, 2, 5], [1, 3]]
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))
    for mine in devices:
        part = take_segments(q, mine)
        cols_of = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine])
        assert torch.equal(dequantise(part), full[:, cols_of])
        if fmt != "int8":  # blocks are group-local: quantising the device's columns alone gives the same
            alone = quantise_columns(w[:, [c for i in mine for c in groups[i]]], fmt,
                                     [list(range(a, a + len(groups[i]))) for a, i in
                                      zip([sum(len(groups[j]) for j in mine[:k]) for k in range(len(mine))], mine)])
            assert torch.equal(part.values, alone.values)
            assert (part.scales is None) or torch.equal(part.scales, alone.scales)
    # and the devices' slices reassemble exactly to the plan's quantised weight
    joined = cat_segments([take_segments(q, mine) for mine in devices])
    order = [i for mine in devices for i in mine]
    back = take_segments(joined, [order.index(i) for i in range(len(groups))])
    assert torch.equal(back.values, q.values)
    assert (q.scales is None) or torch.equal(back.scales, q.scales)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_row_slices_reassemble_exactly(fmt):
    q = quantise(_weight(30, 96, seed=3), fmt)
    devices = [[5, 1, 29], list(range(6, 29)), [0, 2, 3, 4]]
    joined = cat_rows([take_rows(q, r) for r in devices])
    order = [r for rows in devices for r in rows]
    back = take_rows(joined, [order.index(r) for r in range(30)])
    assert torch.equal(back.values, q.values)
    assert (q.scales is None) or torch.equal(back.scales, q.scales)


def test_int8_slices_of_different_quantisations_are_refused():
    a = quantise(_weight(8, 64, seed=4), "int8", (32, 32))
    b = quantise(_weight(8, 64, seed=5), "int8", (32, 32))
    with pytest.raises(ValueError, match="disagree on the row scales"):
        cat_segments([take_segments(a, [0]), take_segments(b, [1])])


def _kernels(fmt=None):
    return [k for f in FORMAT_NAMES if fmt in (None, f) for k in K.candidates(f)]


@pytest.mark.parametrize("kern", _kernels(), ids=lambda k: k.name)
def test_every_kernel_agrees_with_the_dequantised_reference(kern):
    rows, cols = 72, 200
    w = _weight(rows, cols, seed=6)
    q = quantise_columns(w, kern.format, _partition(cols, 5, seed=7))  # odd, short int4 blocks
    for T in (1, 3, K.BATCH_ROWS + 1):
        x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T))
        assert K.agreement(kern, q, x) <= K.TOLERANCE[kern.activations], f"T={T}"


@pytest.mark.parametrize("kern", _kernels(), ids=lambda k: k.name)
def test_a_groups_contribution_does_not_depend_on_its_neighbours(kern):
    rows, cols = 64, 240
    w = _weight(rows, cols, seed=8)
    groups = _partition(cols, 6, seed=9)
    q = quantise_columns(w, kern.format, groups)
    g = torch.Generator().manual_seed(10)
    act = torch.randn(K.BATCH_ROWS + 2, cols, generator=g)
    act[:, 5] *= 50  # an outlier activation in one group must not coarsen the others' scale
    starts = [0]
    for grp in groups:
        starts.append(starts[-1] + len(grp))
    x_of = lambda mine: torch.cat([act[:, starts[i]:starts[i + 1]] for i in mine], 1)  # noqa: E731
    for T in (1, 2, K.BATCH_ROWS + 2):
        alone = K.QuantLinear(take_segments(q, [3]), kern).parts(x_of([3])[:T])[0]
        for mine in ([0, 3], [3, 5, 1], [2, 4, 3, 0]):
            together = K.QuantLinear(take_segments(q, mine), kern, parts=[1] * len(mine)).parts(x_of(mine)[:T])
            assert torch.equal(together[mine.index(3)], alone), f"T={T}, device holding {mine}"
    # one token's answer does not depend on the tokens batched with it
    one = K.QuantLinear(q, kern)(act[:1])
    two = K.QuantLinear(q, kern)(act[:2])[:1]
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


def test_parts_split_critical_and_relaxed_sums():
    q = quantise_columns(_weight(16, 100, seed=11), "int8", _partition(100, 5, seed=12))
    x = torch.randn(1, 100)
    for kern in _kernels("int8"):
        crit, relaxed = K.QuantLinear(q, kern, parts=(2, 3)).parts(x)
        per_group = K.QuantLinear(q, kern, parts=(1,) * 5).parts(x)
        torch.testing.assert_close(crit, per_group[0] + per_group[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(relaxed, sum(per_group[2:]), rtol=1e-5, atol=1e-6)
    empty = K.QuantLinear(q, kern, parts=(0, 5)).parts(x)[0]
    assert torch.equal(empty, torch.zeros(1, 16))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_registry_picks_an_available_kernel_once_per_role(fmt, monkeypatch):
    monkeypatch.setattr(K, "_SELECTIONS", {})  # measured here, not pinned by an earlier test
    for role in K.ROLES:
        k = K.choose(fmt, role)
        assert k.format == fmt and k in K.candidates(fmt)
        sel = [s for s in K.selection_details() if (s.format, s.role) == (fmt, role)][0]
        assert sel.kernel == k.name and k.name in sel.times_us
        assert K.selections()[fmt][role] == k.name
        assert K.choose(fmt, role) is k, "chosen once per process"
    grouped = quantise(torch.randn(4, 64), fmt, (32, 32))
    assert K.QuantLinear(grouped).kernel is K.choose(fmt, "groups")
    assert K.QuantLinear(quantise(torch.randn(4, 64), fmt)).kernel is K.choose(fmt, "rows")


def test_registry_override_and_errors():
    saved = dict(K._SELECTIONS)
    try:
        assert K.choose("int8", "groups", "int8.dequant-fp32").name == "int8.dequant-fp32"
        assert K.selections()["int8"]["groups"] == "int8.dequant-fp32"
        with pytest.raises(ValueError, match="unknown kernel"):
            K.choose("int8", "rows", "int8.nope")
        with pytest.raises(ValueError, match="not available for int4"):
            K.choose("int4", "rows", "int8.dequant-fp32")
        with pytest.raises(ValueError, match="role must be one of"):
            K.Selection("int8", "cols", "int8.dequant-fp32")
        with pytest.raises(ValueError, match="does not read"):
            K.QuantLinear(quantise(torch.ones(2, 2), "int4"), K.kernel("int8.dequant-fp32"))
    finally:
        K._SELECTIONS.clear()
        K._SELECTIONS.update(saved)


def test_int4_padding_blocks_follow_groups():
    q = quantise(_weight(4, 70), "int4", (33, 37))
    assert q.values.shape == (4, 17 + 19)
    assert q.scales.shape == (4, 2 + 2)
    assert INT4_BLOCK == 32
    with pytest.raises(ValueError, match="values have shape"):  # one 70-column segment packs into 35 bytes
        QuantWeight(q.format, 4, (70,), q.values, q.scales)


def test_kernel_benchmark_runs_small(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, "-m", "benchmarks.matvec", "--matrices", "2", "--rows", "64",
                    "--cols", "96", "--small-rows", "32", "--small-cols", "64", "--repeats", "2",
                    "--group-shapes", "smoke:64x96:3", "-o", str(out)], check=True, capture_output=True,
                   cwd=root, timeout=120)
    data = json.loads(out.read_text())
    names = {r["kernel"] for r in data["kernels"]}
    assert {"fp32.linear", "int8.dequant-fp32", "int4.dequant-fp32"} <= names
    assert "loadavg" in data["machine"] and set(data["chosen"]["int8"]) == {"rows", "groups"}
    assert data["per_group"] and {r["groups"] for r in data["per_group"]} == {3}


@pytest.mark.parametrize("name", ["halo_runtime.core.quant", "halo_runtime.core.kernels", "benchmarks.matvec"])
def test_module_examples_run(name):
    # test_doctests.py walks only halo_runtime's top level since the core/net/storage split
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted and result.failed == 0


def test_measurement_chooses_only_kernels_that_keep_activations_exact():
    sel = K.measure("int8", "groups", repeats=1)
    assert K.kernel(sel.kernel).activations == "fp32"
    for k in K.candidates("int8"):
        if k.activations != "fp32":
            assert k.name not in sel.times_us and K.PIN_ENV in sel.rejected[k.name]


@pytest.mark.parametrize("fmt", ["int8", "fp32"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_numba_loop_gives_the_same_bits_on_two_threads(fmt, tokens, monkeypatch):
    """`--threads` splits the rows among threads; each row is still summed by one, the same way."""
    from halo_runtime.core import jitkernels as J

    w = quantise(_weight(3 * J.ROW_BLOCK + 5, 72), fmt)
    p, run = (J.prepare_int8(w), J.int8_linear) if fmt == "int8" else (J.prepare_fp32(w), J.fp32_linear)
    x = torch.randn(tokens, 72, generator=torch.Generator().manual_seed(tokens))
    one = run(p, x)
    assert torch.allclose(one, x @ dequantise(w).T, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(K, "THREADS", 2)
    assert torch.equal(run(p, x), one)


def test_compute_options_refuse_no_threads():
    with pytest.raises(ValueError, match="threads must be"):
        K.ComputeOptions(threads=0)


def test_int8_weight_only_kernel_agrees_for_one_few_and_many_tokens():
    from halo_runtime.core import jitkernels as J

    w = quantise(_weight(40, 72), "int8")
    p, ref = J.prepare_int8(w), dequantise(w)
    for T in (1, 3, J.GEMM_ROWS):  # the matrix-vector loop, the row-reusing loop, one fp32 GEMM
        x = torch.randn(T, 72, generator=torch.Generator().manual_seed(T))
        assert torch.allclose(J.int8_linear(p, x), x @ ref.T, rtol=1e-4, atol=1e-4), f"T={T}"
