"""The compiler, step by step: load -> profile -> group -> score -> predict -> place -> emit.

The whole compile is `compile_plan("smollm2-135m", "profiles/pi5.yaml", "out/pi5", CompileOptions())`,
what `halo-compile plan` runs (tests/conftest.py runs it on a tiny random model). Its options
are checked before anything is loaded:
    >>> from halo_compile.pipeline import CompileOptions
    >>> CompileOptions(relaxed_share=1.5)
    Traceback (most recent call last):
    ...
    ValueError: option relaxed_share: invalid value 1.5
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from halo_runtime.core.model import mlp_activations
from halo_runtime.core.plan import SCHEMA_VERSION, DeviceReport, Group, Plan, PredictorReport
from halo_runtime.core.plandir import shard_file
from halo_runtime.core.policy import DeliveryPolicy
from halo_runtime.core.predictor import predict_groups
from halo_runtime.core.residency import residency
from halo_runtime.core.shards import slice_device
from tqdm import tqdm

from . import __version__
from .calib import calibration_text, read_text_file, token_chunks
from .cluster import load_profile
from .compensate import lowrank_compensation
from .emit import emit
from .group import attention_groups, group_neurons
from .load import load_model
from .place import (
    GroupCost,
    InfeasibleError,
    PlaceOptions,
    importance_at_risk,
    load_ms,
    place,
    place_loss_blind,
    predicted_token_ms,
)
from .predict import group_contributions, matters, train_predictor
from .profiling import profile_model
from .score import criticality, group_shares, mean_contribution, neuron_importance, shares

BYTES_PER_WEIGHT = 4  # shards are fp32: with an fp32 wire the plan reproduces the model exactly


@dataclass(frozen=True)
class CompileOptions:
    """Knobs of `halo-compile plan`; the defaults are what the checked-in plans use."""

    seed: int = 0
    """Seed of every random choice (sampling, clustering, predictor init, solver)."""
    calib_file: str | None = None
    """Calibration text file; None = first half of the built-in Wikipedia articles."""
    calib_tokens: int = 8192
    """Calibration tokens profiled."""
    chunk_tokens: int = 512
    """Context length of each calibration chunk."""
    sample_tokens: int = 4096
    """Tokens sampled for grouping and predictor training (bounds memory)."""
    mlp_groups: int = 16
    """MLP neuron groups per layer."""
    relaxed_share: float = 0.15
    """Cumulative importance share of a layer's MLP groups that may be relaxed."""
    max_context: int = 2048
    """Longest context the KV cache is sized for."""
    predictor_rank: int = 32
    """Bottleneck width of each layer's predictor."""
    predictor_threshold: float = 0.2
    """A group matters for a token when its output exceeds this share of the MLP output norm."""
    compensation_rank: int = 16
    """Neurons kept in each relaxed group's low-rank compensation (0 = calibration mean only)."""
    solver_time: float = 10.0
    """CP-SAT deterministic time budget per phase."""
    progress: bool = True
    """Show progress bars on stderr."""

    def __post_init__(self):
        checks = {"calib_tokens": self.calib_tokens >= 16, "chunk_tokens": self.chunk_tokens >= 16,
                  "sample_tokens": self.sample_tokens >= 16, "mlp_groups": self.mlp_groups >= 1,
                  "relaxed_share": 0 <= self.relaxed_share < 1, "max_context": self.max_context >= 1,
                  "predictor_rank": self.predictor_rank >= 1, "compensation_rank": self.compensation_rank >= 0,
                  "predictor_threshold": 0 < self.predictor_threshold < 1, "solver_time": self.solver_time > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"option {name}: invalid value {getattr(self, name)!r}")


def _log(opts: CompileOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def _calibration_chunks(model, opts: CompileOptions) -> list[list[int]]:
    from transformers import PreTrainedTokenizerFast

    text = read_text_file(opts.calib_file) if opts.calib_file else calibration_text()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model.tokenizer_file))
    # tokenise only as much text as the budget needs (about 4 characters a token)
    ids = tok(text[: opts.calib_tokens * 8], add_special_tokens=False)["input_ids"]
    return token_chunks(ids, opts.chunk_tokens, opts.calib_tokens)


