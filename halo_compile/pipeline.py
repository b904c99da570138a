"""The compiler, step by step: load -> profile -> group -> score -> predict -> place -> emit.

Memory is bounded by one layer, not by the model: the checkpoint is read lazily; profiling hands
over one layer at a time (`profiling.profile_layers`), and that layer is grouped, scored,
compensated and predicted before the next is read, keeping only the small results; emit reads the
weights again a layer at a time (`emit.emit_streaming`). Steps can be timed (`steps.StepTimer`).

Each step's per-layer work lives in its own module and returns a typed result: `group.group_layer`
-> LayerGroups, `score.score_layer` -> LayerScores, `compensate.compensate_layer` ->
LayerCompensation, `predict.predict_layer` -> LayerPredictor; placement is set up, solved and
reported by `place`, and `emit` writes the directory. `compile_plan` only sequences them.

Example:
    >>> from halo_compile.pipeline import CompileOptions, compile_plan
    >>> CompileOptions(calib_tokens=2048).mlp_groups
    16
    >>> CompileOptions(relaxed_share=1.0)
    Traceback (most recent call last):
    ValueError: option relaxed_share: invalid value 1.0
    >>> compile_plan("smollm2-135m", "no/such/cluster.yaml", None)
    Traceback (most recent call last):
    halo_compile.cluster.ProfileError: no/such/cluster.yaml: no such profile
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from halo_runtime.core.plan import ROUNDS, SCHEMA_VERSION, Failover, Plan, PredictorReport
from halo_runtime.core.plandir import shard_file
from halo_runtime.core.push import is_view_tensor
from halo_runtime.core.formats import FORMATS, weight_format

from . import __version__
from .calib import calibration_text, read_text_file, token_chunks
from .cluster import ClusterProfile, load_profile
from .compensate import compensate_layer
from .emit import emit_streaming
from .failover import plan_failover
from .group import group_layer
from .load import LoadedModel, ModelError, load_model
from .place import (
    Placement,
    PlacementInputs,
    check_capacity,
    choose_rounds,
    device_reports,
    importance_at_risk,
    mark_streaming,
    placement_inputs,
)
from .roundcost import plan_network_ms
from .predict import LayerPredictor, predict_layer
from .profiling import profile_layers
from .score import plan_groups, score_layer
from .steps import StepTimer


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
    weights: str = "fp32"
    """Format the shards store weights in: fp32, bf16, q8_0 or q4_0 (halo_runtime.core.formats)."""
    failover: bool = True
    """Plan where each remote device's groups go if it dies, and keep their weights in the survivors' shards."""
    rounds: str = "auto"
    """Rounds the runtime runs by default: star, push, or auto (the cheaper on the profile's links by the cost
    model); push plans also record the rounds that cost less through the coordinator (`Plan.star_rounds`)."""

    def __post_init__(self):
        checks = {"calib_tokens": self.calib_tokens >= 16, "chunk_tokens": self.chunk_tokens >= 16,
                  "sample_tokens": self.sample_tokens >= 16, "mlp_groups": self.mlp_groups >= 1,
                  "relaxed_share": 0 <= self.relaxed_share < 1, "max_context": self.max_context >= 1,
                  "predictor_rank": self.predictor_rank >= 1, "compensation_rank": self.compensation_rank >= 0,
                  "predictor_threshold": 0 < self.predictor_threshold < 1, "solver_time": self.solver_time > 0,
                  "rounds": self.rounds in ("auto", *ROUNDS)}
        weight_format(self.weights)  # ValueError naming the choices, or what replaced an old format
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"option {name}: invalid value {getattr(self, name)!r}")


def _log(opts: CompileOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def _calibration_chunks(model: LoadedModel, opts: CompileOptions) -> list[list[int]]:
    from transformers import PreTrainedTokenizerFast

    text = read_text_file(opts.calib_file) if opts.calib_file else calibration_text()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model.tokenizer_file))
    # tokenise only as much text as the budget needs (about 4 characters a token)
    ids = tok(text[: opts.calib_tokens * 8], add_special_tokens=False)["input_ids"]
    return token_chunks(ids, opts.chunk_tokens, opts.calib_tokens)


def compile_plan(model_spec: str, profile_path: str | Path, out_dir: str | Path | None,
                 opts: CompileOptions = CompileOptions(), timer: StepTimer | None = None) -> tuple[Plan, Path]:
    """Compile a model for a cluster into `out_dir` (default artifacts/<model>-<profile>); the plan as
    plan.json holds it, and the directory. `timer` records each step's time and memory."""
    timer = timer or StepTimer()
    torch.manual_seed(opts.seed)
    started = time.perf_counter()
    with timer.step("load"):
        cluster = load_profile(profile_path, opts.weights)  # each device's compute for this weight format
        _log(opts, f"[1/7] load {model_spec}")
        model = load_model(model_spec, progress=opts.progress)
        cfg, num_layers = model.config, model.config.num_layers
        out = Path(out_dir) if out_dir else Path("artifacts") / f"{model.name}-{cluster.name}"
        # shapes only (meta tensors): the capacity check and the solver count bytes, never read values
        shapes = {k: torch.empty(v, device="meta") for k, v in model.shapes.items()}
        check_blocks(cfg, opts.weights)
        check_capacity(cfg, cluster.devices, cluster.coordinator, shapes, opts.max_context, opts.weights)
        chunks = _calibration_chunks(model, opts)

    _log(opts, f"[2/7] profile on {opts.calib_tokens} calibration tokens, layer by layer")
    _log(opts, f"[3/7] group, [4/7] score and fit compensation, [5/7] train predictors ({num_layers} layers)")
    groups, scores, compensations, predictors = [], [], [], []
    layers = profile_layers(model, chunks, opts.sample_tokens, opts.seed, opts.progress)
    while True:
        with timer.step("profile"):
            item = next(layers, None)
        if item is None:
            break
        i, stats, w = item
        gate, up, down = (w[f"model.layers.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        with timer.step("group"):
            groups.append(group_layer(stats.mlp_in, gate, up, down, stats.mean_abs_act, cfg.num_kv_heads,
                                      opts.mlp_groups, opts.seed, acts=stats.mlp_act, unit=FORMATS[opts.weights].block))
        with timer.step("score"):
            scores.append(score_layer(groups[i], stats.kv_norm_sum, opts.relaxed_share))
        with timer.step("compensate"):
            compensations.append(compensate_layer(stats.mean_act, stats.mlp_in, gate, up, down, groups[i], scores[i],
                                                  opts.compensation_rank))
        with timer.step("predict"):
            predictors.append(predict_layer(stats.attn_in, stats.mlp_in, gate, up, down, groups[i],
                                            opts.predictor_threshold, opts.predictor_rank, opts.seed + i,
                                            acts=stats.mlp_act))
        del item, stats, w, gate, up, down  # the layer's weights and samples: the next layer replaces them

    with timer.step("place"):
        unplaced = [g for i in range(num_layers) for g in plan_groups(i, groups[i], scores[i])]
        coordinator_tensors = {}
        for i in range(num_layers):
            coordinator_tensors.update(predictors[i].tensors(i))
            coordinator_tensors.update(compensations[i].tensors(i))
        _log(opts, f"[6/7] place {len(unplaced)} groups on {len(cluster.devices)} devices (CP-SAT)")
        select_rate = {g.id: predictors[g.layer].select_rate[g.index] for g in unplaced if g.kind == "mlp"}
        inputs = placement_inputs(cfg, unplaced, cluster.devices, cluster.coordinator,
                                  {**shapes, **coordinator_tensors}, opts.max_context, opts.seed,
                                  opts.solver_time, select_rate, opts.weights)
        blind = inputs.place_loss_blind()
        placement = inputs.place(baseline=blind)  # never dominated by the loss-blind plan
        _log(opts, f"      placement solved in {placement.solve_wall_s:.1f} s wall, "
                   f"loss-blind in {blind.solve_wall_s:.1f} s")
        failover = plan_failover(inputs, placement.assignment, num_layers) if opts.failover else ()
        _log_failover(opts, failover)
        # what every device's push view maps (core.push.is_view_tensor): predictor, compensation and
        # two norms a layer, fp32 in every weights format
        view_bytes = (sum(t.numel() * 4 for k, t in coordinator_tensors.items() if is_view_tensor(k))
                      + 2 * num_layers * cfg.hidden_size * 4)
        plan = choose_rounds(_plan(model, cluster, opts, unplaced, predictors, inputs, placement, blind, failover),
                             opts.rounds, view_bytes)
        net, mix = plan_network_ms(plan)
        _log(opts, f"      rounds: {plan.rounds} ({'--rounds' if opts.rounds != 'auto' else 'auto'}; cost model: star "
                   f"{net['star']:.1f} ms, push {net['push']:.1f} ms, push with {len(mix)} star rounds "
                   f"{net['mixed']:.1f} ms of network a token)")

    with timer.step("emit"):
        _log(opts, f"[7/7] emit {out}")
        # the model and (quantised once, by group) weights fingerprints are hashed as emit reads the weights
        plan, out = emit_streaming(out, plan, model.weights, coordinator_tensors, model.tokenizer_file)
    _log(opts, f"compiled in {time.perf_counter() - started:.1f} s")
    # hand back exactly what plan.json holds (floats rounded), so reports agree with `inspect`
    return Plan.from_json(plan.to_json()), out


def check_blocks(cfg, weights: str) -> None:
    """A block format needs every row and every group's columns in whole blocks: ModelError naming the
    dimension that is not (hidden size, MLP width, or an attention group's query heads x head_dim)."""
    block = FORMATS[weights].block
    dims = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "query heads per KV head x head_dim": cfg.group_size * cfg.head_dim}
    for name, n in dims.items():
        if n % block:
            raise ModelError(f"--weights {weights} stores blocks of {block} inputs; the model's {name} is {n}, "
                             f"not a multiple (use fp32 or bf16)")


def _log_failover(opts: CompileOptions, failover: tuple[Failover, ...]) -> None:
    """The compiler's summary of the failover: devices covered, and each one whose loss ends a run."""
    if not opts.failover:
        _log(opts, "      failover: not planned (--no-failover): a remote device's death ends a run")
        return
    covered = [f.device for f in failover if f.absorbable]
    _log(opts, f"      failover: {len(covered)} of {len(failover)} remote devices with critical groups covered"
               + (f" ({', '.join(covered)})" if covered else ""))
    for f in failover:
        if not f.absorbable:
            _log(opts, f"      failover: {f.device} cannot be absorbed, its death ends a run: {f.reason}")


def _plan(model: LoadedModel, cluster: ClusterProfile, opts: CompileOptions, groups, predictors: list[LayerPredictor],
          inputs: PlacementInputs, placement: Placement, blind: Placement, failover: tuple[Failover, ...] = ()) -> Plan:
    """The plan record: the placed groups, the reports of every step, the failover, and the streaming marks."""
    cfg, trained = model.config, [p.trained for p in predictors]
    plan = Plan(
        schema_version=SCHEMA_VERSION, compiler_version=__version__, seed=opts.seed,
        model_name=model.name, model_fingerprint="pending", model=cfg,
        profile_name=cluster.name, profile_fingerprint=cluster.fingerprint,
        coordinator=cluster.coordinator, devices=cluster.devices, max_context=opts.max_context,
        groups=tuple(replace(g, device=placement.assignment[g.id]) for g in groups),
        predictor=PredictorReport(opts.predictor_rank, opts.predictor_threshold,
                                  tuple(t.positive_rate for t in trained), tuple(t.recall for t in trained),
                                  tuple(t.precision for t in trained)),
        solver=placement.solver, device_reports=device_reports(inputs, placement, cfg.num_layers),
        predicted_token_ms=placement.predicted_token_ms,
        expected_lost_importance=placement.expected_lost_importance,
        loss_blind_token_ms=blind.predicted_token_ms,
        loss_blind_lost_importance=importance_at_risk(inputs.costs, blind.assignment, inputs.miss, cfg.num_layers),
        shards=tuple(shard_file(dev.name) for dev in cluster.devices),
        # emit fills in both fingerprints as it reads the weights (the weights one needs the groups)
        weights=opts.weights, weights_fingerprint="" if opts.weights == "fp32" else "pending",
        failover=failover)
    return mark_streaming(plan, inputs)
