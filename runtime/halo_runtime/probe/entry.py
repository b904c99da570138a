"""A board's measurements as its profile entry: a one-device cluster profile (YAML, written by hand:
the runtime has no YAML library) that `halo-compile plan --cluster` accepts and `halo-compile
profile merge` joins with the other boards' entries; or as JSON, every raw figure.

Part of `halo-run probe` (`halo_runtime.probe`).

Example:
    >>> from halo_runtime.probe.entry import parse_power, _value
    >>> parse_power("2.7,7.1"), _value("compute_gflops_by_format", {"fp32": 2.0, "q4_0": 7.9})
    ((2.7, 7.1), '{fp32: 2.0, q4_0: 7.9}')
"""
from __future__ import annotations

import json
import math
import re
import socket
from dataclasses import dataclass

from .board import ComputeProbe, FormatSpeed, StorageSpeed
from .linkstats import LinkReport

NAME = re.compile(r"[A-Za-z0-9_-]+")


# ---- the entry ---------------------------------------------------------------------------------------

def parse_power(text: str) -> tuple[float, float]:
    """`--power-w IDLE,BUSY` (watts, from the user's meter) -> (idle, busy)."""
    try:
        idle, busy = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--power-w {text!r}: expected IDLE,BUSY in watts, e.g. 2.7,7.1") from None
    if not (math.isfinite(idle) and math.isfinite(busy) and 0 <= idle <= busy):
        raise ValueError(f"--power-w {text!r}: need 0 <= IDLE <= BUSY watts")
    return idle, busy


def default_name() -> str:
    """This board's host name, as a device name (up to the first dot; other characters become -)."""
    host = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", host) or "board"


