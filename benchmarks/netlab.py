"""A lossy-network lab on one Linux machine: N device namespaces joined by a bridge in a switch namespace.

No `tc netem` on this kernel, so every impairment is built from what it has:

- **loss**: nftables, a `netdev` ingress chain on each switch port, one rule per directed link
  (`ip daddr B numgen random mod 100000 < N counter drop`), with named counters that say how many
  frames each directed link carried and dropped (the *observed* loss);
- **delay and jitter**: an iptables `NFQUEUE` rule per directed link in the sender's namespace hands
  packets to one user-space process per lab (PyPI `NetfilterQueue`, which needs Debian's
  `libnetfilter-queue-dev`), which holds each packet and re-injects it after its delay; it also
  applies **burst loss** (Gilbert-Elliott) where a link asks for it; it holds at most `max_held`
  packets (more are passed on at once and counted) and stops with the lab;
- **bandwidth**: `tbf` on each device's uplink (its eth0) and downlink (its switch port);
- offloads off (`ethtool -K tso gso gro off`: otherwise one "packet" is a 64 KB super-frame),
  IPv6 off (no stray router solicitations in the counters), TCP congestion control: the namespace
  default is set to the first loss-based algorithm the kernel allows there (cubic if allowed,
  else reno: inside a namespace this kernel only allows what the host's
  `tcp_allowed_congestion_control` lists); programs that must use cubic set it per socket
  (`halo_runtime` does; `gloo_tp.py` preloads a shim) — see `tcp_cc`.

Every address (10.77.0.0/24 by default) exists only inside the lab's own namespaces; nothing is
configured in, or sent from, the namespace the lab was started in. Namespaces are named
`PREFIX-PID-N-ROLE`; a new lab first removes labs of its prefix whose creating process is gone.
Works as root, and inside `unshare -rnm` (it then mounts a private tmpfs on /run/netns).

Usage (as root, so not a doctest; tests/test_netlab.py runs it where namespaces work):
    from benchmarks.netlab import Lab, LinkSpec
    with Lab(["a", "b", "c"], prefix="demo") as lab:
        lab.set_link("a", "b", LinkSpec(loss=0.05, delay_ms=2, jitter_ms=0.5))
        out = lab.run("a", ["ping", "-c", "1", lab.addr("b")])
        lab.counters()[("a", "b")]      # {'sent': ..., 'dropped': ..., 'observed_loss': ...}

Command line:
    python -m benchmarks.netlab check                     # what works here, as JSON
    python -m benchmarks.netlab selftest --loss 0.05      # 10k datagrams over a lossy and a clean link
    python -m benchmarks.netlab clean [--prefix P] [--all]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.netns import DEFAULT_PREFIX, TOOLS, LabError, _ensure_netns_dir, _sh, check, clean, delete_netns, list_netns  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]  # where `python -m benchmarks.netdelay` runs
_SEQ = itertools.count()



@dataclass(frozen=True)
class LinkSpec:
    """Impairments of one directed link (sender -> receiver)."""

    loss: float = 0.0
    """Independent (Bernoulli) frame loss, applied by nftables at the switch."""
    delay_ms: float = 0.0
    """Mean one-way delay added in user space (NFQUEUE)."""
    jitter_ms: float = 0.0
    """Standard deviation of that delay (normal, clipped at 0)."""
    reorder: bool = False
    """Let jitter reorder packets; by default a packet never overtakes an earlier one on its link."""
    ge: tuple[float, float, float, float] | None = None
    """Gilbert-Elliott burst loss (p_good_to_bad, p_bad_to_good, loss_in_good, loss_in_bad), per packet,
    applied in user space on top of `loss`; see `LinkSpec.burst`."""

    def __post_init__(self):
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.ge is not None:
            if len(self.ge) != 4 or not all(0 <= p <= 1 for p in self.ge):
                raise ValueError(f"ge must be 4 probabilities, got {self.ge}")

    @classmethod
    def burst(cls, loss: float, mean_burst: float, **kw) -> "LinkSpec":
        """Gilbert-Elliott loss with average rate `loss` in bursts of mean length `mean_burst` packets
        (everything is lost in the bad state, nothing in the good one)."""
        if not 0 < loss < 1 or mean_burst < 1:
            raise ValueError("need 0 < loss < 1 and mean_burst >= 1")
        p_bg = 1 / mean_burst
        p_gb = loss * p_bg / (1 - loss)
        return cls(ge=(p_gb, p_bg, 0.0, 1.0), **kw)

    @property
    def needs_queue(self) -> bool:
        return self.delay_ms > 0 or self.jitter_ms > 0 or self.ge is not None

    @property
    def expected_loss(self) -> float:
        ge = 0.0
        if self.ge is not None:
            p_gb, p_bg, k, h = self.ge
            bad = p_gb / (p_gb + p_bg) if p_gb + p_bg else 0.0
            ge = bad * h + (1 - bad) * k
        return 1 - (1 - self.loss) * (1 - ge)


@dataclass(frozen=True)
class PortSpec:
    """A device's connection to the switch: bandwidth per direction (None: unlimited)."""

    up_mbit: float | None = None
    down_mbit: float | None = None


