"""`halo-run probe`: its flags and what it runs (measure this board, or answer other boards' link probes).

Example:
    $ halo-run probe --serve :7799 --key-file halo.key                  # on the coordinator's board
    $ halo-run probe --peer pi5-0.local:7799 --key-file halo.key -o pi5-1.yaml --power-w 2.7,7.1
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

from ..cli import _auth, _fail, _field, _hostport, _threads_arg
from ..core.plandir import write_atomically
from .entry import significant


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of `halo-run probe` (defaults and help of the options dataclasses' fields)."""
    from ..net.probeclient import LinkOptions
    from .board import ComputeProbe

    p.add_argument("--peer", metavar="HOST:PORT",
                   help="the coordinator's `halo-run probe --serve`: measure the link to it (else no link figures)")
    p.add_argument("--serve", metavar="HOST:PORT",
                   help="answer link probes here (run it on the coordinator's board; :PORT for every interface) "
                        "until Ctrl-C or --serve-for")
    p.add_argument("--serve-for", type=float, default=None, metavar="S", help="stop serving after S seconds")
    p.add_argument("--name", help="device name [default: this host's name]")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="where this board's worker will listen [default: the IPv4 address its traffic to --peer "
                        "leaves from, port 7700]")
    p.add_argument("--reserve-mb", type=float, default=512.0, metavar="MB",
                   help="MiB of available memory left out of memory_mb for the OS and the runtime itself "
                        "(default %(default)g)")
    p.add_argument("--shape", default="x".join(map(str, ComputeProbe.shape)), metavar="ROWSxCOLS",
                   help=_field(ComputeProbe, "shape")["help"])
    p.add_argument("--reps", type=int, **_field(ComputeProbe, "reps", " (default %(default)s)"))
    p.add_argument("--duration", type=float, metavar="S", **_field(ComputeProbe, "duration_s", " (default %(default)g)"))
    p.add_argument("--working-set-mb", type=float, metavar="MB",
                   **_field(ComputeProbe, "working_set_mb", " (default %(default)g)"))
    p.add_argument("--formats", default=",".join(ComputeProbe.formats), metavar="F,F",
                   help=f"{_field(ComputeProbe, 'formats')['help']} (default %(default)s)")
    p.add_argument("--storage", metavar="DIR", help="measure storage reads in DIR (where the shards will be)")
    p.add_argument("--storage-mb", type=float, default=256.0, metavar="MB",
                   help="size of the temporary file for --storage, MB (1e6 bytes; default %(default)g)")
    p.add_argument("--power-w", metavar="IDLE,BUSY", help="watts idle and busy, from your meter: written as power_w")
    p.add_argument("--pings", type=int, **_field(LinkOptions, "pings", " (default %(default)s)"))
    p.add_argument("--train", type=int, metavar="N", **_field(LinkOptions, "train", " (default %(default)s)"))
    p.add_argument("--rate", type=float, metavar="N", **_field(LinkOptions, "rate", " (default %(default)g)"))
    p.add_argument("--train-bytes", type=int, metavar="B", **_field(LinkOptions, "train_bytes", " (default %(default)s)"))
    p.add_argument("--bulk-kb", type=float, metavar="KB", **_field(LinkOptions, "bulk_kb", " (default %(default)g)"))
    p.add_argument("--timeout", type=float, metavar="S", **_field(LinkOptions, "timeout_s", " (default %(default)g)"))
    p.add_argument("-o", "--output", metavar="FILE", help="write the entry here (atomically) instead of stdout")
    p.add_argument("--json", action="store_true",
                   help="print every measurement as JSON on stdout (with -o the file still gets the entry)")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="deployment key, needed with --peer and --serve [default: $HALO_KEY_FILE, $HALO_KEY (hex)]")
    p.add_argument("--shim-loss", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--shim-seed", type=int, default=0, help=argparse.SUPPRESS)
    _threads_arg(p)


def _progress(msg: str) -> None:
    print(f"halo-run probe: {msg}", file=sys.stderr, flush=True)


def run(args) -> None:
    """Serve link probes (--serve), or measure this board and write its entry."""
    from .. import __version__
    from .. import probe as P
    from ..core.compute import kernels
    from ..net.probeclient import LinkOptions, ProbeClient
    from ..net.proberesponder import Responder
    from ..net.shim import LossShim

    if args.serve and args.peer:
        _fail("--serve answers probes, --peer sends them: give one of them")
    shim = LossShim(args.shim_loss, seed=args.shim_seed) if args.shim_loss else None  # tests: lossy loopback
    if args.serve:
        bind = _hostport(args.serve, "--serve")
        responder = Responder(bind, _auth(args, None), shim)
        _progress(f"answering link probes on {bind[0]}:{responder.address[1]} (Ctrl-C to stop)")

        def stop(*_):  # a service manager's (or a lab's) SIGTERM ends it as Ctrl-C does: counters printed
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            responder.serve(args.serve_for)
        except KeyboardInterrupt:
            pass
        finally:
            responder.close()
            c = responder.counters
            _progress(f"stopped: {c.received} datagrams, {c.answered} requests answered, dropped {c.forged} "
                      f"forged, {c.malformed} malformed, {c.replayed} replayed; {c.refused} refused")
        return
    # everything the user typed is checked before a minute goes into measuring
    power = P.parse_power(args.power_w) if args.power_w else None
    rows, sep, cols = args.shape.partition("x")
    if not sep or not rows.isdigit() or not cols.isdigit():
        _fail(f"--shape {args.shape!r}: expected ROWSxCOLS, e.g. 1536x576")
    wanted = [f.strip() for f in args.formats.split(",") if f.strip()]
    formats = tuple(sorted(set(wanted), key=lambda f: (P.FORMAT_ORDER + (f,)).index(f)))
    probe = P.ComputeProbe(shape=(int(rows), int(cols)), reps=args.reps, duration_s=args.duration,
                           working_set_mb=args.working_set_mb, formats=formats)
    link_opts = LinkOptions(args.pings, args.train, args.rate, args.train_bytes, args.bulk_kb, args.timeout)
    peer = _hostport(args.peer, "--peer") if args.peer else None
    if args.peer and not args.peer.rpartition(":")[0]:
        _fail(f"--peer {args.peer!r}: name the coordinator's host, e.g. pi5-0.local:7799")
    name = args.name or P.default_name()
    address = args.address or f"{P.primary_ipv4(peer[0] if peer else None)}:7700"
    P.check_identity(name, address)
    if args.storage and not os.path.isdir(args.storage):
        _fail(f"--storage {args.storage}: not a directory")
    if args.storage_mb <= 0 or args.reserve_mb < 0:
        _fail("--storage-mb must be positive and --reserve-mb at least 0")
    client = None
    if peer:
        client = ProbeClient(peer, _auth(args, None), link_opts.timeout_s, shim)
    try:
        if client is not None:
            _progress(f"{client.peer_text} answers (round trip {client.hello():.2f} ms)")
        avail, source = P.memory_available()  # before the probe's own matrices take memory
        memory_mb = int(avail / P.MIB - args.reserve_mb)
        speeds = []
        for fmt in probe.formats:
            s = P.measure_format(fmt, probe, args.threads)
            speeds.append(s)
            _progress(f"compute {fmt}: first {significant(s.first_gflops)} sustained {significant(s.sustained_gflops)} "
                      f"GFLOP/s ({s.reps} reps of {s.matrices} matrices)")
        storage = None
        if args.storage:
            _progress(f"storage: {args.storage_mb:g} MB in {args.storage}")
            storage = P.measure_storage(args.storage, args.storage_mb)
        link = P.LinkReport(client.measure(link_opts, _progress)) if client is not None else None
    finally:
        if client is not None:
            client.close()
        if shim is not None:
            shim.close()
    k = kernels()
    notes = (f"memory: {source} {avail / P.MIB:.0f} MiB minus --reserve-mb {args.reserve_mb:g}",
             f"kernels: {k['engine']}, {'/'.join(k['simd'])}")
    entry = P.Entry(name=name, address=address, memory_mb=memory_mb, compute=tuple(speeds), probe=probe,
                    threads=args.threads, link=link, storage=storage, power_w=power, notes=notes,
                    host=socket.gethostname(), version=__version__,
                    when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = entry.yaml()
    if args.output:
        write_atomically(args.output, text)
        _progress(f"wrote {args.output}")
    if args.json:
        print(json.dumps(entry.to_json(), indent=1))
    elif not args.output:
        print(text, end="")
