"""Compiler scaling: compile seeded random-weight LLaMA checkpoints of real shapes (135M to 8B) for
a 4-device cluster, and record wall time, CPU time and peak RSS per compile step.

Checkpoints are HF LLaMA directories in bf16 safetensors, written one layer per file with a
`model.safetensors.index.json` (so writing 8B never holds more than a layer), the built-in
SmolLM2 tokenizer (vocab 49152) and a config.json. Each shape compiles in a fresh process, for a
generated 4-device profile whose memory (a third of the model each, plus the coordinator's
embeddings) makes the groups spread. Results: JSON (per shape: steps, totals, plan summary with
the predictor's recall), a plot of time and memory against parameters, and a markdown table.

`--run` adds the end-to-end check of the 1B shape (`e2e.run_e2e`): its q8_0 plan on 4 local
devices at 0% loss gives the greedy tokens of a 1-device q8_0 plan of the same weights, and TPOT
and per-device peak RSS are measured next to fp32 and bf16.

Example:
    >>> from benchmarks.scale import SHAPES, parameters
    >>> SHAPES["8b"].intermediate, round(parameters(SHAPES["8b"]) / 1e9, 2), round(parameters(SHAPES["1b"]) / 1e9, 2)
    (14336, 7.38, 1.07)

Usage:
    $ .venv/bin/python -m benchmarks.scale --shapes 135m,1b,3b,8b --weights q8_0 \\
        --out benchmarks/results/scale.json [--keep] [--calib-tokens 8b=2048] [--run]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CACHE = Path(os.environ.get("HALO_SCALE_CACHE", "/tmp/halo-scale"))


@dataclass(frozen=True)
class Shape:
    """A LLaMA shape to compile."""

    name: str
    """Short name (135m, 1b, ...)."""
    hidden: int
    """hidden_size."""
    layers: int
    """num_hidden_layers."""
    heads: int
    """num_attention_heads."""
    kv_heads: int
    """num_key_value_heads."""
    intermediate: int
    """intermediate_size (FFN neurons per layer)."""
    vocab: int = 49152
    """vocab_size (the built-in SmolLM2 tokenizer's)."""
    tie: bool = True
    """tie_word_embeddings."""
    calib_tokens: int = 8192
    """Default calibration tokens for this shape (the compile's budget on 2 cores)."""

    def __post_init__(self):
        if min(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.vocab) < 1:
            raise ValueError(f"shape {self.name}: every size must be positive")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"shape {self.name}: heads must divide hidden and kv_heads divide heads")


SHAPES = {
    "135m": Shape("135m", 576, 30, 9, 3, 1536),
    # 1B and up calibrate on 1024 tokens: the 1B sweep (docs/BENCHMARKS.md) kept predictor recall
    # (0.897 mean at 1024 tokens, 0.905 at 2048, 0.853 at 4096) and met the 5-minute budget only there
    "1b": Shape("1b", 2048, 16, 32, 8, 8192, calib_tokens=1024),
    "3b": Shape("3b", 3072, 28, 24, 8, 8192, calib_tokens=1024),
    "8b": Shape("8b", 4096, 32, 32, 8, 14336, tie=False, calib_tokens=1024),
}


def parameters(s: Shape) -> int:
    hd = s.hidden // s.heads
    layer = 2 * s.hidden * s.heads * hd + 2 * s.hidden * s.kv_heads * hd + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return s.layers * layer + s.vocab * s.hidden * (1 if s.tie else 2) + s.hidden