def primary_ipv4(toward: str | None = None) -> str:
    """The address this board's traffic to `toward` (default: the internet) leaves from; connecting
    a UDP socket sends nothing. 127.0.0.1 where there is no route."""
    for target in ([toward] if toward else []) + ["192.0.2.1"]:  # TEST-NET-1: never answers
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def check_identity(name: str, address: str) -> None:
    """ValueError unless `name` is a device name and `address` HOST:PORT (a profile's rules)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: letters, digits, - and _ only")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address!r} is not HOST:PORT")


@dataclass(frozen=True)
class Entry:
    """One board's measurements, written as a profile entry (`yaml`) or as JSON (`to_json`)."""

    name: str
    """Device name (letters, digits, - and _)."""
    address: str
    """HOST:PORT its `halo-run worker` will listen on."""
    memory_mb: int
    """MiB for weights and KV cache."""
    compute: tuple[FormatSpeed, ...]
    """Throughput per weight format, fp32 first."""
    probe: ComputeProbe
    """How compute was measured."""
    threads: int = 1
    """ggml threads the products ran on."""
    link: LinkReport | None = None
    """The link to the coordinator (None: not measured, the compiler's defaults apply)."""
    storage: StorageSpeed | None = None
    """Storage read speed (None: not measured)."""
    power_w: tuple[float, float] | None = None
    """Watts idle and busy, from the user's meter."""
    notes: tuple[str, ...] = ()
    """Comment lines after the first (memory source, kernels, ...)."""
    host: str = ""
    """Host name."""
    when: str = ""
    """UTC time of the probe."""
    version: str = ""
    """halo_runtime's version."""

    def __post_init__(self):
        check_identity(self.name, self.address)
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb {self.memory_mb}: nothing left for weights (lower --reserve-mb)")
        if not self.compute or self.compute[0].format != "fp32":
            raise ValueError("compute: fp32 comes first")
        if self.power_w is not None and not 0 <= self.power_w[0] <= self.power_w[1]:
            raise ValueError("power_w: need 0 <= idle <= busy")

    def fields(self) -> dict:
        """The device's profile keys, in the order written."""
        out: dict = {"name": self.name, "address": self.address, "memory_mb": self.memory_mb,
                     "compute_gflops": significant(self.compute[0].sustained_gflops),
                     "compute_gflops_by_format": {s.format: significant(s.sustained_gflops) for s in self.compute}}
        if self.storage is not None:
            out["storage_mbps"] = significant(self.storage.mbps)
        if self.link is not None:
            out.update(latency_ms=round(self.link.latency_ms, 3), jitter_ms=round(self.link.jitter_ms, 3),
                       loss=round(self.link.loss, 4), burst=round(self.link.bursts.written, 2))
            if self.link.bandwidth_mbps is not None:
                out["bandwidth_mbps"] = significant(self.link.bandwidth_mbps)
        if self.power_w is not None:
            out["power_w"] = list(self.power_w)
        return out

    def comments(self) -> list[str]:
        rows, cols = self.probe.shape
        speeds = "; ".join(f"{s.format} first {significant(s.first_gflops)} sustained {significant(s.sustained_gflops)} "
                           f"(p10-p90 {significant(s.p10_gflops)}-{significant(s.p90_gflops)})" for s in self.compute)
        lines = [f"halo-run probe on {self.name} (hostname {self.host}), {self.when}, halo {self.version}",
                 f"compute (GFLOP/s, products of {rows}x{cols} over {self.compute[0].matrices} fp32 matrices, "
                 f"{self.compute[0].reps} reps, {self.threads} thread(s)): {speeds}", *self.notes]
        if self.storage is not None:
            s = self.storage
            lines.append(f"storage {s.directory}: {s.megabytes:g} MB read at {s.mbps:g} MB/s"
                         + (f" ({s.note})" if s.note else ", page cache dropped"))
        if self.link is None:
            lines.append("link: not measured (no --peer): the compiler's defaults apply")
        else:
            k = self.link
            r, b, raw = k.rtt, k.bursts, k.raw
            bw = [f"{d} {significant(x.mbps)}" if x.mbps else f"{d} n/a" for d, x in (("up", raw.up_bulk),
                                                                               ("down", raw.down_bulk))]
            lines.append(f"link to {raw.peer}: rtt p50 {r.p50_ms:.3f} ms p90 {r.p90_ms:.3f} p99 {r.p99_ms:.3f} "
                         f"mean {r.mean_ms:.3f} std {r.std_ms:.3f} ({r.answered}/{r.sent} answered)")
            lines.append(f"loss (trains of {k.up.sent} x {raw.train_bytes} B at {raw.rate:.0f}/s): up "
                         f"{100 * k.up.loss:.2f}% down {100 * k.down.loss:.2f}%; bursts: mean {b.mean:.2f} "
                         f"(independent loss gives {b.independent:.2f}, z {b.z:.1f}) up {k.up.mean_burst:.2f} "
                         f"down {k.down.mean_burst:.2f}; Gilbert p/r up {k.up.p_good_bad:.4f}/{k.up.p_bad_good:.3f} "
                         f"down {k.down.p_good_bad:.4f}/{k.down.p_bad_good:.3f}")
            lines.append(f"bandwidth (Mbit/s goodput of {raw.up_bulk.sent} x 1400 B sent at once): {', '.join(bw)}")
            if raw.overflow or raw.peer_overflow or raw.forged:
                lines.append(f"warning: receive buffers overflowed during the trains (here {raw.overflow}, "
                             f"peer {raw.peer_overflow}: counted as loss); {raw.forged} forged datagrams dropped")
        if self.power_w is not None:
            lines.append("power_w: from the user's meter (--power-w)")
        return [" ".join(line.split()) for line in lines]  # one line each, whatever a host name holds

    def yaml(self) -> str:
        """The entry: comment lines, then a one-device profile (flat YAML, written by hand: the
        runtime has no YAML library)."""
        out = [f"# {line}" for line in self.comments()]
        out += [f"name: {_scalar(self.name)}", f"coordinator: {_scalar(self.name)}", "devices:"]
        for i, (key, value) in enumerate(self.fields().items()):
            out.append(f"{'  - ' if i == 0 else '    '}{key}: {_value(key, value)}")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict:
        """Every measurement, raw figures included."""
        out = {"entry": self.fields(), "comments": self.comments(), "threads": self.threads,
               "compute": {s.format: _plain(s) for s in self.compute}, "shape": list(self.probe.shape)}
        if self.storage is not None:
            out["storage"] = _plain(self.storage)
        if self.link is not None:
            k = self.link
            out["link"] = {"peer": k.raw.peer, "rtt_ms": _plain(k.rtt), "latency_ms": k.latency_ms,
                           "jitter_ms": k.jitter_ms, "loss": k.loss, "bandwidth_mbps": k.bandwidth_mbps,
                           "bursts": _plain(k.bursts),
                           **{d: {**_plain(x), "loss": x.loss, "mean_burst": x.mean_burst}
                              for d, x in (("up", k.up), ("down", k.down))},
                           "up_bulk": {**_plain(k.raw.up_bulk), "mbps": k.raw.up_bulk.mbps},
                           "down_bulk": {**_plain(k.raw.down_bulk), "mbps": k.raw.down_bulk.mbps},
                           "train_rate": k.raw.rate, "train_bytes": k.raw.train_bytes,
                           "overflow": k.raw.overflow, "peer_overflow": k.raw.peer_overflow,
                           "forged": k.raw.forged}
        return out


def _plain(obj) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(obj).items()
            if k != "raw"}


def significant(x: float, digits: int = 3) -> float:
    """x to `digits` significant digits."""
    return round(x, max(0, digits - 1 - math.floor(math.log10(abs(x))))) if x else 0.0


def _number(x) -> str:
    if isinstance(x, int):
        return str(x)
    text = f"{x:.6f}".rstrip("0")  # never an exponent: YAML 1.1 (PyYAML) reads 1e-05 as a string
    return text + "0" if text.endswith(".") else text


_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def _scalar(text: str) -> str:
    """A string plain where YAML reads it back as that string, else double-quoted (JSON's escapes)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _value(key: str, value) -> str:
    if key == "address":
        return json.dumps(value)  # always quoted, as hand-written profiles do
    if isinstance(value, str):
        return _scalar(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_number(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    return _number(value)
