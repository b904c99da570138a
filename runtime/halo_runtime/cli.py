"""`halo-run`: run a compiled plan. `worker` on each device, `generate` on the coordinator, or
`local` to start every device as a process on this machine's loopback.

Example:
    $ halo-run local --plan artifacts/smollm2-135m-pi5 --prompt "The capital of France is" --plr 0.05
    $ halo-run worker --plan DIR --device pi5-1 --bind 0.0.0.0:7700          # on each board
    $ halo-run generate --plan DIR --prompt "Hello" --max-tokens 32 --json   # on the coordinator
    $ halo-run serve --plan DIR --local --port 8000      # OpenAI-compatible API and chat page
    $ halo-run probe --serve :7799                       # on the coordinator's board, then on each board:
    $ halo-run probe --peer pi5-0.local:7799 -o pi5-1.yaml   # its profile entry (halo-compile profile merge)
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

from .runstats import peak_rss_mb, percentiles

EXIT_USER_ERROR = 2


def _fail(msg: str) -> None:
    print(f"halo-run: error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        _fail(f"{what}: {text!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


def _field(cls: type, name: str, suffix: str = "") -> dict:
    """argparse's `default` and `help` for a flag that sets dataclass field `name`: the field's
    default and docstring, so the dataclass states the option once."""
    from .core.options import field_default, field_help

    return {"default": field_default(cls, name), "help": field_help(cls, name).replace("%", "%%") + suffix}


def _coordinator_args(p: argparse.ArgumentParser) -> None:
    """Flags of every command that runs the coordinator (generate, local, serve)."""
    from .core.draft import DraftOptions
    from .core.plan import ROUNDS
    from .core.policy import DeliveryPolicy

    p.add_argument("--plan", required=True, help="compiled plan directory")
    p.add_argument("--sync", choices=["relaxed", "strict"], default="relaxed",
                   help="relaxed: UDP, deadlines and compensation (default); strict: TCP, await everything")
    p.add_argument("--rounds", choices=("plan", *ROUNDS), default="plan",
                   help="star: every network round a round trip through the coordinator; push: each device sends "
                        "its part to every other, one hop a round (but the plan's star rounds); plan: what the plan "
                        "chose (default; halo-compile inspect says which)")
    p.add_argument("--wire", choices=["fp16", "fp32"], **_field(DeliveryPolicy, "wire"))
    p.add_argument("--redundancy", type=int, **_field(DeliveryPolicy, "redundancy", "; at most 4"))
    p.add_argument("--multi-datagram-copies", type=int,
                   **_field(DeliveryPolicy, "multi_datagram_copies", " (default %(default)s; 1: as --redundancy)"))
    p.add_argument("--relaxed-retries", type=int,
                   **_field(DeliveryPolicy, "relaxed_retries", " (default %(default)s)"))
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="override a device's address from the plan")
    p.add_argument("--seed", type=int, default=0, help="seed of the loss emulation (local)")
    _key_arg(p)
    p.add_argument("--dead-after", type=float, metavar="S",
                   **_field(DeliveryPolicy, "dead_after_s", " (default %(default)g s)"))
    p.add_argument("--draft", metavar="none|lookup|self|PATH", **_field(DraftOptions, "source", " (default %(default)s)"))
    p.add_argument("--draft-tokens", type=int, metavar="K", **_field(DraftOptions, "tokens", " (default %(default)s)"))
    _threads_arg(p, " (local: the coordinator's; each worker it starts keeps one)")


def _threads_arg(p: argparse.ArgumentParser, suffix: str = "") -> None:
    from .core.compute import SCHED_POLICIES, ComputeOptions

    p.add_argument("--threads", type=int, metavar="N", **_field(ComputeOptions, "threads", suffix))
    p.add_argument("--sched", choices=SCHED_POLICIES, **_field(ComputeOptions, "sched"))


def _generate_args(p: argparse.ArgumentParser) -> None:
    _coordinator_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no per-token lines")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens (benchmarks)")


def _emulation_args(p: argparse.ArgumentParser) -> None:
    """Flags of the in-process loss/delay shim on loopback devices (local, serve --local)."""
    p.add_argument("--plr", type=float, default=None,
                   help="packet loss rate on the plan's lossy links [default: the plan's own rates]")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added on every link")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="std of that delay")


def _key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="deployment key [default: $HALO_KEY_FILE, $HALO_KEY (hex), else PLAN/halo.key]")


def _auth(args, plan_dir: str | None):
    """The deployment key's Authenticator (KeyFileError, a ValueError, becomes one error line)."""
    from .core.plandir import resolve_key
    from .net.auth import Authenticator

    return Authenticator(resolve_key(args.key_file, plan_dir)[0])


