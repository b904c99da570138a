"""Probes of a running lab: numbered datagrams over one link (observed loss and burst length) and
a UDP ping-pong (round-trip percentiles). Used by `netlab.py selftest` and the lab tests.

Usage (as root, so not a doctest; tests/test_netlab.py runs it where namespaces work):
    from benchmarks.netlab import Lab, LinkSpec
    from benchmarks.netprobe import datagram_test, rtt_test
    with Lab(["a", "b"], links={("a", "b"): LinkSpec(loss=0.05)}) as lab:
        datagram_test(lab, "a", "b", 10000)["received_share"]      # about 0.95
"""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.netns import LabError

_SENDER = r"""
import socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(i.to_bytes(4, "big") + b"x" * 96, (dst, port))
    if i % 50 == 49:
        time.sleep(0.001)   # stay far below every buffer
"""

_RECEIVER = r"""
import socket, sys, time
bind, port, n, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((bind, port))
print("ready", flush=True)
s.settimeout(30)
seen = set()
try:
    seen.add(int.from_bytes(s.recv(2048)[:4], "big"))
    s.settimeout(idle)
    while len(seen) < n:
        seen.add(int.from_bytes(s.recv(2048)[:4], "big"))
except socket.timeout:
    pass
runs, run = [], 0
for i in range(n):
    if i in seen:
        if run:
            runs.append(run)
        run = 0
    else:
        run += 1
if run:
    runs.append(run)
print(len(seen), sum(runs) / len(runs) if runs else 0.0, flush=True)
"""

_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(5)
try:
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)
except socket.timeout:
    pass
"""

_PINGER = r"""
import json, socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
rtts = []
for i in range(n):
    t = time.perf_counter()
    s.sendto(i.to_bytes(4, "big"), (dst, port))
    try:
        while int.from_bytes(s.recv(64)[:4], "big") != i:
            pass
        rtts.append(1e3 * (time.perf_counter() - t))
    except socket.timeout:
        pass
print(json.dumps(rtts))
"""


def datagram_test(lab, a: str, b: str, n: int = 10000, port: int = 9000) -> dict:
    """Send n numbered datagrams a -> b; what arrived, and what the switch counted."""
    lab.reset_counters()
    recv = lab.popen(b, [sys.executable, "-c", _RECEIVER, lab.addr(b), str(port), str(n), "1.0"],
                     stdout=subprocess.PIPE, text=True)
    if recv.stdout.readline().strip() != "ready":
        raise LabError("receiver did not start")
    lab.run(a, [sys.executable, "-c", _SENDER, lab.addr(b), str(port), str(n)])
    got = (recv.stdout.readline().split() or ["0", "0"])
    recv.wait(10)
    received = int(got[0])
    c = lab.counters()[(a, b)]
    return {"sent": n, "received": received, "received_share": received / n,
            "mean_loss_burst": float(got[1]), **c}


def rtt_test(lab, a: str, b: str, n: int = 200, port: int = 9100) -> dict:
    """UDP ping-pong a -> b -> a, one at a time: round-trip percentiles in ms (lost ones left out)."""
    echo = lab.popen(b, [sys.executable, "-c", _ECHO, lab.addr(b), str(port)], stdout=subprocess.PIPE, text=True)
    if echo.stdout.readline().strip() != "ready":
        raise LabError("echo server did not start")
    rtts = sorted(json.loads(lab.run(a, [sys.executable, "-c", _PINGER, lab.addr(b), str(port), str(n)]).stdout))
    echo.kill()
    echo.wait()
    pick = lambda q: round(rtts[min(len(rtts) - 1, int(q * (len(rtts) - 1)))], 3) if rtts else None  # noqa: E731
    return {"n": n, "answered": len(rtts), "p50": pick(0.5), "p10": pick(0.1), "p90": pick(0.9),
            "mean": round(sum(rtts) / len(rtts), 3) if rtts else None}
