"""Command-line options from option dataclasses: a flag's default is the field's default, and its
help is the field's docstring, so each option is stated once (in the dataclass).

A field's docstring is the string literal under it, which Python keeps only in the source: it is
read from there, and an option whose class has no source at hand gets an empty help.

Example:
    >>> from halo_runtime.core.policy import DeliveryPolicy
    >>> field_default(DeliveryPolicy, "relaxed_retries")
    1
    >>> field_help(DeliveryPolicy, "relaxed_retries")
    'fast re-requests of a late relaxed part before its deadline'
    >>> field_default(DeliveryPolicy, "dead_after_s"), field_help(DeliveryPolicy, "dead_after_s")[:40]
    (4.0, 'a device holding critical parts, asked a')
    >>> field_default(DeliveryPolicy, "no_such_field")
    Traceback (most recent call last):
    ...
    KeyError: 'DeliveryPolicy has no field no_such_field'
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, fields
from functools import cache
from itertools import pairwise


def field_default(cls: type, name: str):
    """The default of dataclass `cls`'s field `name` (a default factory is called)."""
    f = {f.name: f for f in fields(cls)}.get(name)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {name}")
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring with whitespace collapsed, for the fields that have one."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    out = {}
    for stmt, doc in pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)):
            out[stmt.target.id] = " ".join(doc.value.value.split())
    return out


def field_help(cls: type, name: str) -> str:
    """The field's docstring as a help line: lower-case first word (acronyms kept), no final stop."""
    doc = field_docs(cls).get(name, "").removesuffix(".")
    if len(doc) > 1 and not doc[1].isupper():
        doc = doc[0].lower() + doc[1:]
    return doc