def build_parser() -> argparse.ArgumentParser:
    from .storage.groupcache import MODES, LoadConfig

    parser = argparse.ArgumentParser(prog="halo-run", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="serve one device's part of the plan")
    w.add_argument("--plan", required=True)
    w.add_argument("--device", required=True)
    w.add_argument("--bind", default=None, help="HOST:PORT to listen on [default: the plan's address]")
    _key_arg(w)
    w.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--shim-loss", type=float, default=0.0, help=argparse.SUPPRESS)
    w.add_argument("--shim-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    w.add_argument("--shim-jitter-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    w.add_argument("--shim-seed", type=int, default=0, help=argparse.SUPPRESS)
    w.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                   help="RAM for weights (MB, 1e6 bytes): stream the groups that do not fit from the "
                        "memory-mapped shard [default: the plan's budget for this device, else all in RAM]")
    w.add_argument("--load-mode", choices=MODES, **_field(LoadConfig, "mode"))
    w.add_argument("--storage-mbps", type=float, default=None,
                   help="emulate storage reads at this MB/s [default: the plan's storage_mbps]")
    w.add_argument("--warm-storage", action="store_true",
                   help="keep the shard's pages in the page cache (default: drop them after each read)")
    w.add_argument("--stats-file", default=None, help="write the group cache's counters here at exit (JSON)")
    _threads_arg(w)
    g = sub.add_parser("generate", help="generate text as the coordinator")
    _generate_args(g)
    loc = sub.add_parser("local", help="run every device as a local process on loopback (emulated loss)")
    _generate_args(loc)
    _emulation_args(loc)
    loc.add_argument("--compare", action="store_true", help="run relaxed and strict, and print both")
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API, with a chat page")
    _serve_args(s)
    pr = sub.add_parser("probe", help="measure this board and print its profile entry (YAML); --serve: "
                                      "answer other boards' link probes")
    from .probe.command import add_args as _probe_args

    _probe_args(pr)
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    _coordinator_args(p)
    _emulation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free port)")
    p.add_argument("--local", action="store_true", help="also start every device on loopback, like `local`")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB; larger: 413)")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="requests queued or running before new ones get 429 (default 64)")
    from .core.spans import BatchOptions
    p.add_argument("--slots", type=int, metavar="N", **_field(BatchOptions, "slots"))
    p.add_argument("--prefill-chunk", type=int, metavar="TOKENS", **_field(BatchOptions, "prefill_chunk"))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .core.compute import ComputeOptions, rows_differ_by_pass
    from .core.plan import PlanError
    from .net.exchange import DeviceLost
    from .net.transport import TransportError

    try:
        # validates --threads and sets the scheduling before any thread or process starts
        args.sched = ComputeOptions(args.threads, getattr(args, "sched", None)).apply_sched(
            args.command == "local" or getattr(args, "local", False))
        if (why := rows_differ_by_pass()) is not None:
            print(f"halo-run: warning: {why}", file=sys.stderr, flush=True)
        {"worker": run_worker, "generate": run_generate, "local": run_local, "serve": run_serve,
         "probe": _run_probe}[args.command](args)
    except (PlanError, TransportError, DeviceLost, OSError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)


def _run_probe(args) -> None:
    # measuring needs neither plan nor model: the probe's modules load only for `probe`
    from .probe.command import run

    run(args)


# ---- worker --------------------------------------------------------------------------------------

