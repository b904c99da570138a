"""`halo-compile profile merge`: one cluster profile from the entries `halo-run probe` prints on each board.

An entry is a complete one-device profile (a valid profile with any number of devices is accepted;
each of its devices is merged, its `defaults:` folded into them). With a base profile, the user's
hand-written one, each entry updates the base's device of the same name (the entry's keys
overwrite, keys it does not have are kept) and devices the base lacks are appended; the base's
comments, key order, name, description, coordinator and defaults stay. The YAML is edited in
ruamel.yaml's round-trip mode, which keeps comments. A device the base wrote on one line
(`- {name: ...}`) is rewritten in block style when the merge updates it: its measured keys would
make a line of 200 characters (its end-of-line comment moves to its `name:` line; one followed by
comment lines keeps the one-line style, so no comment changes place). Without a base, the first
entry's device is the coordinator unless one is named. Every measured key is kept, the
coordinator's `storage_mbps` too (the compiler ignores it there: the coordinator never streams).

The result starts with a comment naming where it came from (and the entries' own comment lines:
what the probe measured), is validated by `cluster.parse_profile`, and is written atomically.

Example (two entries, no base):
    >>> from halo_compile.profilemerge import merge_profiles
    >>> def entry(name, ip):
    ...     return (f"# halo-run probe on {name}\\nname: {name}\\ndevices:\\n  - name: {name}\\n"
    ...             f"    address: \\"{ip}:7700\\"\\n    memory_mb: 6144\\n    compute_gflops: 2.0  # sustained\\n"
    ...             f"    power_w: [2.7, 7.1]\\n")
    >>> print(merge_profiles([("pi-a.yaml", entry("pi-a", "10.0.0.1")), ("pi-b.yaml", entry("pi-b", "10.0.0.2"))]),
    ...       end="")
    # halo-compile profile merge of pi-a.yaml, pi-b.yaml
    #   pi-a from pi-a.yaml: halo-run probe on pi-a
    #   pi-b from pi-b.yaml: halo-run probe on pi-b
    name: measured
    coordinator: pi-a
    devices:
      - name: pi-a
        address: "10.0.0.1:7700"
        memory_mb: 6144
        compute_gflops: 2.0  # sustained
        power_w: [2.7, 7.1]
      - name: pi-b
        address: "10.0.0.2:7700"
        memory_mb: 6144
        compute_gflops: 2.0  # sustained
        power_w: [2.7, 7.1]
    >>> merge_profiles([("a.yaml", entry("pi-a", "10.0.0.1")), ("b.yaml", entry("pi-a", "10.0.0.2"))])
    Traceback (most recent call last):
    halo_compile.cluster.ProfileError: b.yaml: device 'pi-a' is also in a.yaml (one entry per device)
"""
from __future__ import annotations

import io
from pathlib import Path

from halo_runtime.core.plandir import write_atomically
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from .cluster import ProfileError, parse_profile, read_profile_text

HEADER = "# halo-compile profile merge of "
"""First line of the comment a merge writes; a later merge with this output as its base replaces it."""
DETAIL = "#   "
"""Prefix of the header's further lines (the entries' own comments)."""
DEFAULT_NAME = "measured"
"""Profile name of a merge without a base or --name."""


def _yaml() -> YAML:
    """Round-trip YAML in the layout of the shipped profiles and of the probe's entries."""
    yaml = YAML()  # round-trip: comments, key order, quotes and number spellings survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never fold a long line: a profile is read and diffed line by line
    return yaml


def _load(source: str, text: str) -> CommentedMap:
    """Validate `text` as a profile (errors name `source`), then load it for editing."""
    parse_profile(text, source)
    try:
        return _yaml().load(text)
    except YAMLError as e:  # PyYAML accepted it; ruamel.yaml is stricter in rare corners
        raise ProfileError(f"{source}: not valid YAML for round-trip editing: {str(e).splitlines()[0]}") from None


def _plain(value):
    """A copy of a YAML value without its comments (they belong to the file it came from), in its flow
    or block style."""
    if isinstance(value, dict):
        out = CommentedMap((k, _plain(v)) for k, v in value.items())
    elif isinstance(value, list):
        out = CommentedSeq(_plain(v) for v in value)
    else:
        return value
    if getattr(value, "fa", None) is not None and value.fa.flow_style():
        out.fa.set_flow_style()
    return out


