"""Deterministic JSON for the plan's frozen dataclasses: keys sorted, floats rounded to
FLOAT_DIGITS, one small object per line; and the typed way back, naming the exact field on any
mismatch. `core.plan` defines the schema; this module only writes and reads it.

Example:
    >>> from halo_runtime.core.plan import Device
    >>> from halo_runtime.core.planjson import dump, from_plain, to_plain
    >>> d = Device("pi5-1", "pi5-1.local:7700", 10**9, 2.0, latency_ms=0.1234567)
    >>> dump(to_plain(d), 1)
    '{"address": "pi5-1.local:7700", "bandwidth_mbps": 1000.0, "compute_gflops": 2.0, "jitter_ms": 0.0, "latency_ms": 0.123457, "loss": 0.0, "memory_bytes": 1000000000, "name": "pi5-1"}'
    >>> from_plain(Device, {"name": "x"}, "plan.json: devices[0]")
    Traceback (most recent call last):
    ...
    halo_runtime.core.plandir.PlanError: plan.json: devices[0]: missing field 'address'
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing

from .plandir import PlanError

FLOAT_DIGITS = 6

def round_float(x: float) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{FLOAT_DIGITS}g}")


def to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, float):
        return round_float(obj)
    return obj


def dump(obj, indent: int = 0) -> str:
    """JSON with sorted keys; lists of scalars and small objects stay on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        if all(not isinstance(v, (dict, list)) or _is_flat_list(v) for v in obj.values()) and indent > 0:
            return json.dumps(obj, sort_keys=True, separators=(", ", ": "))
        items = [f"{inner}{json.dumps(k)}: {dump(obj[k], indent + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not _is_flat_list(obj):
        return "[\n" + ",\n".join(inner + dump(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, sort_keys=True, separators=(", ", ": "))


def _is_flat_list(v) -> bool:
    return isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)


@functools.cache
def _schema(cls) -> tuple[dict, dict]:
    """A dataclass's resolved field types and its fields, once per class: resolving the string
    annotations compiles each one, and a plan holds thousands of group records (0.2 s a load)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_plain(cls, data, where: str):
    """Build a frozen dataclass from parsed JSON, naming the exact field on any mismatch."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object for {cls.__name__}")
    hints, fields = _schema(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"{where}: unknown field {unknown[0]!r}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{where}: {name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: {e}") from None


def _convert(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise PlanError(f"{where}: expected a list")
        if args[0] is int and all(type(v) is int for v in value):  # neuron lists: the bulk of a plan
            return tuple(value)
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        raise PlanError(f"{where}: expected {tp.__name__}, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object")
    return value
