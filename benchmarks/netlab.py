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

Example (as root):
    >>> from netlab import Lab, LinkSpec
    >>> with Lab(["a", "b", "c"], prefix="demo") as lab:                         # doctest: +SKIP
    ...     lab.set_link("a", "b", LinkSpec(loss=0.05, delay_ms=2, jitter_ms=0.5))
    ...     out = lab.run("a", ["ping", "-c", "1", lab.addr("b")])
    ...     lab.counters()[("a", "b")]      # {'sent': ..., 'dropped': ..., 'observed_loss': ...}

Command line:
    python benchmarks/netlab.py check                     # what works here, as JSON
    python benchmarks/netlab.py selftest --loss 0.05      # 10k datagrams over a lossy and a clean link
    python benchmarks/netlab.py clean [--prefix P] [--all]
"""
from __future__ import annotations

import argparse
import ctypes
import heapq
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
DEFAULT_PREFIX = "halolab"
TOOLS = ("ip", "nft", "iptables", "ethtool", "tc")
_SEQ = itertools.count()


class LabError(RuntimeError):
    """The lab cannot be built or driven here; the message says what is missing."""


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

def _sh(argv: list[str], check: bool = True, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_init_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def list_netns() -> list[str]:
    p = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    p = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def delete_netns(ns: str) -> None:
    """Kill what runs in `ns` (processes this lab started there) and delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            if not _ns_pids(ns):
                break
            time.sleep(0.02)
    _sh(["ip", "netns", "del", ns], check=False)


def clean(prefix: str = DEFAULT_PREFIX, all_of_prefix: bool = False) -> list[str]:
    """Remove labs of `prefix` whose creating process is gone (all of them with `all_of_prefix`)."""
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-")
    removed = []
    for ns in list_netns():
        m = pat.match(ns)
        if m and (all_of_prefix or not _pid_alive(int(m.group(1)))):
            delete_netns(ns)
            removed.append(ns)
    return removed


def check() -> dict:
    """What the lab needs and what this machine has: {'ok': bool, 'reason': str, ...}."""
    info = {"euid": os.geteuid(), "init_userns": _in_init_userns(),
            "tools": {t: shutil.which(t) for t in TOOLS}}
    try:
        import netfilterqueue  # noqa: F401
        info["netfilterqueue"] = True
    except Exception as e:  # ImportError, or a broken build
        info["netfilterqueue"] = False
        info["netfilterqueue_error"] = str(e)
    missing = [t for t in TOOLS if not info["tools"][t]]
    if missing:
        info.update(ok=False, reason=f"missing tools: {', '.join(missing)} (apt-get install iproute2 nftables "
                                     "iptables ethtool; `make lab-setup` does it)")
        return info
    if os.geteuid() != 0:
        info.update(ok=False, reason="needs root, or run inside `unshare -rnm`")
        return info
    try:
        _ensure_netns_dir()
        probe = f"{DEFAULT_PREFIX}probe-{os.getpid()}"
        _sh(["ip", "netns", "add", probe])
        try:
            _sh(["ip", "netns", "exec", probe, "nft", "add", "table", "netdev", "probe"])
        finally:
            _sh(["ip", "netns", "del", probe], check=False)
    except (LabError, OSError) as e:
        info.update(ok=False, reason=f"cannot create a network namespace with nftables here: {e}")
        return info
    info.update(ok=True, reason="")
    if not info["netfilterqueue"]:
        info["reason"] = ("delay/jitter/burst loss unavailable: PyPI NetfilterQueue is not importable "
                          "(apt-get install libnetfilter-queue-dev gcc; pip install NetfilterQueue)")
    return info


def _ensure_netns_dir() -> None:
    """`ip netns` keeps its names in /run/netns; inside `unshare -rnm` that directory is not ours, so
    put a private tmpfs there (only in a mount namespace of our own, never the host's)."""
    if os.access(NETNS_DIR, os.W_OK) or (not os.path.exists(NETNS_DIR) and os.access("/run", os.W_OK)):
        return
    if _in_init_userns():
        raise LabError(f"{NETNS_DIR} is not writable: run as root or inside `unshare -rnm`")
    # In a user namespace the kernel only lets us mount in a mount namespace that namespace owns
    # (`unshare -rnm` made one), never in the host's, so this cannot touch the host's /run.
    target = NETNS_DIR if os.path.isdir(NETNS_DIR) else "/run"
    if _sh(["mount", "-t", "tmpfs", "-o", "mode=755", "halolab", target], check=False).returncode:
        raise LabError(f"{NETNS_DIR} is not writable and no private tmpfs can go there: run as root or "
                       "inside `unshare -rnm`")
    os.makedirs(NETNS_DIR, exist_ok=True)


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
        self.delayd = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_delayd", arg],
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


def star(devices: list[str], hub: str, lossy: list[str], plr: float, delay_ms: float = 0.0,
         jitter_ms: float = 0.0, burst: float | None = None) -> dict[tuple[str, str], LinkSpec]:
    """Directed links of a cluster whose `lossy` devices sit on a lossy access link: every link that
    starts or ends at a lossy device loses `plr` of its frames (in bursts of mean length `burst`
    if given); every link has the delay and jitter."""
    out = {}
    for a in devices:
        for b in devices:
            if a == b:
                continue
            p = plr if (a in lossy or b in lossy) else 0.0
            if burst and p > 0:
                out[(a, b)] = LinkSpec.burst(p, burst, delay_ms=delay_ms, jitter_ms=jitter_ms)
            else:
                out[(a, b)] = LinkSpec(loss=p, delay_ms=delay_ms, jitter_ms=jitter_ms)
    return out


# ---- the NFQUEUE delay process -------------------------------------------------------------------

def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


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
            _setns(os.path.join(NETNS_DIR, q["ns"]))
            nfq = NetfilterQueue()
            nfq.bind(0, make_cb(dev), max_len=max(4096, max_held), mode=COPY_PACKET, range=20)
            queues.append(nfq)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
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


# ---- command line --------------------------------------------------------------------------------

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


def datagram_test(lab: Lab, a: str, b: str, n: int = 10000, port: int = 9000) -> dict:
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


def rtt_test(lab: Lab, a: str, b: str, n: int = 200, port: int = 9100) -> dict:
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
    d = sub.add_parser("_delayd")
    d.add_argument("config")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        print(json.dumps(check(), indent=1))
    elif args.cmd == "clean":
        print(json.dumps({"removed": clean(args.prefix, args.all)}))
    elif args.cmd == "selftest":
        lossy = (LinkSpec.burst(args.loss, args.burst, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms)
                 if args.burst else LinkSpec(loss=args.loss, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms))
        with Lab(["a", "b", "c"], links={("a", "b"): lossy}) as lab:
            t0 = time.monotonic()
            r1 = datagram_test(lab, "a", "b", args.n)
            r2 = datagram_test(lab, "a", "c", args.n, port=9001)
            rtt = rtt_test(lab, "a", "b")
            print(json.dumps({"lossy a->b": r1, "clean a->c": r2, "rtt a->b->a ms": rtt, "seconds": round(time.monotonic() - t0, 2),
                              "tcp_cc_default": lab.tcp_cc}, indent=1))
    elif args.cmd == "_delayd":
        _delayd(json.loads(args.config))


if __name__ == "__main__":
    main()