def _leading_comments(text: str) -> list[str]:
    """The comment lines before a file's first key, without their '#' (the probe's measurements)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line[1:].strip())
        elif line.strip():
            break
    return [line for line in out if line]


def _split_merge_header(text: str) -> tuple[list[tuple[set[str], str]], str]:
    """An earlier merge's header at the top of `text`, as (device names, line) per detail line, and the
    rest of `text` (a merge into an earlier output replaces its header, keeping the lines of the devices
    it does not measure again)."""
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].startswith(HEADER):
        return [], text
    end, kept = 1, []
    while end < len(lines) and lines[end].startswith(DETAIL):
        names = lines[end][len(DETAIL):].split(" ", 1)[0]
        kept.append((set(names.split(",")), lines[end].rstrip("\n")))
        end += 1
    return kept, "".join(lines[end:])


def _detail(names, source: str, line: str) -> str:
    """A header line about the devices `names` (measured in `source`), keyed by them for later merges."""
    return f"{DETAIL}{','.join(names)} from {source}: {line}"


def _entry_devices(source: str, text: str) -> list[CommentedMap]:
    """The devices of one entry, each with the entry's `defaults:` folded in (a base has its own)."""
    doc = _load(source, text)
    defaults = doc.get("defaults") or {}
    devices = list(doc["devices"])
    for device in devices:
        for key, value in defaults.items():
            if key not in device:
                device[key] = _plain(value)
    return devices


def _update(devices: CommentedSeq, index: int, measured: CommentedMap) -> None:
    """Overwrite the keys of base device `index` with the entry's, keeping its other keys and comments."""
    device = devices[index]
    for key, value in measured.items():
        device[key] = _plain(value)
    if not device.fa.flow_style():
        return
    slot = devices.ca.items.get(index)
    eol = slot[0] if slot else None
    if eol is not None and eol.value.count("\n") > 1:
        return  # comment lines follow it: in block style they would land inside the device
    device.fa.set_block_style()
    if eol is not None:  # in block style it would print before the device's first key
        slot[0] = None
        device.yaml_add_eol_comment(eol.value.strip(), "name")


def merge_profiles(entries: list[tuple[str, str]], base: tuple[str, str] | None = None, name: str | None = None,
                   coordinator: str | None = None) -> str:
    """The merged profile's text. entries and base: (source, text) pairs, the source naming the file in
    errors and in the header; name: the profile's name (default: the base's, else "measured");
    coordinator: its coordinator (default: the base's, else the first entry's first device).
    ProfileError, one line naming the file, for an entry or base that is not a valid profile, a device
    in two entries, or a coordinator that is not a merged device."""
    if not entries:
        raise ProfileError("no entries to merge (give the files `halo-run probe` wrote on each board)")
    seen: dict[str, str] = {}
    measured: list[CommentedMap] = []
    details: list[str] = []
    for source, text in entries:
        mine = _entry_devices(source, text)
        details += [_detail([d["name"] for d in mine], source, line) for line in _leading_comments(text)]
        for device in mine:
            if device["name"] in seen:
                raise ProfileError(f"{source}: device {device['name']!r} is also in {seen[device['name']]} "
                                   "(one entry per device)")
            seen[device["name"]] = source
            measured.append(device)

    earlier: list[tuple[set[str], str]] = []
    if base is not None:
        earlier, base_text = _split_merge_header(base[1])
        doc = _load(base[0], base_text)
    else:
        doc = CommentedMap([("name", DEFAULT_NAME), ("coordinator", measured[0]["name"]), ("devices", CommentedSeq())])
    devices = doc["devices"]
    index = {device["name"]: i for i, device in enumerate(devices)}
    for device in measured:
        if device["name"] in index:
            _update(devices, index[device["name"]], device)
        else:
            devices.append(device)  # with the entry's own comments: nothing in the base describes it
    names = [device["name"] for device in devices]

    if name is not None:
        doc["name"] = name
    if coordinator is not None:
        if coordinator not in names:
            raise ProfileError(f"--coordinator: {coordinator!r} is not one of the merged devices ({', '.join(names)})")
        if "coordinator" in doc:
            doc["coordinator"] = coordinator
        else:
            doc.insert(1 if "name" in doc else 0, "coordinator", coordinator)

    sources = [source for source, _ in entries]
    header = [HEADER + ", ".join(sources) + (f" into base {base[0]}" if base is not None else "")]
    header += [line for names, line in earlier if not names & seen.keys()] + details
    out = io.StringIO()
    _yaml().dump(doc, out)
    text = "\n".join(header) + "\n" + out.getvalue()
    parse_profile(text, "merge of " + ", ".join(([base[0]] if base is not None else []) + sources))
    return text


def merge_files(entries, out: str | Path, base: str | Path | None = None, name: str | None = None,
                coordinator: str | None = None) -> str:
    """Merge the entry files (and base file) into `out`, written only once the result is valid; the text."""
    text = merge_profiles([(str(e), read_profile_text(e)) for e in entries],
                          (str(base), read_profile_text(base)) if base is not None else None, name, coordinator)
    write_atomically(out, text)
    return text
