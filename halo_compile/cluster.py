"""Cluster profiles: the devices and links a plan is compiled for (YAML in, validated dataclass out).

Schema (every field documented in profiles/README.md):

    name: pi5                      # profile name, used in output paths
    coordinator: pi5-0             # device holding embeddings, norms, LM head, residual stream
    defaults: {latency_ms: 0.15}   # optional: values every device inherits unless it sets its own
    devices:
      - name: pi5-0
        address: 127.0.0.1:7700    # host:port where halo-run listens on that board
        memory_mb: 6144            # budget for weights + KV cache
        compute_gflops: 8          # sustained GFLOP/s for this workload
        latency_ms: 0.15           # one-way latency of its link
        jitter_ms: 0.05
        bandwidth_mbps: 1000
        loss: 0.0                  # packet loss rate of its link, in [0, 1)
        burst: 3                   # optional: mean loss burst length in datagrams (0: independent)
        storage_mbps: 90           # optional: storage read MB/s; lets weights exceed memory_mb
                                   # (the rest is streamed from storage, see halo_runtime.storage.groupcache)

Example:
    >>> from halo_compile.cluster import load_profile
    >>> p = load_profile("profiles/pi5.yaml")
    >>> [d.name for d in p.devices], p.coordinator
    (['pi5-0', 'pi5-1', 'pi5-2', 'pi5-3'], 'pi5-0')
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from halo_runtime.core.plan import Device

DEVICE_KEYS = {"name", "address", "memory_mb", "compute_gflops", "latency_ms", "jitter_ms",
               "bandwidth_mbps", "loss", "burst", "storage_mbps"}
LINK_KEYS = DEVICE_KEYS - {"name", "address", "memory_mb"}
TOP_KEYS = {"name", "coordinator", "defaults", "devices", "description"}
MB = 1024 * 1024


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class ClusterProfile:
    """A validated cluster profile."""

    name: str
    """Profile name."""
    coordinator: str
    """Device that holds the residual stream and aggregates partial sums."""
    devices: tuple[Device, ...]
    """Every device, coordinator included, in file order."""
    fingerprint: str
    """SHA-256 of the profile file's bytes."""

    def __post_init__(self):
        if not self.devices:
            raise ValueError("devices: at least one device is needed")
        names = [d.name for d in self.devices]
        if self.coordinator not in names:
            raise ValueError(f"coordinator: {self.coordinator!r} is not one of the devices")


def _number(value, where: str, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):  # .inf, .nan
        raise ProfileError(f"{where}: expected a number, got {value!r}")
    if integer and value != int(value):
        raise ProfileError(f"{where}: expected a whole number, got {value!r}")
    return value


def _device(raw, defaults: dict, where: str) -> Device:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected a mapping of device fields")
    unknown = sorted(set(raw) - DEVICE_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(DEVICE_KEYS))})")
    fields = {**defaults, **raw}
    for key in ("name", "address", "memory_mb", "compute_gflops"):
        if key not in fields:
            raise ProfileError(f"{where}: missing required key {key!r}")
    name = fields["name"]
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ProfileError(f"{where}.name: {name!r} is not a valid device name (letters, digits, - and _)")
    where = f"{where} ({name})"
    if not isinstance(fields["address"], str):
        raise ProfileError(f"{where}.address: expected host:port, got {fields['address']!r}")
    numbers = {k: _number(v, f"{where}.{k}") for k, v in fields.items() if k not in ("name", "address")}
    if numbers["memory_mb"] <= 0:
        raise ProfileError(f"{where}.memory_mb: must be positive, got {numbers['memory_mb']}")
    if "loss" in numbers and not 0 <= numbers["loss"] < 1:
        raise ProfileError(f"{where}.loss: {numbers['loss']} is outside [0, 1)")
    if numbers.get("burst", 0) != 0 and numbers["burst"] < 1:
        raise ProfileError(f"{where}.burst: {numbers['burst']} is not a mean burst length (0, or at least 1 datagram)")
    for key in ("compute_gflops", "bandwidth_mbps", "storage_mbps"):
        if key in numbers and numbers[key] <= 0:
            raise ProfileError(f"{where}.{key}: must be positive, got {numbers[key]}")
    for key in ("latency_ms", "jitter_ms"):
        if key in numbers and numbers[key] < 0:
            raise ProfileError(f"{where}.{key}: must be >= 0, got {numbers[key]}")
    try:
        return Device(name=name, address=fields["address"], memory_bytes=int(numbers.pop("memory_mb") * MB),
                      **{k: float(v) for k, v in numbers.items()})
    except (ValueError, OverflowError) as e:  # OverflowError: memory_mb so large that MB times it is inf
        raise ProfileError(f"{where}: {e}") from None


def parse_profile(text: str, source: str) -> ClusterProfile:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ProfileError(f"{source}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: expected a mapping with 'name', 'coordinator' and 'devices'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ProfileError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{source}: name: expected a non-empty string")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ProfileError(f"{source}: defaults: expected a mapping")
    bad = sorted(set(defaults) - LINK_KEYS)
    if bad:
        raise ProfileError(f"{source}: defaults: key {bad[0]!r} cannot have a default "
                           f"(allowed: {', '.join(sorted(LINK_KEYS))})")
    devices_raw = raw.get("devices")
    if not isinstance(devices_raw, list) or not devices_raw:
        raise ProfileError(f"{source}: devices: expected a non-empty list")
    devices = tuple(_device(d, defaults, f"{source}: devices[{i}]") for i, d in enumerate(devices_raw))
    names = [d.name for d in devices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProfileError(f"{source}: devices: duplicate device name {dupes[0]!r}")
    addresses = [d.address for d in devices]
    dupes = sorted({a for a in addresses if addresses.count(a) > 1})
    if dupes:
        raise ProfileError(f"{source}: devices: two devices share the address {dupes[0]!r}")
    coordinator = raw.get("coordinator", names[0])
    if coordinator not in names:
        raise ProfileError(f"{source}: coordinator: {coordinator!r} is not one of the devices ({', '.join(names)})")
    where = names.index(coordinator)
    if devices[where].storage_mbps > 0:
        raise ProfileError(f"{source}: devices[{where}] ({coordinator}).storage_mbps: the coordinator holds the "
                           "residual stream and cannot stream weights; set storage_mbps on other devices only")
    fingerprint = hashlib.sha256(text.encode()).hexdigest()
    return ClusterProfile(name=name, coordinator=coordinator, devices=devices, fingerprint=fingerprint)


def load_profile(path: str | Path) -> ClusterProfile:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")  # bytes as-is: the fingerprint is of the file's bytes
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read ({e})") from None
    return parse_profile(text, str(path))