def config_json(s: Shape) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "intermediate_size": s.intermediate, "vocab_size": s.vocab, "tie_word_embeddings": s.tie,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 8192, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def _tensor(name: str, shape: tuple[int, ...], seed: int):
    """One weight, seeded by (seed, name) so it never depends on what else is written."""
    import torch

    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    if len(shape) == 1:  # norms: around 1, random so that applying them matters
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    # std 0.02, HF's initializer_range; the residual stream stays O(1) over 32 layers
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def write_checkpoint(out: Path, s: Shape, seed: int, tokenizer_dir: Path) -> Path:
    """A random-weight HF LLaMA directory of shape `s`, written one layer per safetensors file."""
    from safetensors.torch import save_file

    if (out / "halo-scale.json").is_file() and json.loads((out / "halo-scale.json").read_text()) == \
            {"shape": asdict(s), "seed": seed}:
        return out  # already written by an earlier run with --keep
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    hd, files, index = s.hidden // s.heads, [], {}
    per_layer = {"self_attn.q_proj": (s.heads * hd, s.hidden), "self_attn.k_proj": (s.kv_heads * hd, s.hidden),
                 "self_attn.v_proj": (s.kv_heads * hd, s.hidden), "self_attn.o_proj": (s.hidden, s.heads * hd),
                 "mlp.gate_proj": (s.intermediate, s.hidden), "mlp.up_proj": (s.intermediate, s.hidden),
                 "mlp.down_proj": (s.hidden, s.intermediate), "input_layernorm": (s.hidden,),
                 "post_attention_layernorm": (s.hidden,)}
    units = [{"model.embed_tokens.weight": (s.vocab, s.hidden)}]
    units += [{f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()} for i in range(s.layers)]
    last = {"model.norm.weight": (s.hidden,)}
    if not s.tie:
        last["lm_head.weight"] = (s.vocab, s.hidden)
    units.append(last)
    for n, unit in enumerate(units):
        name = f"model-{n + 1:05d}-of-{len(units):05d}.safetensors"
        save_file({k: _tensor(k, v, seed) for k, v in unit.items()}, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in unit})
        files.append(name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(config_json(s), indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / f).is_file():
            shutil.copyfile(tokenizer_dir / f, out / f)
    (out / "halo-scale.json").write_text(json.dumps({"shape": asdict(s), "seed": seed}))
    return out


def builtin_tokenizer_dir() -> Path:
    """The built-in SmolLM2's converted directory (its tokenizer files; converted once, cached)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]
    from halo_compile.load import load_model

    return load_model("smollm2-135m", progress=False).tokenizer_file.parent


def profile_yaml(s: Shape, weights: str, devices: int = 4, share: float = 0.34, base_port: int = 7900,
                 max_context: int = 2048) -> str:
    """A cluster of `devices` loopback devices, each with memory for `share` of the model's layers in
    format `weights` (so none can hold it alone) plus, on the coordinator, its fixed tensors."""
    sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]
    from halo_runtime.core.residency import BYTES_PER_WEIGHT, weight_bytes

    from halo_compile.load import config_from_json

    cfg = config_from_json(config_json(s), s.name)
    layer = weight_bytes(cfg, "attn", cfg.num_kv_heads, weights) + weight_bytes(cfg, "mlp", cfg.intermediate_size, weights)
    kv = 2 * max_context * cfg.head_dim * cfg.num_kv_heads * BYTES_PER_WEIGHT
    body = cfg.num_layers * (layer + kv)
    fixed = s.vocab * s.hidden * 4 * (1 if s.tie else 2)  # embeddings and LM head: fp32 bound on any format
    # predictor and compensation tensors (defaults: rank 32 and 16, 16 groups, about a quarter relaxed)
    fixed += cfg.num_layers * 4 * (32 * s.hidden + 16 * 33 + 16 * s.hidden + 4 * (3 * 16 * s.hidden + s.hidden + 2))
    mb = lambda n: round(n / 1e6, 3) + 0.001  # noqa: E731
    lines = [f"name: scale-{s.name}", f"description: {devices} loopback devices, memory for {share:.0%} of "
             f"the {s.name} shape's {weights} layers each", "coordinator: dev0",
             "defaults: {compute_gflops: 2, latency_ms: 0.05, jitter_ms: 0.0, bandwidth_mbps: 10000, loss: 0.0}",
             "devices:"]
    for i in range(devices):
        mem = body * (share if devices > 1 else 1.2) + (fixed if i == 0 else 0)
        lines.append(f"  - {{name: dev{i}, address: '127.0.0.1:{base_port + i}', memory_mb: {mb(mem)}}}")
    return "\n".join(lines) + "\n"


def compile_one(model_dir: Path, profile: Path, out: Path, weights: str, calib_tokens: int, result: Path) -> None:
    """In this process: compile with a StepTimer and write its record (the child side of `run_compile`)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]
    import resource

    from halo_compile.pipeline import CompileOptions, compile_plan
    from halo_compile.steps import StepTimer

    timer = StepTimer()
    opts = CompileOptions(calib_tokens=calib_tokens, sample_tokens=min(4096, calib_tokens), weights=weights,
                          progress=bool(os.environ.get("HALO_SCALE_PROGRESS")))
    wall, cpu = time.perf_counter(), time.process_time()
    plan, _ = compile_plan(str(model_dir), profile, out, opts, timer=timer)
    rec = timer.to_json()
    rec["total"].update(wall_s=round(time.perf_counter() - wall, 3), cpu_s=round(time.process_time() - cpu, 3),
                        # ru_maxrss forgets peaks the step timer's VmHWM resets cleared: take both
                        peak_rss_mb=max(rec["total"]["peak_rss_mb"],
                                        round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)))
    recall = list(plan.predictor.recall)
    rec["plan"] = {"weights": plan.weights, "groups": len(plan.groups), "calib_tokens": calib_tokens,
                   "recall_mean": round(sum(recall) / len(recall), 4), "recall_min": round(min(recall), 4),
                   "bytes_per_device_mb": {d.name: round(d.weight_bytes / 1e6, 1) for d in plan.device_reports},
                   "devices_used": sum(1 for d in plan.device_reports if d.num_groups)}
    result.write_text(json.dumps(rec, indent=1))


