"""`halo-compile profile merge`: the entries `halo-run probe` prints on each board become one cluster
profile; a hand-written base keeps its comments, names and order; bad input is one line and exit 2."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from conftest import ROOT
from halo_runtime.core.plandir import write_atomically

from halo_compile.cli import main
from halo_compile.cluster import MB, ProfileError, load_profile, parse_profile
from halo_compile.profilemerge import HEADER, merge_files, merge_profiles

BASE = ROOT / "profiles" / "pi5.yaml"
BOARDS = ["pi5-0", "pi5-1", "pi5-2", "pi5-3"]


def entry(name: str, ip: int, *, gflops: float = 2.0, storage: bool = True, extra: str = "") -> str:
    """An entry in the format `halo-run probe` prints (the contract with the probe)."""
    return (f"# halo-run probe on {name} (hostname raspberrypi), 2026-12-06T02:30:00Z, halo 0.1.0\n"
            f"# compute (GFLOP/s, product 576x1536): fp32 first 2.1 sustained {gflops} (20 reps)\n"
            f"# link to 10.77.0.1:7799: rtt p50 1.02 ms, up loss 5.1% down 4.9%\n"
            f"name: {name}\n"
            f"coordinator: {name}\n"
            f"devices:\n"
            f"  - name: {name}\n"
            f"    address: \"10.77.0.{ip}:7700\"\n"
            f"    memory_mb: 6144\n"
            f"    compute_gflops: {gflops}              # sustained, fp32 (the compiler's default format)\n"
            f"    compute_gflops_by_format: {{fp32: {gflops}, bf16: 2.6, q8_0: 5.1, q4_0: 7.9}}\n"
            + ("    storage_mbps: 90                 # only when measured\n" if storage else "")
            + "    latency_ms: 0.51                 # only with --peer: one-way\n"
            "    jitter_ms: 0.2\n"
            "    loss: 0.05\n"
            "    burst: 2.9                       # mean loss burst length (0 = independent)\n"
            "    bandwidth_mbps: 200\n"
            "    power_w: [2.7, 7.1]              # only with --power-w IDLE,BUSY\n" + extra)


def write_entries(tmp_path, names=BOARDS, **kw) -> list[str]:
    paths = []
    for i, name in enumerate(names):
        path = tmp_path / f"{name}.entry.yaml"
        path.write_text(entry(name, i + 1, **kw))
        paths.append(str(path))
    return paths


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        runner = CliRunner()  # click 8.2+: stderr apart already
    return runner.invoke(main, ["profile", "merge", *map(str, args)])


# ---- the probe's entry is a profile -----------------------------------------------------------------

def test_an_entry_without_storage_is_a_profile_plan_accepts():
    p = parse_profile(entry("pi5-2", 3, storage=False), "pi5-2.yaml")
    assert p.coordinator == "pi5-2" and p.devices[0].power_w == (2.7, 7.1) and p.devices[0].burst == 2.9


def test_an_entry_with_storage_is_a_profile_plan_accepts():
    """A board measures its own storage; as a one-device cluster it is the coordinator, which never
    streams: the compiler takes the profile and ignores that figure."""
    assert parse_profile(entry("pi5-2", 3), "pi5-2.yaml").devices[0].storage_mbps == 0.0


# ---- merging ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [None, BASE], ids=["no-base", "base-pi5"])
def test_four_entries_merge_into_a_valid_profile(tmp_path, base):
    out = tmp_path / "measured.yaml"
    res = invoke(*write_entries(tmp_path), "-o", out, *(["--base", base] if base else []))
    assert res.exit_code == 0, res.output
    assert out.read_text().startswith(HEADER)
    p = load_profile(out)
    assert [d.name for d in p.devices] == BOARDS and p.coordinator == "pi5-0"
    assert p.name == ("pi5" if base else "measured")
    for i, d in enumerate(p.devices):
        assert d.address == f"10.77.0.{i + 1}:7700" and d.memory_bytes == 6144 * MB
        assert (d.compute_gflops, d.latency_ms, d.loss, d.burst, d.power_w) == (2.0, 0.51, 0.05, 2.9, (2.7, 7.1))
        # the coordinator's measured storage stays in the file, ignored by the compiler (it never streams)
        assert d.storage_mbps == (0.0 if d.name == "pi5-0" else 90.0)
    assert "#   pi5-0 from " in out.read_text() and out.read_text().count("storage_mbps: 90") == 4
    assert [d.compute_gflops for d in load_profile(out, "q4_0").devices] == [7.9] * 4


@pytest.mark.parametrize("base", [None, BASE], ids=["no-base", "base-pi5"])
def test_coordinator_and_name_options(tmp_path, base):
    out = tmp_path / "m.yaml"
    res = invoke(*write_entries(tmp_path), "-o", out, "--coordinator", "pi5-3", "--name", "shelf",
                 *(["--base", base] if base else []))
    assert res.exit_code == 0, res.output
    p = load_profile(out)
    assert (p.name, p.coordinator) == ("shelf", "pi5-3")
    assert p.devices[3].storage_mbps == 0.0 and p.devices[1].storage_mbps == 90.0


def test_base_keeps_comments_order_names_and_unmeasured_keys(tmp_path):
    entries = write_entries(tmp_path, ["pi5-2", "pi5-9"])  # pi5-9: not in the base, appended
    (tmp_path / "pi5-2.entry.yaml").write_text(entry("pi5-2", 3).replace("    jitter_ms: 0.2\n", ""))
    text = merge_profiles([(e, open(e).read()) for e in entries], (str(BASE), BASE.read_text()))
    base_lines = BASE.read_text().splitlines()
    for line in base_lines[:12]:  # its top comment, name, description, coordinator, defaults and their comment
        assert line in text.splitlines(), line
    assert "  # 5 GHz Wi-Fi in the same room: ~1 ms round trip, 5% frame loss" in text.splitlines()
    # devices the merge did not touch keep their one-line form
    assert '  - {name: pi5-1, address: "pi5-1.local:7700", memory_mb: 6144}' in text.splitlines()
    p = parse_profile(text, "merged")
    assert [d.name for d in p.devices] == ["pi5-0", "pi5-1", "pi5-2", "pi5-3", "pi5-9"]
    pi5_2 = p.devices[2]
    assert pi5_2.address == "10.77.0.3:7700" and pi5_2.latency_ms == 0.51   # measured keys overwrite
    assert pi5_2.jitter_ms == 0.2                                            # the base's, not measured
    assert p.devices[0].address == "pi5-0.local:7700"                        # no entry: untouched
    # an appended device keeps its entry's own comments
    assert "    power_w: [2.7, 7.1]              # only with --power-w IDLE,BUSY" in text.splitlines()


def test_one_line_device_with_end_of_line_comment_becomes_block(tmp_path):
    base = ("# my shelf\nname: shelf\ndevices:\n"
            "  - {name: a, address: 'h:1', memory_mb: 64, compute_gflops: 1}   # the desk one\n"
            "  - {name: b, address: 'h:2', memory_mb: 64, compute_gflops: 1}   # by the door\n"
            "  # next one on Wi-Fi\n"
            "  - {name: c, address: 'h:3', memory_mb: 64, compute_gflops: 1}\n")
    measured = [(f"{n}.yaml", entry(n, i, storage=False)) for i, n in enumerate("abc", 1)]
    lines = merge_profiles(measured, ("base.yaml", base)).splitlines()
    assert "  - name: a  # the desk one" in lines
    assert "  # next one on Wi-Fi" in lines and lines[lines.index("  # next one on Wi-Fi") + 1] == "  - name: c"
    # b's comment is followed by a comment line: block style would move that line into b, so b stays one line
    assert any(line.startswith("  - {name: b,") and line.endswith("# by the door") for line in lines)


def test_entry_defaults_are_folded_into_its_device():
    text = ("name: x\ndefaults: {loss: 0.02, power_w: [1, 3]}\n"
            "devices:\n  - {name: x, address: 'h:1', memory_mb: 64, compute_gflops: 1}\n")
    d = parse_profile(merge_profiles([("x.yaml", text)]), "m").devices[0]
    assert (d.loss, d.power_w) == (0.02, (1.0, 3.0))


def test_merging_into_an_earlier_output_replaces_only_the_remeasured_lines(tmp_path):
    first = tmp_path / "m1.yaml"
    merge_files(write_entries(tmp_path), first, BASE)
    again = tmp_path / "pi5-3.again.yaml"
    again.write_text(entry("pi5-3", 4, gflops=2.5).replace("2026-12-06", "2026-12-07"))
    second = tmp_path / "m2.yaml"
    merge_files([again], second, first)
    text = second.read_text()
    assert text.count(HEADER) == 1 and text.startswith(f"{HEADER}{again} into base {first}\n")
    assert "#   pi5-1 from " in text and "2026-12-06" in text             # the others' probe lines stay
    assert f"#   pi5-3 from {again}: halo-run probe on pi5-3 (hostname raspberrypi), 2026-12-07" in text
    assert not [line for line in text.splitlines() if line.startswith("#   pi5-3 from ") and "2026-12-06" in line]
    assert load_profile(second).devices[3].compute_gflops == 2.5
    merge_files([again], tmp_path / "m3.yaml", second)                       # the same merge again: no growth
    assert (tmp_path / "m3.yaml").read_text().splitlines()[1:] == text.splitlines()[1:]


# ---- bad input: one line, exit code 2, nothing written ----------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("duplicate", "pi5-1.entry.yaml: device 'pi5-0' is also in"),
    ("invalid-entry", "pi5-1.entry.yaml: devices[0] (pi5-1).power_w: need 0 <= idle <= busy watts, got [7.1, 2.7]"),
    ("not-yaml", "pi5-1.entry.yaml: not valid YAML"),
    ("missing-entry", "nope.yaml: no such profile"),
    ("unknown-coordinator", "--coordinator: 'pi5-7' is not one of the merged devices (pi5-0, pi5-1)"),
    ("bad-base", "base.yaml: unknown key 'colour'"),
    ("shared-address", "merge of "),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, message):
    e0, e1 = write_entries(tmp_path, ["pi5-0", "pi5-1"])
    args = [e0, e1]
    if case == "duplicate":
        (tmp_path / "pi5-1.entry.yaml").write_text(entry("pi5-0", 2))
    elif case == "invalid-entry":
        (tmp_path / "pi5-1.entry.yaml").write_text(entry("pi5-1", 2).replace("[2.7, 7.1]", "[7.1, 2.7]"))
    elif case == "not-yaml":
        (tmp_path / "pi5-1.entry.yaml").write_text("devices: [\n")
    elif case == "missing-entry":
        args.append(tmp_path / "nope.yaml")
    elif case == "unknown-coordinator":
        args += ["--coordinator", "pi5-7"]
    elif case == "bad-base":
        (tmp_path / "base.yaml").write_text(BASE.read_text() + "colour: red\n")
        args += ["--base", tmp_path / "base.yaml"]
    elif case == "shared-address":
        (tmp_path / "pi5-1.entry.yaml").write_text(entry("pi5-1", 1))
    out = tmp_path / "out.yaml"
    out.write_text("previous\n")
    res = invoke(*args, "-o", out)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("halo-compile: error: "), res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert out.read_text() == "previous\n"                              # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temp file


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "out.yaml"
    out.write_text("previous\n")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match=f"{out}: cannot write \\(No space left on device\\)"):
        write_atomically(out, "name: new\n")
    assert out.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["out.yaml"]


def test_no_entries_is_a_usage_error(tmp_path):
    assert invoke("-o", tmp_path / "o.yaml").exit_code == 2
    with pytest.raises(ProfileError, match="no entries"):
        merge_profiles([])