def run_worker(args) -> None:
    from .core.plan import PLAN_FILE, load_plan
    from .core.plandir import check_files
    from .core.push import load_view
    from .core.shards import load_shard
    from .net.shim import LossShim
    from .net.worker import Worker

    plan = load_plan(args.plan)
    if args.device not in plan.device_names:
        _fail(f"{args.plan}: no device {args.device!r} in this plan (devices: {', '.join(plan.device_names)})")
    check_files(args.plan, [PLAN_FILE, plan.shard_file(args.device)])  # a damaged or foreign shard computes garbage
    host, port = _hostport(args.bind, "--bind") if args.bind else (plan.device(args.device).host,
                                                                    plan.device(args.device).port)
    shim = None
    if args.shim_loss or args.shim_delay_ms:
        shim = LossShim(args.shim_loss, args.shim_delay_ms, args.shim_jitter_ms, args.shim_seed)
    compute = _streaming(args, plan)
    shard = {} if compute is not None else load_shard(args.plan, plan, args.device)
    auth = _auth(args, args.plan)
    worker = Worker(plan, args.device, shard, host, port, shim, compute=compute, auth=auth, threads=args.threads,
                    view_source=lambda: load_view(args.plan, plan))
    from .core.compute import kernels
    if args.announce:
        print(json.dumps({"device": args.device, "host": worker.address[0], "port": worker.address[1],
                          "kernels": kernels(), "sched": args.sched}), flush=True)
    else:
        print(f"halo-run worker {args.device} listening on {worker.address[0]}:{worker.address[1]} (UDP and TCP)",
              file=sys.stderr, flush=True)
    try:
        worker.serve_forever()
    finally:
        worker.close()
        if shim:
            shim.close()
        if compute is not None:
            compute.close()
            if args.stats_file:
                with open(args.stats_file, "w") as f:
                    json.dump({**compute.cache.stats.summary(), "budget": compute.residency.budget,
                               "resident_bytes": compute.residency.resident_bytes,
                               "streamed_bytes": compute.residency.streamed_bytes, "mode": compute.mode}, f)


def _streaming(args, plan):
    """A StreamingCompute when a memory budget applies (option or plan), else None."""
    from .storage.groupcache import LoadConfig
    from .storage.streaming import open_streaming, plan_budget

    budget = int(args.memory_budget * 1e6) if args.memory_budget else plan_budget(plan, args.device)
    if budget is None:
        return None
    mbps = args.storage_mbps if args.storage_mbps is not None else plan.device(args.device).storage_mbps
    config = LoadConfig(budget=budget, mode=args.load_mode, mbps=mbps, cold=not args.warm_storage)
    return open_streaming(plan, args.plan, args.device, config)


# ---- generation ----------------------------------------------------------------------------------

def _peers(plan, overrides: list[str]) -> dict[str, tuple[str, int]]:
    peers = {d.name: (d.host, d.port) for d in plan.devices}
    for item in overrides:
        name, sep, addr = item.partition("=")
        if not sep or name not in peers:
            _fail(f"--peer {item!r}: expected NAME=HOST:PORT with NAME one of {', '.join(plan.device_names)}")
        peers[name] = _hostport(addr, f"--peer {name}")
    return peers


def _prompt_ids(tok, text: str, chat: bool, plan_dir: str) -> list[int]:
    if chat:  # the model's own template, as transformers applies it (ChatML for older plans)
        from .core.chat import ChatTemplate

        text = ChatTemplate.for_plan(plan_dir).render([{"role": "user", "content": text}])
    return tok.encode(text)


def _drafts(args, plan):
    """The draft maker of `--draft` (None: no drafts); a bad checkpoint fails here, before any device starts."""
    from .core.draft import DraftOptions, prepare_draft

    return prepare_draft(DraftOptions(args.draft, args.draft_tokens), plan, args.plan)


