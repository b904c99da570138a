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
                                   # (the rest is streamed from storage, see halo_runtime.storage.groupcache;
                                   # ignored on the coordinator, which never streams)
        compute_gflops_by_format: {fp32: 2.0, q8_0: 5.1}   # optional: GFLOP/s per --weights format
        power_w: [2.7, 7.1]        # optional: watts idle and busy (energy per token in the plan)
        medium: wifi0              # optional: a shared radio medium (one Wi-Fi channel) its link is on;
                                   # devices naming the same one take turns on the air (the cost model)

A device's compute for placement is `compute_gflops_by_format[F]` for a plan compiled with
`--weights F` where the profile gives it, else `compute_gflops`: `load_profile(path, weights=F)`
resolves it, so the plan's devices record the figure the placement used.

Example:
    >>> from halo_compile.cluster import compute_for_format, load_profile
    >>> p = load_profile("profiles/pi5.yaml")
    >>> [d.name for d in p.devices], p.coordinator
    (['pi5-0', 'pi5-1', 'pi5-2', 'pi5-3'], 'pi5-0')
    >>> compute_for_format(2.0, {"fp32": 2.1, "q8_0": 5.1}, "q8_0"), compute_for_format(2.0, {"q8_0": 5.1}, "bf16")
    (5.1, 2.0)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from halo_runtime.core.formats import weight_format
from halo_runtime.core.plan import Device

DEVICE_KEYS = {"name", "address", "memory_mb", "compute_gflops", "latency_ms", "jitter_ms",
               "bandwidth_mbps", "loss", "burst", "storage_mbps", "compute_gflops_by_format", "power_w", "medium"}
NOT_NUMBERS = {"name", "address", "compute_gflops_by_format", "power_w", "medium"}
"""Device keys whose value is not one number (checked by their own rules)."""
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
    weights: str = "fp32"
    """Weight format the devices' compute_gflops was resolved for (`compute_gflops_by_format`)."""

    def __post_init__(self):
        weight_format(self.weights)  # ValueError naming the formats
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


def compute_for_format(compute_gflops: float, by_format: dict[str, float] | None, weights: str) -> float:
    """GFLOP/s a device computes with in weight format `weights`: its measured figure for that
    format where the profile gives one, else its `compute_gflops` (a format it was not measured in
    is assumed to run at the default format's speed, as before the per-format figures existed)."""
    return (by_format or {}).get(weights, compute_gflops)


def _by_format(value, where: str) -> dict[str, float]:
    """`compute_gflops_by_format`: weight format name -> GFLOP/s, each a known format and > 0."""
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: expected a mapping of weight format to GFLOP/s, got {value!r}")
    out = {}
    for fmt, gflops in value.items():
        try:
            weight_format(fmt if isinstance(fmt, str) else repr(fmt))
        except ValueError as e:
            raise ProfileError(f"{where}: {e}") from None
        gflops = _number(gflops, f"{where}.{fmt}")
        if gflops <= 0:
            raise ProfileError(f"{where}.{fmt}: must be positive, got {gflops}")
        out[fmt] = float(gflops)
    return out


def _power(value, where: str) -> tuple[float, float]:
    """`power_w: [IDLE, BUSY]`: watts, 0 <= idle <= busy."""
    if not isinstance(value, list) or len(value) != 2:
        raise ProfileError(f"{where}: expected [IDLE, BUSY] in watts, got {value!r}")
    idle, busy = (float(_number(v, where)) for v in value)
    if not 0 <= idle <= busy:
        raise ProfileError(f"{where}: need 0 <= idle <= busy watts, got [{idle:g}, {busy:g}]")
    return idle, busy


def _device(raw, defaults: dict, where: str, weights: str = "fp32") -> Device:
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
    numbers = {k: _number(v, f"{where}.{k}") for k, v in fields.items() if k not in NOT_NUMBERS}
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
    by_format = _by_format(fields["compute_gflops_by_format"], f"{where}.compute_gflops_by_format") \
        if "compute_gflops_by_format" in fields else None
    numbers["compute_gflops"] = compute_for_format(numbers["compute_gflops"], by_format, weights)
    extra = {"power_w": _power(fields["power_w"], f"{where}.power_w")} if "power_w" in fields else {}
    if "medium" in fields:
        if not isinstance(fields["medium"], str):
            raise ProfileError(f"{where}.medium: expected the name of a shared medium, got {fields['medium']!r}")
        extra["medium"] = fields["medium"]
    try:
        return Device(name=name, address=fields["address"], memory_bytes=int(numbers.pop("memory_mb") * MB),
                      **{k: float(v) for k, v in numbers.items()}, **extra)
    except (ValueError, OverflowError) as e:  # OverflowError: memory_mb so large that MB times it is inf
        raise ProfileError(f"{where}: {e}") from None


def parse_profile(text: str, source: str, weights: str = "fp32") -> ClusterProfile:
    """The profile in `text` (`source` names it in errors), each device's compute resolved for
    plans whose shards store weight format `weights` (`compute_for_format`). The coordinator's
    storage_mbps is a measurement of its board, not a request: the coordinator holds the residual
    stream and never streams weights, so its device gets 0 (every board may be probed alike, and
    a `defaults:` figure means the other boards)."""
    weight_format(weights)  # a caller's mistake, not the profile's: ValueError
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
    devices = tuple(_device(d, defaults, f"{source}: devices[{i}]", weights) for i, d in enumerate(devices_raw))
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
        devices = devices[:where] + (replace(devices[where], storage_mbps=0.0),) + devices[where + 1:]
    fingerprint = hashlib.sha256(text.encode()).hexdigest()
    return ClusterProfile(name=name, coordinator=coordinator, devices=devices, fingerprint=fingerprint,
                          weights=weights)


def read_profile_text(path: str | Path) -> str:
    """A profile file's text, its bytes as they are (the fingerprint is of them); ProfileError naming
    the file if it cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read ({e})") from None


def load_profile(path: str | Path, weights: str = "fp32") -> ClusterProfile:
    """The profile file at `path`, resolved for weight format `weights` (see `parse_profile`)."""
    return parse_profile(read_profile_text(path), str(path), weights)
