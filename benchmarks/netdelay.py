"""The lab's packet-delay process: binds NFQUEUE 0 in every device namespace, holds each packet for
its link's delay (+ jitter, + Gilbert-Elliott burst loss) and re-injects it.

`netlab.Lab` starts one per lab (`python netdelay.py CONFIG_JSON`) and talks to it over stdin/stdout,
one JSON object per line. Needs PyPI `NetfilterQueue` and root (or `unshare -rnm`).

Example (what `Lab` sends it):
    python -m benchmarks.netdelay '{"queues": {"a": {"ns": "/run/netns/x-a", "links": {"10.77.0.2":
        {"delay_ms": 2, "jitter_ms": 0.5}}}}, "max_held": 20000, "seed": 0}'
    {"op": "stats"}      # -> {"links": {...}}   then {"op": "quit"}
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import random
import select
import signal
import sys
import time

from benchmarks.netns import NETNS_DIR, enter_netns


class _LinkState:
    def __init__(self, spec: dict, rng: random.Random):
        self.rng = rng
        self.update(spec)
        self.bad = False
        self.last_release = 0.0
        self.reset()

    def update(self, spec: dict) -> None:
        self.delay = spec.get("delay_ms", 0.0) / 1e3
        self.jitter = spec.get("jitter_ms", 0.0) / 1e3
        self.reorder = bool(spec.get("reorder", False))
        self.ge = tuple(spec["ge"]) if spec.get("ge") else None

    def reset(self) -> None:
        self.seen = self.dropped = self.delayed = self.overflow = 0

    def lose(self) -> bool:
        if self.ge is None:
            return False
        p_gb, p_bg, k, h = self.ge
        lost = self.rng.random() < (h if self.bad else k)
        self.bad = (self.rng.random() >= p_bg) if self.bad else (self.rng.random() < p_gb)
        return lost

    def release_at(self, now: float) -> float:
        d = self.delay if self.jitter <= 0 else max(0.0, self.rng.gauss(self.delay, self.jitter))
        t = now + d
        if not self.reorder:
            t = max(t, self.last_release)
            self.last_release = t
        return t


def _delayd(config: dict) -> None:
    """Bind NFQUEUE 0 in every device namespace, hold packets, re-inject them on time.

    Protocol on stdin/stdout, one JSON object per line: {"op": "stats"|"reset"|"set"|"quit"}.
    Exits (releasing every held packet) on "quit", on end of input, or on SIGTERM.
    """
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    rng = random.Random(config.get("seed", 0))
    max_held = int(config.get("max_held", 20000))
    links: dict[str, dict[str, _LinkState]] = {}
    held: list = []  # heap of (release time, seq, packet, link)
    seq = itertools.count()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    try:  # a late release is added delay: ask the scheduler to run this process first
        os.nice(int(config.get("nice", -10)))
    except OSError:
        pass

    def apply(queues: dict) -> None:
        for dev, q in queues.items():
            cur = links.setdefault(dev, {})
            for ip, spec in q["links"].items():
                if ip in cur:
                    cur[ip].update(spec)
                else:
                    cur[ip] = _LinkState(spec, random.Random(rng.random()))

    apply(config["queues"])

    def make_cb(dev: str):
        table = links[dev]

        def cb(pkt):
            hdr = pkt.get_payload()
            st = table.get(".".join(str(x) for x in hdr[16:20])) if len(hdr) >= 20 else None
            if st is None or (st.delay <= 0 and st.jitter <= 0 and st.ge is None):
                pkt.accept()
                return
            st.seen += 1
            if st.lose():
                st.dropped += 1
                pkt.drop()
                return
            now = time.monotonic()
            if len(held) >= max_held:
                st.overflow += 1
                pkt.accept()
                return
            t = st.release_at(now)
            if t <= now:
                pkt.accept()
            else:
                st.delayed += 1
                heapq.heappush(held, (t, next(seq), pkt))
        return cb

    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    queues = []
    try:
        for dev, q in config["queues"].items():
            enter_netns(os.path.join(NETNS_DIR, q["ns"]))
            nfq = NetfilterQueue()
            nfq.bind(0, make_cb(dev), max_len=max(4096, max_held), mode=COPY_PACKET, range=20)
            queues.append(nfq)
            enter_netns(home)
    finally:
        os.close(home)
    for dev in config["queues"]:
        links.setdefault(dev, {})

    fds = {nfq.get_fd(): nfq for nfq in queues}
    for fd in fds:
        os.set_blocking(fd, False)
    stdin = sys.stdin.fileno()
    print(json.dumps({"ready": True, "queues": len(queues)}), flush=True)
    buf = b""
    try:
        while not stop:
            now = time.monotonic()
            while held and held[0][0] <= now:
                heapq.heappop(held)[2].accept()
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
            try:
                ready, _, _ = select.select([*fds, stdin], [], [], timeout)
            except InterruptedError:
                continue
            for fd in ready:
                if fd == stdin:
                    chunk = os.read(stdin, 65536)
                    if not chunk:
                        stop = True
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        req = json.loads(line)
                        op = req.get("op")
                        if op == "quit":
                            stop = True
                            reply = {"ok": True}
                        elif op == "stats":
                            reply = {"links": {d: {ip: {"seen": s.seen, "dropped": s.dropped, "delayed": s.delayed,
                                                        "overflow": s.overflow} for ip, s in t.items()}
                                               for d, t in links.items()}, "held": len(held)}
                        elif op == "reset":
                            for t in links.values():
                                for s in t.values():
                                    s.reset()
                            reply = {"ok": True}
                        elif op == "set":
                            apply(req["queues"])
                            reply = {"ok": True}
                        else:
                            reply = {"error": f"unknown op {op!r}"}
                        print(json.dumps(reply), flush=True)
                else:
                    fds[fd].run(block=False)
    finally:
        while held:
            heapq.heappop(held)[2].accept()
        for nfq in queues:
            nfq.unbind()


if __name__ == "__main__":
    _delayd(json.loads(sys.argv[1]))