def run_compile(model_dir: Path, profile: Path, out: Path, weights: str, calib_tokens: int, timeout: float) -> dict:
    """Compile in a fresh process (so its peak RSS is this compile's alone); its record."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        cmd = [sys.executable, "-m", "benchmarks.scale", "--compile-one", str(model_dir), str(profile), str(out),
               weights, str(calib_tokens), str(result)]
        subprocess.run(cmd, check=True, timeout=timeout, env=env, cwd=ROOT)
        return json.loads(result.read_text())


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["parameters"] / 1e9 for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["total"]["wall_s"] / 60 for r in results], "o-", label="wall")
    a.plot(xs, [r["total"]["cpu_s"] / 60 for r in results], "s--", label="CPU")
    a.set(xlabel="parameters (billions)", ylabel="minutes", title="compile time")
    b.plot(xs, [r["total"]["peak_rss_mb"] / 1024 for r in results], "o-")
    b.set(xlabel="parameters (billions)", ylabel="GiB", title="compile peak RSS")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        for x, r in zip(xs, results, strict=True):
            ax.annotate(r["shape"], (x, ax.lines[0].get_ydata()[xs.index(x)]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    steps = list(dict.fromkeys(k for r in results for k in r["steps"]))
    head = "| shape | params | format | calib tokens | " + " | ".join(steps) + \
           " | total wall | total CPU | peak RSS | recall mean (min) | load avg |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [f"{r['steps'][s]['wall_s']:.0f} s" if s in r["steps"] else "–" for s in steps]
        t, p = r["total"], r["plan"]
        lines.append(f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {p['weights']} | {p['calib_tokens']} | "
                     + " | ".join(cells) + f" | {t['wall_s'] / 60:.1f} min | {t['cpu_s'] / 60:.1f} min | "
                     f"{t['peak_rss_mb'] / 1024:.2f} GiB | {p['recall_mean']:.3f} ({p['recall_min']:.3f}) | "
                     f"{r['loadavg'][0]}-{r['loadavg'][1]} |")
    return "\n".join(lines) + "\n"


def _per_shape(spec: str | None, shapes: list[str]) -> dict[str, int]:
    """--calib-tokens: one number for all, or `1b=4096,8b=1024` (the rest keep their defaults)."""
    out = {n: SHAPES[n].calib_tokens for n in shapes}
    if spec:
        if "=" not in spec:
            return dict.fromkeys(shapes, int(spec))
        for part in spec.split(","):
            k, v = part.split("=")
            out[k.strip()] = int(v)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--compile-one":
        model_dir, profile, out, weights, calib, result = argv[1:7]
        compile_one(Path(model_dir), Path(profile), Path(out), weights, int(calib), Path(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="135m,1b,3b,8b", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--weights", default="q8_0", help="shard format (fp32|bf16|q8_0|q4_0)")
    ap.add_argument("--calib-tokens", help="calibration tokens: N, or per shape like 1b=4096,8b=1024 "
                                           "[default: per shape, " + ", ".join(f"{k}={v.calib_tokens}" for k, v in SHAPES.items()) + "]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="checkpoints and plans (never committed)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and plans in --cache")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    ap.add_argument("--tokenizer-dir", type=Path, help="tokenizer files [default: the built-in SmolLM2's]")
    ap.add_argument("--run", action="store_true", help="also run the 1B end-to-end check (benchmarks/e2e.py)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        print(f"scale.py: unknown shape {bad[0]} (known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    calib = _per_shape(args.calib_tokens, names)
    tok_dir = args.tokenizer_dir or builtin_tokenizer_dir()
    from benchmarks.benchcommon import machine

    args.cache.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {r["shape"]: r for r in previous.get("results", [])}
    try:
        for name in names:
            s = SHAPES[name]
            t0 = time.perf_counter()
            ckpt = write_checkpoint(args.cache / f"ckpt-{name}", s, args.seed, tok_dir)
            write_s = time.perf_counter() - t0
            profile = args.cache / f"scale-{name}-{args.weights}.yaml"
            profile.write_text(profile_yaml(s, args.weights))
            load0 = round(os.getloadavg()[0], 2)
            print(f"scale: compiling {name} ({parameters(s) / 1e9:.2f} B parameters, {args.weights}, "
                  f"{calib[name]} calibration tokens)", file=sys.stderr, flush=True)
            rec = run_compile(ckpt, profile, args.cache / f"plan-{name}-{args.weights}", args.weights, calib[name],
                              args.timeout)
            rec.update(shape=name, parameters=parameters(s), checkpoint_write_s=round(write_s, 1),
                       loadavg=[load0, round(os.getloadavg()[0], 2)], when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            results[name] = {"shape": name, **{k: v for k, v in rec.items() if k != "shape"}}
            print(f"scale: {name}: {rec['total']['wall_s']:.0f} s wall, {rec['total']['cpu_s']:.0f} s CPU, "
                  f"peak RSS {rec['total']['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            ordered = sorted(results.values(), key=lambda r: r["parameters"])
            _write(args.out, ordered, machine())
        if args.run:
            from benchmarks.e2e import run_e2e, write_profiles
            s = SHAPES["1b"]
            ckpt = write_checkpoint(args.cache / "ckpt-1b", s, args.seed, tok_dir)
            e2e = run_e2e(str(ckpt), args.cache / "e2e", write_profiles(s, args.cache / "e2e", profile_yaml))
            args.out.with_name("e2e.json").write_text(json.dumps({"machine": machine(), **e2e}, indent=1) + "\n")
    finally:
        if not args.keep:
            for name in names:
                shutil.rmtree(args.cache / f"ckpt-{name}", ignore_errors=True)
                shutil.rmtree(args.cache / f"plan-{name}-{args.weights}", ignore_errors=True)
    return 0


def _write(out: Path, results: list[dict], mach: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": mach, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
