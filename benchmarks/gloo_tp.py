"""External baseline: tensor parallelism through torch.distributed (gloo) all-reduce, HALO's partition.

What a user would reach for to split one model over several CPU boards: every rank holds the same
groups a HALO plan gives its device (same shards, `halo_runtime.DeviceCompute` for the math), keeps
a replica of the residual stream, and after each attention and each MLP block the partial sums
are added with `all_reduce` (gloo over TCP; every part awaited, no relaxation). Per token: one
broadcast of the token's embedding from rank 0 plus two all-reduces per layer (61 collectives for
30 layers, like distributed-llama's 62). Rank 0 (the plan's coordinator) computes the LM head and
prints the JSON result; the others print nothing on stdout.

Rank r runs device r of the plan with the coordinator first. TCP congestion control: gloo's sockets
are pinned to cubic by preloading `tcp_cc_preload.c` (built on the fly with gcc, `--no-preload` to
skip); the result says which algorithm was in effect.

Example (one process per device; in the lab each runs in its own namespace):
    $ python -m benchmarks.gloo_tp --plan artifacts/smollm2-135m-pi5 --rank 0 --master 10.77.0.1:29500 \
          --prompt "Hello" --max-tokens 64 --json      # and --rank 1, 2, 3 on the other devices
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
try:
    import halo_runtime  # noqa: F401  (installed by `make install`)
except ImportError:
    sys.path.insert(0, str(ROOT / "runtime"))
from benchmarks.benchcommon import percentiles  # noqa: E402


def preload_library() -> str | None:
    """Path of the built LD_PRELOAD shim (cached by source hash), or None if gcc is missing."""
    src = HERE / "tcp_cc_preload.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"halo-tcp-cc-{digest}.so"
    if out.exists():
        return str(out)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    os.replace(tmp, out)
    return str(out)


def rank_order(plan) -> list[str]:
    return [plan.coordinator] + [d for d in plan.device_names if d != plan.coordinator]


def _tcp_cc_in_effect() -> str:
    """Congestion control of this process's established TCP sockets, from `ss -tin` (best effort)."""
    try:
        out = subprocess.run(["ss", "-tinp"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    mine, found, take = f"pid={os.getpid()},", set(), False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            take = mine in line
        elif take:
            for cc in ("cubic", "reno", "bbr"):
                if f" {cc} " in f" {line.strip()} ":
                    found.add(cc)
    return ",".join(sorted(found)) or "unknown"


def run(args) -> dict | None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from halo_runtime.core.coordinator import rms_norm
    from halo_runtime.core.device import DeviceCompute
    from halo_runtime.core.plan import load_plan
    from halo_runtime.core.plandir import TOKENIZER_FILE
    from halo_runtime.core.segment import Runner, Segment, Tables
    from halo_runtime.core.shards import load_shard, read_safetensors
    from halo_runtime.core.tokenizer import Tokenizer

    torch.set_num_threads(1)
    plan = load_plan(args.plan)
    order = rank_order(plan)
    if not 0 <= args.rank < len(order):
        raise SystemExit(f"--rank {args.rank}: the plan has {len(order)} devices")
    device = order[args.rank]
    cfg = plan.model
    shard = load_shard(args.plan, plan, device)
    compute = DeviceCompute(plan, device, shard)
    coord = shard if args.rank == 0 else read_safetensors(Path(args.plan) / plan.shard_file(plan.coordinator))
    # every rank keeps a replica of the residual stream, so every rank applies the norms
    norms = [(np.asarray(coord[f"layers.{i}.input_layernorm"]), np.asarray(coord[f"layers.{i}.post_attention_layernorm"]))
             for i in range(cfg.num_layers)]
    if args.rank == 0:  # embeddings and LM head, through the runtime's own graphs
        runner = Runner(compute, Tables(cfg, plan.weights, shard, compute.arena), plan.max_context)
        embed_seg = Segment((), embed=True, head=False, predictor_layer=None)
        head_seg = Segment((), embed=False, head=True, predictor_layer=None)
    tok = Tokenizer.from_file(Path(args.plan) / TOKENIZER_FILE)
    prompt = tok.encode(args.prompt)
    if len(prompt) + args.max_tokens > plan.max_context:
        raise SystemExit("prompt + max tokens exceed the plan's max context")
    wire = {"fp16": torch.float16, "fp32": torch.float32}[args.wire]

    def all_reduce(part: np.ndarray) -> np.ndarray:
        """The sum of every rank's part, sent as `wire`."""
        t = torch.from_numpy(np.ascontiguousarray(part)).to(wire)
        dist.all_reduce(t)
        return t.float().numpy()

    def attention(layer, position, x):
        part = compute.attention(layer, x, position) if compute.has_attention(layer) else np.zeros_like(x)
        return all_reduce(part)

    def mlp(layer, m):
        part = np.zeros_like(m)
        if compute.has_mlp(layer):
            for p in compute.mlp(layer, m):
                if p is not None:
                    part = part + p
        return all_reduce(part)

    host, _, port = args.master.rpartition(":")
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=args.rank, world_size=len(order),
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        dist.barrier()
        tokens, token_ms = [], []
        feed = list(prompt)
        start = 0
        eps = cfg.rms_norm_eps
        for step in range(args.max_tokens):
            t0 = time.perf_counter()
            T = len(feed)
            if args.rank == 0:
                h = torch.from_numpy(runner.run("embed", embed_seg, np.asarray(feed, np.int32), start)[0]).to(wire)
            else:
                h = torch.empty(T, cfg.hidden_size, dtype=wire)
            dist.broadcast(h, 0)
            h = h.float().numpy()
            for layer in range(cfg.num_layers):
                h = h + attention(layer, start, rms_norm(h, norms[layer][0], eps))
                h = h + mlp(layer, rms_norm(h, norms[layer][1], eps))
            start += T
            if args.rank == 0:
                logits = runner.run("head", head_seg, h, start)[2][-1]
                token = int(np.argmax(logits))
                tokens.append(token)
                feed = [token]
            else:
                feed = [0]  # only its length matters off rank 0
            token_ms.append(1e3 * (time.perf_counter() - t0))
        cc = _tcp_cc_in_effect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if args.rank != 0:
        return None
    decode = token_ms[1:]
    return {"mode": "gloo", "sync": "gloo", "wire": args.wire, "prompt_tokens": len(prompt), "tokens": tokens,
            "text": tok.decode(tokens, skip_special=True), "ttft_ms": round(token_ms[0], 3),
            "tpot_ms": percentiles(decode), "token_ms": [round(t, 3) for t in decode],
            "compensated_share": 0.0, "collectives_per_token": 1 + 2 * cfg.num_layers,
            "world_size": len(order), "ranks": order, "tcp_cc": cc}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--wire", choices=["fp16", "fp32"], default="fp16", help="dtype of the all-reduced tensors")
    ap.add_argument("--timeout-s", type=float, default=900)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-preload", action="store_true", help="do not pin TCP congestion control via LD_PRELOAD")
    args = ap.parse_args(argv)
    if not args.no_preload and "HALO_TCP_CC_PRELOADED" not in os.environ:
        lib = preload_library()
        if lib:  # re-exec with the shim loaded so that gloo's sockets get it
            env = {**os.environ, "LD_PRELOAD": lib, "HALO_TCP_CC_PRELOADED": "1"}
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gloo_tp", *(argv or sys.argv[1:])], env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0" if os.path.exists("/sys/class/net/eth0") else "lo")
    result = run(args)
    if result is not None:
        result["preload"] = os.environ.get("LD_PRELOAD", "")
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            t = result["tpot_ms"]
            print(f"[gloo] {result['text']!r}\n[gloo] TPOT p50 {t['p50']} ms, p90 {t['p90']}, p99 {t['p99']}")


if __name__ == "__main__":
    main()