# ---- small helpers -------------------------------------------------------------------------------

# ---- the lab -------------------------------------------------------------------------------------

@dataclass
class _Proc:
    dev: str
    popen: subprocess.Popen
    argv: list = field(default_factory=list)


class Lab:
    """Device namespaces `devices[i]` with address `subnet.(i+1)`, all on one bridge.

    `links` maps (sender, receiver) to a LinkSpec (default: `default_link` for every pair);
    `ports` maps a device to its PortSpec (bandwidth). Use as a context manager, or call
    `start()` and `close()`; `close()` kills every process the lab started and deletes every
    namespace, and is safe to call twice.
    """

    def __init__(self, devices: list[str], prefix: str = DEFAULT_PREFIX, subnet: str = "10.77.0",
                 links: dict[tuple[str, str], LinkSpec] | None = None, default_link: LinkSpec = LinkSpec(),
                 ports: dict[str, PortSpec] | None = None, mtu: int = 1500, max_held: int = 20000,
                 seed: int = 0):
        if not devices or len(set(devices)) != len(devices):
            raise ValueError("devices must be distinct and non-empty")
        if len(devices) > 250:
            raise ValueError("at most 250 devices")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,15}", prefix):
            raise ValueError(f"prefix {prefix!r}: letters, digits and _ only, at most 16")
        self.devices = list(devices)
        self.prefix, self.subnet, self.mtu, self.max_held, self.seed = prefix, subnet, mtu, max_held, seed
        self.tag = f"{prefix}-{os.getpid()}-{next(_SEQ)}"
        self.switch_ns = f"{self.tag}-sw"
        self._ns = {d: f"{self.tag}-d{i}" for i, d in enumerate(devices)}
        self._ip = {d: f"{subnet}.{i + 1}" for i, d in enumerate(devices)}
        self._port = {d: f"p{i}" for i, d in enumerate(devices)}
        self.links = {(a, b): default_link for a in devices for b in devices if a != b}
        for k, v in (links or {}).items():
            self._check_pair(*k)
            self.links[k] = v
        self.ports = {d: (ports or {}).get(d, PortSpec()) for d in devices}
        self.procs: list[_Proc] = []
        self.delayd: subprocess.Popen | None = None
        self.tcp_cc = None
        self.started = self.closed = False
        self.removed_stale: list[str] = []

    # names and commands
    def ns(self, dev: str) -> str:
        return self._ns[dev]

    def addr(self, dev: str) -> str:
        return self._ip[dev]

    def dev_of(self, ip: str) -> str | None:
        return next((d for d, a in self._ip.items() if a == ip), None)

    def cmd(self, dev: str, argv: list[str]) -> list[str]:
        """argv run inside `dev`'s namespace."""
        return ["ip", "netns", "exec", self._ns[dev], *argv]

    def run(self, dev: str, argv: list[str], timeout: float = 120, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(self.cmd(dev, argv), capture_output=True, text=True, timeout=timeout, env=env)
        if check and p.returncode:
            raise LabError(f"[{dev}] `{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p

    def popen(self, dev: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv inside `dev`'s namespace; the lab stops it on close()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.cmd(dev, argv), start_new_session=True, **kw)
        self.procs.append(_Proc(dev, p, argv))
        return p

    def _check_pair(self, a: str, b: str) -> None:
        if a not in self._ns or b not in self._ns or a == b:
            raise ValueError(f"no directed link {a!r} -> {b!r} in this lab")

    # lifecycle
    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Lab":
        if self.started:
            return self
        info_missing = [t for t in TOOLS if not shutil.which(t)]
        if info_missing:
            raise LabError(f"missing tools: {', '.join(info_missing)} (`make lab-setup`)")
        _ensure_netns_dir()
        self.removed_stale = clean(self.prefix)
        self.started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _nsexec(self, ns: str, argv: list[str], check: bool = True, input: str | None = None):
        return _sh(["ip", "netns", "exec", ns, *argv], check=check, input=input)

    def _build(self) -> None:
        sw = self.switch_ns
        for ns in [sw, *self._ns.values()]:
            _sh(["ip", "netns", "add", ns])
            # no IPv6 chatter (router solicitations, MLD) in the counters; loopback up
            self._nsexec(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                              "net.ipv6.conf.default.disable_ipv6=1"], check=False)
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        # bridged frames must not detour through the switch's iptables (br_netfilter)
        self._nsexec(sw, ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
                          "net.bridge.bridge-nf-call-arptables=0"], check=False)
        for d in self.devices:
            ns, port = self._ns[d], self._port[d]
            _sh(["ip", "-n", sw, "link", "add", port, "mtu", str(self.mtu), "type", "veth",
                 "peer", "name", "eth0", "mtu", str(self.mtu), "netns", ns])
            _sh(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _sh(["ip", "-n", ns, "addr", "add", f"{self._ip[d]}/24", "dev", "eth0"])
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _sh(["ip", "-n", sw, "link", "set", port, "up"])
            self._nsexec(ns, ["ethtool", "-K", "eth0", "tso", "off", "gso", "off", "gro", "off"])
            self._nsexec(sw, ["ethtool", "-K", port, "tso", "off", "gso", "off", "gro", "off"])
        self._nsexec(sw, ["ethtool", "-K", "br0", "tso", "off", "gso", "off", "gro", "off"], check=False)
        _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        # static neighbours: no ARP round trips (or ARP losses) inside the measurements
        macs = {d: self._mac(d) for d in self.devices}
        for a in self.devices:
            for b in self.devices:
                if a != b:
                    _sh(["ip", "-n", self._ns[a], "neigh", "replace", self._ip[b], "lladdr", macs[b],
                         "dev", "eth0", "nud", "permanent"])
        self._set_tcp_cc()
        self._install_bandwidth()
        self._install_loss()
        self._install_queues()

    def _mac(self, dev: str) -> str:
        out = _sh(["ip", "-n", self._ns[dev], "-j", "link", "show", "eth0"]).stdout
        return json.loads(out)[0]["address"]

    def _set_tcp_cc(self) -> None:
        for d in self.devices:
            allowed = self._nsexec(self._ns[d], ["sysctl", "-n", "net.ipv4.tcp_allowed_congestion_control"],
                                   check=False).stdout.split()
            for cc in ("cubic", "reno"):
                if cc in allowed and self._nsexec(self._ns[d], ["sysctl", "-qw",
                                                  f"net.ipv4.tcp_congestion_control={cc}"], check=False).returncode == 0:
                    self.tcp_cc = cc
                    break

    def _install_bandwidth(self) -> None:
        for d, spec in self.ports.items():
            for ns, dev, rate in ((self._ns[d], "eth0", spec.up_mbit), (self.switch_ns, self._port[d], spec.down_mbit)):
                if rate:
                    burst = max(4 * self.mtu, int(rate * 1e6 / 8 / 1000))  # >= 1 ms worth
                    _sh(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                         "rate", f"{rate}mbit", "burst", str(burst), "latency", "50ms"])

    def _pair_name(self, a: str, b: str) -> str:
        return f"{self.devices.index(a)}_{self.devices.index(b)}"

    def _loss_rules(self, a: str) -> str:
        chain = f"in_{self._port[a]}"
        lines = [f"flush chain netdev lab {chain}"]
        for b in self.devices:
            if b == a:
                continue
            n = self._pair_name(a, b)
            lines.append(f"add rule netdev lab {chain} ip daddr {self._ip[b]} counter name tx_{n}")
            threshold = int(round(self.links[(a, b)].loss * 100000))
            if threshold > 0:
                lines.append(f"add rule netdev lab {chain} ip daddr {self._ip[b]} "
                             f"numgen random mod 100000 < {threshold} counter name drop_{n} drop")
        return "\n".join(lines) + "\n"

    def _install_loss(self) -> None:
        script = ["add table netdev lab"]
        for a in self.devices:
            for b in self.devices:
                if a != b:
                    n = self._pair_name(a, b)
                    script += [f"add counter netdev lab tx_{n}", f"add counter netdev lab drop_{n}"]
            script.append(f'add chain netdev lab in_{self._port[a]} {{ type filter hook ingress device '
                          f'"{self._port[a]}" priority 0; policy accept; }}')
        _sh(["ip", "netns", "exec", self.switch_ns, "nft", "-f", "-"], input="\n".join(script) + "\n")
        for a in self.devices:
            _sh(["ip", "netns", "exec", self.switch_ns, "nft", "-f", "-"], input=self._loss_rules(a))

    # user-space queue: delay, jitter, burst loss
    def _queue_config(self) -> dict:
        cfg = {}
        for a in self.devices:
            links = {self._ip[b]: asdict(self.links[(a, b)]) for b in self.devices
                     if b != a and self.links[(a, b)].needs_queue}
            cfg[a] = {"ns": self._ns[a], "links": links}
        return cfg

    def _install_queues(self) -> None:
        cfg = self._queue_config()
        if not any(c["links"] for c in cfg.values()):
            return
        self._start_delayd(cfg)
        for a in self.devices:
            self._sync_queue_rules(a)

    def _sync_queue_rules(self, a: str) -> None:
        ns = self._ns[a]
        self._nsexec(ns, ["iptables", "-w", "-F", "OUTPUT"])
        for b in self.devices:
            if b != a and self.links[(a, b)].needs_queue:
                self._nsexec(ns, ["iptables", "-w", "-A", "OUTPUT", "-d", f"{self._ip[b]}/32",
                                  "-j", "NFQUEUE", "--queue-num", "0"])

    def _start_delayd(self, cfg: dict) -> None:
        try:
            import netfilterqueue  # noqa: F401
        except Exception as e:
            raise LabError("delay, jitter and burst loss need PyPI NetfilterQueue (apt-get install "
                           f"libnetfilter-queue-dev gcc; pip install NetfilterQueue): {e}") from None
        arg = json.dumps({"queues": cfg, "max_held": self.max_held, "seed": self.seed})
        self.delayd = subprocess.Popen([sys.executable, "-m", "benchmarks.netdelay", arg], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                       start_new_session=True)
        line = self._delayd_read(10)
        if not line or json.loads(line).get("ready") is not True:
            err = self.delayd.poll()
            raise LabError(f"the NFQUEUE delay process did not start (exit {err}, said {line!r})")

    def _delayd_read(self, timeout: float) -> str | None:
        r, _, _ = select.select([self.delayd.stdout], [], [], timeout)
        return self.delayd.stdout.readline() if r else None

    def _delayd_call(self, request: dict) -> dict:
        if self.delayd is None or self.delayd.poll() is not None:
            raise LabError("the NFQUEUE delay process is not running")
        self.delayd.stdin.write(json.dumps(request) + "\n")
        self.delayd.stdin.flush()
        line = self._delayd_read(10)
        if not line:
            raise LabError(f"the NFQUEUE delay process did not answer {request.get('op')}")
        return json.loads(line)

    # changing impairments at run time
    def set_link(self, a: str, b: str, spec: LinkSpec) -> None:
        self._check_pair(a, b)
        self.set_links({(a, b): spec})

    def set_links(self, links: dict[tuple[str, str], LinkSpec]) -> None:
        for (a, b), spec in links.items():
            self._check_pair(a, b)
            self.links[(a, b)] = spec
        if not self.started:
            return
        senders = sorted({a for a, _ in links}, key=self.devices.index)
        for a in senders:
            _sh(["ip", "netns", "exec", self.switch_ns, "nft", "-f", "-"], input=self._loss_rules(a))
        cfg = self._queue_config()
        if any(c["links"] for c in cfg.values()):
            if self.delayd is None:
                self._start_delayd(cfg)
            else:
                self._delayd_call({"op": "set", "queues": cfg})
        for a in senders:
            if self.delayd is not None:
                self._sync_queue_rules(a)

    # counters
    def counters(self) -> dict[tuple[str, str], dict]:
        """Per directed link since the last reset: frames sent into the switch, dropped by nftables,
        dropped by burst loss, and the observed loss (all dropped / sent)."""
        out = _sh(["ip", "netns", "exec", self.switch_ns, "nft", "-j", "list", "counters", "table", "netdev", "lab"]).stdout
        raw = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c:
                raw[c["name"]] = c["packets"]
        ge = {}
        if self.delayd is not None:
            ge = self._delayd_call({"op": "stats"}).get("links", {})
        res = {}
        for a in self.devices:
            for b in self.devices:
                if a == b:
                    continue
                n = self._pair_name(a, b)
                q = ge.get(a, {}).get(self._ip[b], {})
                ge_drop = q.get("dropped", 0)
                sent = raw.get(f"tx_{n}", 0) + ge_drop  # burst drops never reach the switch
                dropped = raw.get(f"drop_{n}", 0) + ge_drop
                res[(a, b)] = {"sent": sent, "dropped": dropped, "dropped_burst": ge_drop,
                               "delayed": q.get("delayed", 0), "overflow": q.get("overflow", 0),
                               "observed_loss": dropped / sent if sent else None}
        return res

    def reset_counters(self) -> None:
        _sh(["ip", "netns", "exec", self.switch_ns, "nft", "reset", "counters", "table", "netdev", "lab"])
        if self.delayd is not None:
            self._delayd_call({"op": "reset"})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self.procs:
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait()
        if self.delayd is not None:
            try:
                self.delayd.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.delayd.stdin.close()
                self.delayd.wait(5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.delayd.kill()
                self.delayd.wait()
        for ns in [*self._ns.values(), self.switch_ns]:
            if ns in list_netns():
                delete_netns(ns)

    def namespaces(self) -> list[str]:
        return [*self._ns.values(), self.switch_ns]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="netlab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="print what works here (JSON)")
    c = sub.add_parser("clean", help="remove stale labs")
    c.add_argument("--prefix", default=DEFAULT_PREFIX)
    c.add_argument("--all", action="store_true", help="also labs whose creator still runs")
    s = sub.add_parser("selftest", help="10k datagrams over a lossy and a clean link")
    s.add_argument("--loss", type=float, default=0.05)
    s.add_argument("--delay-ms", type=float, default=0.0)
    s.add_argument("--jitter-ms", type=float, default=0.0)
    s.add_argument("--burst", type=float, default=None, help="mean burst length (Gilbert-Elliott)")
    s.add_argument("-n", type=int, default=10000)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        print(json.dumps(check(), indent=1))
    elif args.cmd == "clean":
        print(json.dumps({"removed": clean(args.prefix, args.all)}))
    elif args.cmd == "selftest":
        from benchmarks.netprobe import datagram_test, rtt_test
        lossy = (LinkSpec.burst(args.loss, args.burst, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms)
                 if args.burst else LinkSpec(loss=args.loss, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms))
        with Lab(["a", "b", "c"], links={("a", "b"): lossy}) as lab:
            t0 = time.monotonic()
            r1 = datagram_test(lab, "a", "b", args.n)
            r2 = datagram_test(lab, "a", "c", args.n, port=9001)
            rtt = rtt_test(lab, "a", "b")
            print(json.dumps({"lossy a->b": r1, "clean a->c": r2, "rtt a->b->a ms": rtt, "seconds": round(time.monotonic() - t0, 2),
                              "tcp_cc_default": lab.tcp_cc}, indent=1))


if __name__ == "__main__":
    main()
