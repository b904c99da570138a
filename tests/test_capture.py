"""What an eavesdropper on the switch captures of a run in the namespace lab: no activations, over
UDP (relaxed) or TCP (strict) (slow; issue 23).

A raw socket in the lab's switch namespace records every frame of a relaxed and a strict run of
the tiny plan (fp16 wire, the default). Clear activations would show as long runs of plausible
fp16 numbers; ciphertext, uniform bytes, almost never does. The detector is checked on the
plaintext itself: the captured UDP datagrams, opened with the deployment key, must show such runs.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from benchmarks import netlab

INFO = netlab.check()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not INFO["ok"], reason=f"network lab unavailable: {INFO['reason']}")]

SNIFFER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # every frame, every port
s.settimeout(0.2)
out = open(sys.argv[1], "wb", buffering=0)
print("ready", flush=True)
while True:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    out.write(struct.pack("!I", len(frame)) + frame)
"""
RUN = 48
"""fp16 values in a row, each of magnitude 0.01-100: ciphertext has a given one with probability
14/32 (its exponent field), so a run of 48 with ~1e-17 per position; the tiny model's 64-wide
activations in clear have them in nearly every message."""


def longest_fp16_run(data: bytes) -> int:
    """The longest run of consecutive plausible activations (0.01 <= |x| <= 100) at either alignment."""
    best = 0
    for start in (0, 1):
        n = (len(data) - start) // 2
        if n <= 0:
            continue
        x = np.abs(np.frombuffer(data, dtype="<f2", count=n, offset=start).astype(np.float32))
        ok = (x >= 0.01) & (x <= 100.0)
        run = 0
        for v in ok:
            run = run + 1 if v else 0
            best = max(best, run)
    return best


def _payloads(path: str) -> tuple[list[bytes], list[bytes]]:
    """(UDP payloads, TCP payloads) of the IPv4 frames recorded in `path`."""
    udp, tcp = [], []
    raw = open(path, "rb").read()
    at = 0
    while at + 4 <= len(raw):
        (n,) = struct.unpack_from("!I", raw, at)
        frame, at = raw[at + 4:at + 4 + n], at + 4 + n
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        if proto == 17:
            udp.append(ip[ihl + 8:])
        elif proto == 6 and len(ip) >= ihl + 20:
            body = ip[ihl + (ip[ihl + 12] >> 4) * 4:]
            if body:
                tcp.append(body)
    return udp, tcp


def test_a_captured_run_shows_no_activations(tiny_plan, tmp_path):
    from halo_runtime.net.auth import Authenticator
    from halo_runtime.net.wire import check_datagram

    from benchmarks.labbench import Bench

    _, plan_dir = tiny_plan
    bench = Bench(plan_dir, 0.0, 0.0, prefix=f"hcp{uuid.uuid4().hex[:8]}", verbose=False)
    capture = tmp_path / "frames.bin"
    with bench:
        sniffer = subprocess.Popen(["ip", "netns", "exec", bench.lab.switch_ns, sys.executable, "-c", SNIFFER,
                                    str(capture)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert sniffer.stdout.readline().strip() == "ready"
            relaxed = bench.run("relaxed", "The capital of France is", 8, timeout_s=300)
            strict = bench.run("strict", "The capital of France is", 8, timeout_s=300)
            time.sleep(0.3)  # the last frames
        finally:
            os.killpg(sniffer.pid, 9)
            sniffer.wait()
        key = bytes.fromhex(bench.env["HALO_KEY"])
    assert len(relaxed["tokens"]) == len(strict["tokens"]) == 8
    udp, tcp = _payloads(str(capture))
    assert len(udp) > 100 and len(tcp) > 20, (len(udp), len(tcp))
    # the detector finds activations in the plaintext the key opens...
    auth = Authenticator(key)
    opened = [chunk for d in udp if (chunk := check_datagram(d, auth=auth)[1]) and not isinstance(chunk, str)]
    assert len(opened) > 100
    assert max(longest_fp16_run(c) for c in opened) >= RUN
    # ...and nowhere in what crossed the switch
    worst = max(longest_fp16_run(p) for p in udp + tcp)
    print(f"\n{len(udp)} UDP and {len(tcp)} TCP payloads captured; longest activation-like fp16 run: {worst} "
          f"(opened with the key: {max(longest_fp16_run(c) for c in opened)})")
    assert worst < RUN, f"a captured payload holds {worst} activation-like fp16 values in a row"
