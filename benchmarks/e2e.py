"""Weight formats end to end: TPOT and per-device peak RSS of 1-device and 4-device plans in fp32,
bf16, q8_0 and q4_0, each run with `halo-run local --plr 0 --wire fp32` (no loss, exact wire), the
configurations alternating for `--reps` rounds (back to back: the machine is shared). Checks that
the 4-device plans' tokens, run once more with `--sync strict` (every part awaited: a relaxed run
compensates parts that miss their deadline, which a busy machine causes even at 0% loss), equal
the 1-device plans', and reports each format's TPOT over fp32's per device count. Writes JSON and a plot.

`--shape 1b` (default) compiles a random-weight 1B-shape checkpoint (few calibration tokens,
default 512: what is measured here is the runtime, and the groups only need to exist) for the
scale benchmark's generated profiles; `--shape smollm2` compiles the built-in model for
`profiles/single.yaml` and `profiles/pi5.yaml`. Plans already in the work folder are reused.
Called by `scale.py --run` too.

Example:
    $ .venv/bin/python -m benchmarks.e2e --shape smollm2 --reps 3 --out benchmarks/results/formats_tpot.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The history of the Roman Empire begins"
FORMATS = ("fp32", "bf16", "q8_0", "q4_0")
"""Weight formats compared."""
CONFIGS = [(f"{w}-{n}dev", w, n) for n in (1, 4) for w in FORMATS]
"""(name, weights, devices) of every run."""


def _env() -> dict:
    path = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def compile_plan(model: str, profile: Path, out: Path, weights: str, calib_tokens: int | None) -> float | None:
    """Compile unless `out` already holds a plan; seconds taken (None: reused)."""
    if (out / "plan.json").exists():
        return None
    t0 = time.perf_counter()
    calib = ["--calib-tokens", str(calib_tokens)] if calib_tokens else []
    subprocess.run([sys.executable, "-m", "halo_compile.cli", "plan", model, "--cluster", str(profile),
                    "-o", str(out), "--weights", weights, *calib, "-q"], check=True, env=_env(), timeout=3600)
    return round(time.perf_counter() - t0, 1)


def run_local(plan: Path, max_tokens: int, sync: str = "relaxed") -> dict:
    p = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", str(plan), "--plr", "0",
                        "--sync", sync, "--wire", "fp32", "--json", "--quiet", "--ignore-eos", "--draft", "none",
                        "--max-tokens", str(max_tokens), "--prompt", PROMPT],
                       check=True, env=_env(), capture_output=True, text=True, timeout=1800)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: r.get(k) for k in ("tokens", "tpot_ms", "ttft_ms", "peak_rss_mb", "weights", "kernels",
                                  "compensated_share")}


def run_e2e(model: str, work: Path, profiles: dict[tuple[str, int], Path], calib_tokens: int | None = 512,
            max_tokens: int = 32, reps: int = 1) -> dict:
    """Compile (or reuse) and run every configuration `reps` times, alternating; the record."""
    work.mkdir(parents=True, exist_ok=True)
    compile_s = {name: compile_plan(model, profiles[w, n], work / f"plan-{name}", w, calib_tokens)
                 for name, w, n in CONFIGS}
    runs: dict[str, list] = {name: [] for name, _, _ in CONFIGS}
    for rep in range(reps):
        for name, _, _ in CONFIGS:
            load0 = round(os.getloadavg()[0], 2)
            r = run_local(work / f"plan-{name}", max_tokens)
            r["loadavg"] = [load0, round(os.getloadavg()[0], 2)]
            runs[name].append(r)
            print(f"e2e: {name} rep {rep + 1}: TPOT p50 {r['tpot_ms']['p50']} ms, peak RSS {r['peak_rss_mb']}"
                  f" (load {load0})", file=sys.stderr, flush=True)
    p50 = {k: statistics.median(r["tpot_ms"]["p50"] for r in rs) for k, rs in runs.items()}
    rss = {k: max(max(r["peak_rss_mb"].values()) for r in rs) for k, rs in runs.items()}
    tokens = {k: rs[0]["tokens"] for k, rs in runs.items()}
    # relaxed runs compensate parts that miss their deadline even at 0% loss (a busy machine makes
    # devices late), and then may leave the exact tokens by design; strict runs await every part
    strict = {w: run_local(work / f"plan-{w}-4dev", max_tokens, "strict")["tokens"] for w in FORMATS}
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "calib_tokens": calib_tokens, "reps": reps,
            "tokens_equal_across_devices": {w: strict[w] == tokens[f"{w}-1dev"] for w in FORMATS},
            "relaxed_tokens_equal_across_devices": {w: tokens[f"{w}-4dev"] == tokens[f"{w}-1dev"]
                                                    for w in FORMATS},
            "compensated_share": {k: max(r["compensated_share"] or 0 for r in rs) for k, rs in runs.items()},
            "tpot_p50_ms": p50, "max_device_peak_rss_mb": rss,
            "over_fp32_tpot": {w: {n: round(p50[f"{w}-{n}dev"] / p50[f"fp32-{n}dev"], 3) for n in (1, 4)}
                               for w in FORMATS if w != "fp32"},
            "compile_s": compile_s, "runs": runs, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_profiles(shape, work: Path, profile_yaml) -> dict[tuple[str, int], Path]:
    """One generated profile per configuration: its memory follows the format, so every plan spreads."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, w, n in CONFIGS:
        out[w, n] = work / f"{name}.yaml"
        out[w, n].write_text(profile_yaml(shape, w, devices=n))
    return out


def plot(rec: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _, _ in CONFIGS]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(names, [rec["tpot_p50_ms"][n] for n in names], color="tab:blue")
    a.set_ylabel("TPOT p50 (ms)")
    b.bar(names, [rec["max_device_peak_rss_mb"][n] for n in names], color="tab:orange")
    b.set_ylabel("largest device peak RSS (MB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{rec['model']}: weight formats, 1 and 4 local devices, 0% loss (median of {rec['reps']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from benchmarks.benchcommon import machine
    from benchmarks.scale import DEFAULT_CACHE, SHAPES, builtin_tokenizer_dir, profile_yaml, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES) + ["smollm2"])
    ap.add_argument("--calib-tokens", type=int, default=512, help="random shapes only")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "e2e.json")
    args = ap.parse_args(argv)
    work = args.cache / f"e2e-{args.shape}"
    if args.shape == "smollm2":
        model, calib = "smollm2-135m", None
        profiles = {(w, n): ROOT / "profiles" / ("single.yaml" if n == 1 else "pi5.yaml") for _, w, n in CONFIGS}
    else:
        s = SHAPES[args.shape]
        model, calib = str(write_checkpoint(args.cache / f"ckpt-{s.name}", s, 0, builtin_tokenizer_dir())), args.calib_tokens
        profiles = write_profiles(s, work, profile_yaml)
    rec = run_e2e(model, work, profiles, calib, args.max_tokens, args.reps)
    args.out.write_text(json.dumps({"machine": machine(), **rec}, indent=1) + "\n")
    plot(rec, args.out.with_suffix(".png"))
    print(json.dumps({k: rec[k] for k in ("tokens_equal_across_devices", "tpot_p50_ms", "over_fp32_tpot")}))
    return 0 if all(rec["tokens_equal_across_devices"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
