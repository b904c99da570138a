"""HALO against any other system, side by side in one run on this machine: time per output token.

`one`: one device, no network. HALO's side is `halo-run local` on a one-device plan (`--plr 0
--draft none --ignore-eos`); the other side is any command that prints its per-token times, given
with `--peer` (placeholders {threads}, {tokens}, {prompt}) and read by `--peer-format`:

- `dllama`: distributed-llama's `dllama inference` lines `Pred X ms Sync Y ms | ...` (a token's
  time is X + Y; its first line is dropped, as HALO's first token is, since it includes set-up);
- `lines`: one number per line, milliseconds per token (first dropped the same way);
- `json`: a JSON object with `tpot_ms.p50` (HALO's own `--json`) on its last line.

The two alternate, `--reps` times per thread count, each run started after the machine's 1-minute
load falls below `--quiet-load` (or `--settle` seconds pass); every run records the load it saw.
Writes JSON (per thread count: each side's TPOT p50 per rep, the ratio halo / peer of the medians)
and a bar plot next to it. The ratio is the figure; absolute times belong to this machine only.

    $ python -m benchmarks.compare one --plan out/plans/S-q4_0-1dev --threads 1,2 --reps 2 \\
        --peer 'dllama inference --model M.m --tokenizer T.t --buffer-float-type q80 --nthreads {threads}
                --steps 60 --prompt "{prompt}" --temperature 0 --seed 0' --peer-format dllama

Example (the parsers):
    >>> from benchmarks.compare import parse
    >>> parse("dllama", "🔶 Pred 21 ms Sync 0 ms | Sent 0 kB\\n🔶 Pred 20 ms Sync 1 ms | x\\n🔶 Pred 19 ms Sync 0 ms | y")
    [21.0, 19.0]
    >>> parse("lines", "5.5\\n4.0\\n4.5\\n"), parse("json", 'noise\\n{"tpot_ms": {"p50": 7.25}}')
    ([4.0, 4.5], [7.25])
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.benchcommon import ROOT, machine
PROMPT = "The history of the Raspberry Pi begins"
FORMATS = ("dllama", "lines", "json")
_DLLAMA = re.compile(r"Pred\s+([\d.]+)\s*ms\s+Sync\s+([\d.]+)\s*ms")


def parse(fmt: str, out: str) -> list[float]:
    """Per-token milliseconds from a command's output (the first token dropped, but for `json`)."""
    if fmt == "dllama":
        return [float(a) + float(b) for a, b in _DLLAMA.findall(out)][1:]
    if fmt == "lines":
        return [float(x) for x in out.split() if re.fullmatch(r"[\d.]+", x)][1:]
    if fmt == "json":
        obj = json.loads([line for line in out.splitlines() if line.strip()][-1])
        return [float(obj["tpot_ms"]["p50"])]
    raise ValueError(f"unknown --peer-format {fmt!r} (known: {', '.join(FORMATS)})")


def wait_quiet(load: float, settle: float) -> float:
    """Wait until the 1-minute load is below `load` or `settle` seconds passed; the load seen."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= load and time.monotonic() - t0 < settle:
        time.sleep(2)
    return round(os.getloadavg()[0], 2)


def run_halo(plan: str, threads: int, tokens: int, prompt: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--plr", "0", "--draft", "none",
           "--ignore-eos", "--json", "--quiet", "--threads", str(threads), "--max-tokens", str(tokens),
           "--prompt", prompt]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"halo-run failed: {p.stderr[-800:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"tpot_p50_ms": r["tpot_ms"]["p50"], "weights": r["weights"], "kernels": r["kernels"],
            "peak_rss_mb": r["peak_rss_mb"], "tokens": len(r["tokens"])}


def run_peer(template: str, fmt: str, threads: int, tokens: int, prompt: str, timeout: float) -> dict:
    cmd = template.format(threads=threads, tokens=tokens, prompt=prompt)
    p = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"peer command failed ({p.returncode}): {(p.stderr or p.stdout)[-800:]}")
    times = parse(fmt, p.stdout + p.stderr)
    if not times:
        raise RuntimeError(f"no per-token times in the peer's output (format {fmt}): {p.stdout[-400:]}")
    return {"tpot_p50_ms": round(statistics.median(times), 3), "tokens": len(times)}


def one_device(args) -> dict:
    rows = []
    for threads in args.threads:
        halo, peer = [], []
        for rep in range(args.reps):
            for side in ("halo", "peer"):
                load = wait_quiet(args.quiet_load, args.settle)
                if side == "halo":
                    r = run_halo(args.plan, threads, args.tokens, args.prompt, args.timeout)
                    halo.append({**r, "loadavg_1m": load})
                else:
                    r = run_peer(args.peer, args.peer_format, threads, args.tokens, args.prompt, args.timeout)
                    peer.append({**r, "loadavg_1m": load})
                print(f"threads {threads} rep {rep} {side}: TPOT p50 {r['tpot_p50_ms']} ms (load {load})",
                      file=sys.stderr, flush=True)
        h = statistics.median(r["tpot_p50_ms"] for r in halo)
        p = statistics.median(r["tpot_p50_ms"] for r in peer)
        rows.append({"threads": threads, "halo": halo, "peer": peer, "halo_ms": round(h, 3), "peer_ms": round(p, 3),
                     "ratio_halo_over_peer": round(h / p, 3)})
    return {"mode": "one", "plan": args.plan, "peer_command": args.peer, "peer_format": args.peer_format,
            "label": args.label, "tokens": args.tokens, "prompt": args.prompt, "reps": args.reps,
            "machine": machine(), "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(5 + len(rows), 3.6))
    ax.bar([i - 0.2 for i in x], [r["halo_ms"] for r in rows], 0.4, label="halo")
    ax.bar([i + 0.2 for i in x], [r["peer_ms"] for r in rows], 0.4, label=result.get("label") or "peer")
    ax.set_xticks(list(x), [f"{r['threads']} thread(s)\n{r['ratio_halo_over_peer']}x" for r in rows])
    ax.set_ylabel("TPOT p50 (ms)")
    ax.set_title(f"one device: {Path(result['plan']).name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("one", help="one device, no network")
    one.add_argument("--plan", required=True, help="a one-device plan directory (shards included)")
    one.add_argument("--peer", required=True, help="the other system's command ({threads}, {tokens}, {prompt})")
    one.add_argument("--peer-format", choices=FORMATS, default="dllama")
    one.add_argument("--label", default="peer", help="the other system's name in the plot")
    one.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    one.add_argument("--reps", type=int, default=2)
    one.add_argument("--tokens", type=int, default=48)
    one.add_argument("--prompt", default=PROMPT)
    one.add_argument("--quiet-load", type=float, default=0.5, help="start a run below this 1-minute load")
    one.add_argument("--settle", type=float, default=60, help="or after this many seconds of waiting")
    one.add_argument("--timeout", type=float, default=900)
    one.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_one.json")
    args = ap.parse_args(argv)
    result = one_device(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for r in result["rows"]:
        print(f"{r['threads']} thread(s): halo {r['halo_ms']} ms, {args.label} {r['peer_ms']} ms, "
              f"ratio {r['ratio_halo_over_peer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
