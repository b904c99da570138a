"""End to end at 1B: a random-weight 1B-shape checkpoint compiled for 4 local devices in fp32, bf16
and int8, and for 1 device in int8, each run with `halo-run local --plr 0 --wire fp32` (no loss,
exact wire): the 4-device int8 tokens must equal the 1-device int8 plan's, and each run's TPOT and
per-device peak RSS are recorded. Called by `scale.py --run`, or on its own.

Plans compile with few calibration tokens (default 512): what is measured here is the runtime,
and the groups only need to exist.

Example:
    $ .venv/bin/python benchmarks/e2e.py --shape 1b --out benchmarks/results/e2e.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The history of the Roman Empire begins"


def _env() -> dict:
    path = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def compile_plan(ckpt: Path, profile: Path, out: Path, weights: str, calib_tokens: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "halo_compile.cli", "plan", str(ckpt), "--cluster", str(profile),
                    "-o", str(out), "--weights", weights, "--calib-tokens", str(calib_tokens), "-q"],
                   check=True, env=_env(), timeout=3600)
    return round(time.perf_counter() - t0, 1)


def run_local(plan: Path, max_tokens: int) -> dict:
    p = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", str(plan), "--plr", "0",
                        "--wire", "fp32", "--json", "--quiet", "--ignore-eos", "--max-tokens", str(max_tokens),
                        "--prompt", PROMPT], check=True, env=_env(), capture_output=True, text=True, timeout=1800)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: r.get(k) for k in ("tokens", "tpot_ms", "ttft_ms", "peak_rss_mb", "weights", "kernels", "sync")}


def run_e2e(ckpt: Path, shape, work: Path, profile_yaml, calib_tokens: int = 512, max_tokens: int = 32) -> dict:
    """Compile and run every configuration; the record (runs by name, token equality, TPOT ratios)."""
    work.mkdir(parents=True, exist_ok=True)
    configs = [("int8-1dev", "int8", 1), ("int8-4dev", "int8", 4), ("bf16-4dev", "bf16", 4), ("fp32-4dev", "fp32", 4)]
    runs = {}
    for name, weights, devices in configs:
        profile = work / f"{name}.yaml"
        profile.write_text(profile_yaml(shape, weights, devices=devices))
        plan = work / f"plan-{name}"
        compile_s = compile_plan(ckpt, profile, plan, weights, calib_tokens)
        load0 = round(os.getloadavg()[0], 2)
        r = run_local(plan, max_tokens)
        r.update(compile_s=compile_s, loadavg=[load0, round(os.getloadavg()[0], 2)], devices=devices)
        runs[name] = r
        print(f"e2e: {name}: TPOT p50 {r['tpot_ms']['p50']} ms, peak RSS {r['peak_rss_mb']}", file=sys.stderr, flush=True)
    p50 = {k: r["tpot_ms"]["p50"] for k, r in runs.items()}
    return {"shape": shape.name, "prompt": PROMPT, "max_tokens": max_tokens, "calib_tokens": calib_tokens,
            "int8_4dev_tokens_equal_1dev": runs["int8-4dev"]["tokens"] == runs["int8-1dev"]["tokens"],
            "tpot_p50_ms": p50,
            "tpot_ratio_vs_int8_4dev": {k: round(v / p50["int8-4dev"], 2) for k, v in p50.items() if v},
            "runs": runs, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from benchcommon import machine
    from scale import DEFAULT_CACHE, SHAPES, builtin_tokenizer_dir, profile_yaml, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "e2e.json")
    args = ap.parse_args(argv)
    s = SHAPES[args.shape]
    ckpt = write_checkpoint(args.cache / f"ckpt-{s.name}", s, 0, builtin_tokenizer_dir())
    rec = run_e2e(ckpt, s, args.cache / f"e2e-{s.name}", profile_yaml, args.calib_tokens, args.max_tokens)
    args.out.write_text(json.dumps({"machine": machine(), **rec}, indent=1) + "\n")
    print(json.dumps({k: rec[k] for k in ("int8_4dev_tokens_equal_1dev", "tpot_p50_ms")}))
    return 0 if rec["int8_4dev_tokens_equal_1dev"] else 1


if __name__ == "__main__":
    sys.exit(main())
