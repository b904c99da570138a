"""Network-namespace plumbing for the lab: run commands, list, create the netns dir, delete, clean.

Used by `netlab.Lab` (which builds the lab) and `netdelay` (which enters the namespaces); nothing
here touches the namespace it runs in, except `check`'s throw-away probe namespace.

Usage (as root, so not a doctest; tests/test_netlab.py runs it where namespaces work):
    import netns
    netns.check()["ok"]          # True where this machine can build a lab
    netns.clean("halolab")       # [] when no lab of that prefix was left behind
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
DEFAULT_PREFIX = "halolab"
TOOLS = ("ip", "nft", "iptables", "ethtool", "tc")


class LabError(RuntimeError):
    """The lab cannot be built or driven here; the message says what is missing."""


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


def enter_netns(target: str | int) -> None:
    """Move this thread into the network namespace at path `target` (or open fd `target`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(target, os.O_RDONLY) if isinstance(target, str) else target
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({target}): {os.strerror(err)}")
    finally:
        if isinstance(target, str):
            os.close(fd)