def group_cost(cfg, group: Group, max_context: int, select_rate: float = 1.0) -> GroupCost:
    """The placement solver's view of a group: weights, KV cache and flops per token."""
    hd, d, g = cfg.head_dim, cfg.hidden_size, cfg.group_size
    if group.kind == "attn":
        nbytes = ((2 * g + 2) * hd * d) * BYTES_PER_WEIGHT  # q rows, k, v rows and o columns
        kv_bytes = 2 * max_context * hd * BYTES_PER_WEIGHT
        return GroupCost(group.id, group.layer, "attn", True, group.importance, nbytes, kv_bytes, nbytes // 2)
    nbytes = 3 * d * len(group.members) * BYTES_PER_WEIGHT
    return GroupCost(group.id, group.layer, "mlp", group.critical, group.importance, nbytes, 0, nbytes // 2,
                     select_rate)


def compile_plan(model_spec: str, profile_path: str | Path, out_dir: str | Path | None,
                 opts: CompileOptions = CompileOptions()) -> tuple[Plan, Path]:
    torch.manual_seed(opts.seed)
    started = time.perf_counter()
    profile = load_profile(profile_path)
    _log(opts, f"[1/7] load {model_spec}")
    model = load_model(model_spec, progress=opts.progress)
    cfg = model.config
    w = model.weights
    out = Path(out_dir) if out_dir else Path("artifacts") / f"{model.name}-{profile.name}"

    _log(opts, f"[2/7] profile on {opts.calib_tokens} calibration tokens")
    prof = profile_model(model, _calibration_chunks(model, opts), opts.sample_tokens, opts.seed, opts.progress)

    _log(opts, f"[3/7] group, [4/7] score, [5/7] train predictors ({cfg.num_layers} layers)")
    groups: list[Group] = []
    predictor_tensors: dict[str, torch.Tensor] = {}
    recall, precision, positive, select = [], [], [], {}
    d = cfg.hidden_size
    for layer in tqdm(range(cfg.num_layers), desc="group+predict", disable=not opts.progress, leave=False):
        st = prof.layers[layer]
        lw = lambda n: w[f"model.layers.{layer}.{n}.weight"]  # noqa: E731
        imp = neuron_importance(st.mean_abs_act, lw("mlp.down_proj"))
        acts = mlp_activations(st.mlp_in, lw("mlp.gate_proj"), lw("mlp.up_proj"))
        members = group_neurons(acts, imp, opts.mlp_groups, opts.seed)
        mlp_share = group_shares(members, imp)
        mlp_critical = criticality(mlp_share, opts.relaxed_share)
        attn_members = attention_groups(cfg.num_kv_heads)
        attn_share = shares(st.kv_norm_sum.tolist())
        for i, (m, s) in enumerate(zip(attn_members, attn_share)):
            gid = f"L{layer}.attn.{i}"
            groups.append(Group(gid, layer, "attn", i, tuple(m), "", True, s))
        for i, (m, s, crit) in enumerate(zip(members, mlp_share, mlp_critical)):
            gid = f"L{layer}.mlp.{i}"
            groups.append(Group(gid, layer, "mlp", i, tuple(m), "", crit, s))
        contrib = group_contributions(st.mlp_in, lw("mlp.gate_proj"), lw("mlp.up_proj"), lw("mlp.down_proj"), members)
        trained = train_predictor(st.attn_in, matters(contrib, opts.predictor_threshold),
                                  opts.predictor_rank, opts.seed + layer)
        for k, v in trained.weights.items():
            predictor_tensors[f"predictor.{layer}.{k}"] = v
        predictor_tensors[f"compensation.{layer}.mean"] = mean_contribution(
            st.mean_act.float(), lw("mlp.down_proj"), members)
        if opts.compensation_rank:
            relaxed = [i for i, crit in enumerate(mlp_critical) if not crit]
            comp = lowrank_compensation(st.mlp_in, lw("mlp.gate_proj"), lw("mlp.up_proj"), lw("mlp.down_proj"),
                                        members, relaxed, imp, opts.compensation_rank)
            for k, v in comp.tensors.items():
                predictor_tensors[f"compensation.{layer}.{k}"] = v
        # how often the predictor selects each group: what predictive loading reads on a streaming device
        with torch.no_grad():
            rates = predict_groups(st.attn_in.float(), trained.weights).float().mean(0)
        for i, r in enumerate(rates.tolist()):
            select[f"L{layer}.mlp.{i}"] = float(f"{r:.6g}")
        recall.append(trained.recall)
        precision.append(trained.precision)
        positive.append(trained.positive_rate)

    _log(opts, f"[6/7] place {len(groups)} groups on {len(profile.devices)} devices (CP-SAT)")
    costs = [group_cost(cfg, grp, opts.max_context, select.get(grp.id, 1.0)) for grp in groups]
    coordinator_bytes = (sum(v.numel() for k, v in w.items() if "proj" not in k) +
                         sum(v.numel() for v in predictor_tensors.values())) * BYTES_PER_WEIGHT
    fixed = {profile.coordinator: coordinator_bytes}
    policy = DeliveryPolicy()
    miss = {dev.name: 0.0 if dev.name == profile.coordinator else policy.miss_probability(dev.loss)
            for dev in profile.devices}
    popts = PlaceOptions(seed=opts.seed, max_deterministic_time=opts.solver_time, message_bytes=2 * d)
    placement = place(costs, profile.devices, profile.coordinator, fixed, miss, popts)
    blind = place_loss_blind(costs, profile.devices, profile.coordinator, fixed, miss, popts)
    _log(opts, f"      placement solved in {placement.solve_wall_s:.1f} s wall, loss-blind in {blind.solve_wall_s:.1f} s")
    groups = [replace(grp, device=placement.assignment[grp.id]) for grp in groups]

    reports = []
    for dev in profile.devices:
        mine = [c for c in costs if placement.assignment[c.id] == dev.name]
        reports.append(DeviceReport(
            name=dev.name,
            weight_bytes=sum(c.weight_bytes for c in mine) + fixed.get(dev.name, 0),
            kv_cache_bytes=sum(c.kv_bytes for c in mine),
            num_groups=len(mine),
            importance_share=sum(c.importance for c in mine) / (2 * cfg.num_layers),
            predicted_time_ms=placement.device_time_ms[dev.name]))
    plan = Plan(
        schema_version=SCHEMA_VERSION, compiler_version=__version__, seed=opts.seed,
        model_name=model.name, model_fingerprint=model.fingerprint, model=cfg,
        profile_name=profile.name, profile_fingerprint=profile.fingerprint,
        coordinator=profile.coordinator, devices=profile.devices, max_context=opts.max_context,
        groups=tuple(groups),
        predictor=PredictorReport(opts.predictor_rank, opts.predictor_threshold, tuple(positive),
                                  tuple(recall), tuple(precision)),
        solver=placement.solver, device_reports=tuple(reports),
        predicted_token_ms=placement.predicted_token_ms,
        expected_lost_importance=placement.expected_lost_importance,
        loss_blind_token_ms=blind.predicted_token_ms,
        loss_blind_lost_importance=importance_at_risk(costs, blind.assignment, miss, cfg.num_layers),
        shards=tuple(shard_file(dev.name) for dev in profile.devices))

    plan = _streaming(plan, costs, fixed, miss, popts)

    _log(opts, f"[7/7] emit {out}")
    shards = {dev: slice_device(plan, dev, w) for dev in plan.device_names}
    shards[plan.coordinator].update(predictor_tensors)
    emit(out, plan, shards, model.tokenizer_file)
    _log(opts, f"compiled in {time.perf_counter() - started:.1f} s")
    # hand back exactly what plan.json holds (floats rounded), so reports agree with `inspect`
    return Plan.from_json(plan.to_json()), out


def _streaming(plan: Plan, costs: list[GroupCost], fixed: dict, miss: dict, popts: PlaceOptions) -> Plan:
    """Mark the groups that devices with storage stream (memory too small), and report them.

    The runtime's own `residency` picks them, so the plan says what `halo-run worker` will do
    with the plan's budget: weights in RAM = memory - KV cache (- fixed buffers).
    """
    streaming = [d for d in plan.devices if d.storage_mbps > 0 and d.name != plan.coordinator]
    if not streaming:
        return plan
    by_id = {c.id: c for c in costs}
    groups = [replace(g, select_rate=by_id[g.id].select_rate) if g.kind == "mlp"
              and plan.device(g.device).storage_mbps > 0 else g for g in plan.groups]
    plan = replace(plan, groups=tuple(groups))
    reports, load = {r.name: r for r in plan.device_reports}, {}
    for dev in streaming:
        rep = reports[dev.name]
        budget = dev.memory_bytes - rep.kv_cache_bytes - fixed.get(dev.name, 0)
        try:
            res = residency(plan, dev.name, budget)
        except ValueError as e:
            raise InfeasibleError(str(e)) from None
        if not res.streamed_bytes:
            continue
        mine = [g for g in plan.groups if g.device == dev.name and g.id not in res.resident]
        dev_load = {g.id: load_ms(by_id[g.id], dev) for g in mine}
        load.update(dev_load)
        reports[dev.name] = replace(rep, resident_bytes=res.resident_bytes, streamed_bytes=res.streamed_bytes,
                                    load_ms=sum(dev_load.values()))
    if not load:
        return plan
    assignment = {g.id: g.device for g in plan.groups}
    return replace(plan, groups=tuple(replace(g, streamed=g.id in load) for g in plan.groups),
                   device_reports=tuple(reports[d.name] for d in plan.devices),
                   predicted_token_ms=predicted_token_ms(costs, assignment, plan.devices, plan.coordinator,
                                                         miss, popts, load))