def generate_once(args, plan, shard, tok, exchange, sync: str, label: str = "", drafts=None) -> dict:
    from .core.compute import kernels
    from .core.coordinator import Coordinator
    from .core.push import PushCoordinator

    coord = (PushCoordinator if args.rounds == "push" else Coordinator)(plan, shard, exchange, threads=args.threads)
    draft = drafts(coord) if drafts is not None else None
    prompt = _prompt_ids(tok, args.prompt, args.chat, args.plan)

    counted = ("bytes_sent", "bytes_received", "retransmissions", "late", "duplicates")

    def counts(stats) -> dict:
        return {k: getattr(stats, k) or 0 for k in counted}  # None: this exchange does not count it

    last = counts(exchange.stats())
    per_token = []

    def on_token(step, token, st):
        now = counts(exchange.stats())
        delta = {k: now[k] - last[k] for k in counted}
        last.update(now)
        per_token.append({"token": token, "total_ms": round(st.total_ms, 3), "compute_ms": round(st.compute_ms, 3),
                          "wait_ms": round(st.wait_ms, 3), "missing": dict(st.missing), "draft_ms": round(st.draft_ms, 3),
                          "pass_tokens": st.pass_tokens,
                          **delta})
        if args.quiet:
            return
        missing = " ".join(f"{d}:{n}" for d, n in sorted(st.missing.items())) or "0"
        kb = (delta["bytes_sent"] + delta["bytes_received"]) / 1024
        print(f"{label}token {step:>3} {tok.decode([token])!r:<14} total {st.total_ms:7.1f} ms  compute "
              f"{st.compute_ms:6.1f}  wait {st.wait_ms:7.1f}  {kb:6.1f} KB  missing {missing}  "
              f"retx {delta['retransmissions']}  late {delta['late']}  dup {delta['duplicates']}",
              file=sys.stderr, flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    eos = None if args.ignore_eos else plan.model.eos_token_id
    # a fresh random session: a device never mistakes this run's requests for an earlier run's
    gen = coord.generate(prompt, args.max_tokens, session=secrets.randbits(32), eos=eos, on_token=on_token,
                         draft=draft, draft_tokens=args.draft_tokens if draft is not None else 0)
    elapsed, own_cpu_ms = time.perf_counter() - started, 1000 * (time.process_time() - cpu_started)
    decode = [s.total_ms for s in gen.token_stats[1:]]
    relaxed = sum(s.relaxed_parts for s in gen.token_stats)
    missing = sum(sum(s.missing.values()) for s in gen.token_stats)
    per_device = {}
    for s in gen.token_stats:
        for d, n in s.missing.items():
            per_device[d] = per_device.get(d, 0) + n
    devices = {d: s.to_json() for d, s in exchange.device_stats().items()} if hasattr(exchange, "device_stats") else {}
    cpu_ms = {plan.coordinator: own_cpu_ms, **{d: s["cpu_ms"] for d, s in devices.items()}}
    return {
        "sync": sync, "rounds": args.rounds, "wire": args.wire, "weights": plan.weights, "kernels": kernels(),
        "threads": args.threads, "sched": args.sched,
        "star_rounds": len(plan.star_rounds) if args.rounds == "push" else 0,  # of a push pass, through the coordinator
        "prompt_tokens": len(prompt), "tokens": gen.tokens,
        "text": tok.decode(gen.tokens, skip_special=True),
        "ttft_ms": round(gen.token_stats[0].total_ms, 3) if gen.token_stats else None,
        "tpot_ms": percentiles(decode),
        "tokens_per_s": round(len(gen.tokens) / elapsed, 3) if elapsed else None,
        "tokens_per_pass": round(gen.tokens_per_pass, 3) if gen.tokens_per_pass is not None else None,
        "draft": {"source": draft.name if draft is not None else "none",
                  "tokens": args.draft_tokens if draft is not None else 0,
                  "acceptance": round(gen.acceptance, 4) if gen.acceptance is not None else None},
        "compensated_share": round(missing / relaxed, 6) if relaxed else 0.0,
        "compensated_by_device": per_device,
        "wait_ms_per_token": round(sum(s.wait_ms for s in gen.token_stats) / max(len(gen.token_stats), 1), 3),
        "compute_ms_per_token": round(sum(s.compute_ms for s in gen.token_stats) / max(len(gen.token_stats), 1), 3),
        "failovers": [e.to_json() for e in gen.failovers],
        # each process's CPU over the run, prefill included, per token generated
        "cpu_ms_per_token": {d: round(ms / max(len(gen.tokens), 1), 3) for d, ms in cpu_ms.items()},
        "exchange": exchange.stats().to_json(),
        "devices": devices,
        "per_token": per_token,
    }


def _load_coordinator(args):
    from .core.plan import PLAN_FILE, load_plan
    from .core.plandir import TOKENIZER_FILE, check_files
    from .core.policy import DeliveryPolicy
    from .core.shards import load_shard
    from .core.tokenizer import Tokenizer

    plan = load_plan(args.plan)
    tok_path = os.path.join(args.plan, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
        _fail(f"{tok_path}: missing (it is written by halo-compile plan)")
    check_files(args.plan, [PLAN_FILE, TOKENIZER_FILE, plan.shard_file(plan.coordinator)])
    shard = load_shard(args.plan, plan, plan.coordinator)
    if args.rounds == "plan":
        args.rounds = plan.rounds
    policy = DeliveryPolicy(wire=args.wire, relaxed_retries=args.relaxed_retries, redundancy=args.redundancy,
                            multi_datagram_copies=args.multi_datagram_copies, dead_after_s=args.dead_after)
    return plan, shard, Tokenizer.from_file(tok_path), policy


def _report(result: dict, args) -> None:
    from .runstats import summary_lines

    if not args.json:
        print("", *summary_lines(result), sep="\n")


def run_generate(args) -> None:
    from .localcluster import make_exchange

    plan, shard, tok, policy = _load_coordinator(args)
    drafts = _drafts(args, plan)
    peers = _peers(plan, args.peer)
    exchange = make_exchange(args.sync, plan, peers, policy, {}, _auth(args, args.plan), "0.0.0.0", args.rounds)
    try:
        result = generate_once(args, plan, shard, tok, exchange, args.sync, drafts=drafts)
    finally:
        exchange.close()
    result["peak_rss_mb"] = {plan.coordinator: round(peak_rss_mb(), 1)}
    _report(result, args)
    if args.json:
        print(json.dumps(result))


def run_local(args) -> None:
    from .localcluster import local_auth, local_loss, local_shims, make_exchange, start_local_workers, stop_workers

    plan, shard, tok, policy = _load_coordinator(args)
    drafts = _drafts(args, plan)
    loss = local_loss(args, plan)
    workers, worker_kernels = {}, {}
    auth = local_auth(args)
    try:
        peers = start_local_workers(args, plan, loss, auth, workers, worker_kernels)
        modes = ["relaxed", "strict"] if args.compare else [args.sync]
        results = []
        for n, mode in enumerate(modes):
            shims = local_shims(args, loss, peers, seed=args.seed * 1000 + 500 + n * 50)
            exchange = make_exchange(mode, plan, peers, policy, shims, auth, rounds=args.rounds)
            try:
                result = generate_once(args, plan, shard, tok, exchange, mode, label=f"[{mode}] ", drafts=drafts)
            finally:
                exchange.close()
                for s in shims.values():
                    s.close()
            result["plr"] = max(loss.values())
            result["kernels_by_device"] = {plan.coordinator: result["kernels"], **worker_kernels}
            result["peak_rss_mb"] = {plan.coordinator: round(peak_rss_mb(), 1),
                                     **{d: round(peak_rss_mb(p.pid), 1) for d, p in workers.items()}}
            _report(result, args)
            results.append(result)
        if args.compare and not args.json:
            r, s = results
            if r["tpot_ms"]["p50"] and s["tpot_ms"]["p50"]:
                print(f"\nrelaxed vs strict at {100 * results[0]['plr']:.1f}% loss: TPOT p50 {r['tpot_ms']['p50']} "
                      f"vs {s['tpot_ms']['p50']} ms ({s['tpot_ms']['p50'] / r['tpot_ms']['p50']:.2f}x); "
                      f"same tokens: {r['tokens'] == s['tokens']}")
            print("peak RSS MB per device: " + ", ".join(f"{k} {v}" for k, v in r["peak_rss_mb"].items()))
        if args.json:
            print(json.dumps(results[0] if len(results) == 1 else {"runs": results}))
    finally:
        stop_workers(workers)


def run_serve(args) -> None:
    from .core.chat import ChatTemplate
    from .localcluster import local_auth, local_loss, local_shims, make_exchange, start_local_workers, stop_workers

    try:
        from .server.app import build_service, listen, run
    except ImportError as e:
        _fail(f"serve needs the server's packages ({e.name} is missing): pip install 'halo-runtime[serve]'")
    if not 0 <= args.port < 65536 or args.max_body < 1 or args.max_waiting < 1:
        _fail("--port must be in 0..65535, --max-body and --max-waiting at least 1")
    from .core.spans import BatchOptions
    try:
        batch = BatchOptions(args.slots, args.prefill_chunk)
    except ValueError as e:
        _fail(str(e))
    plan, shard, tok, policy = _load_coordinator(args)
    drafts = _drafts(args, plan)
    template = ChatTemplate.for_plan(args.plan)
    sock = listen(args.host, args.port)  # before any worker starts: a taken port fails at once
    workers, shims = {}, {}
    try:
        if args.local:
            loss = local_loss(args, plan)
            auth = local_auth(args)
            peers = start_local_workers(args, plan, loss, auth, workers)
            shims = local_shims(args, loss, peers, seed=args.seed * 1000 + 500)
        else:
            auth = _auth(args, args.plan)
            peers = _peers(plan, args.peer)
        bind = "127.0.0.1" if args.local else "0.0.0.0"
        service = build_service(plan, args.plan, shard, tok, template,
                                lambda: make_exchange(args.sync, plan, peers, policy, shims, auth, bind, args.rounds),
                                peers, args.sync, args.wire,
                                args.max_body, args.max_waiting, procs=workers, drafts=drafts,
                                draft_tokens=args.draft_tokens, batch=batch, rounds=args.rounds)
        run(service, sock)
    finally:
        sock.close()
        stop_workers(workers)
        for s in shims.values():
            s.close()


if __name__ == "__main__":
    main()
