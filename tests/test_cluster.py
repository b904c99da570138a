"""Cluster profiles: the shipped YAML files load, and every bad field is refused with a message that
names the file and the field."""
from __future__ import annotations

import copy
import dataclasses
import hashlib

import pytest
import yaml
from conftest import ROOT, cluster_yaml
from halo_runtime.core.plan import Device

from halo_compile.cluster import MB, ClusterProfile, ProfileError, load_profile, parse_profile

PROFILES = ROOT / "profiles"


# ---- the shipped profiles -------------------------------------------------------------------------

@pytest.mark.parametrize("file, name, n, coordinator", [
    ("pi5.yaml", "pi5", 4, "pi5-0"),
    ("pi5-2ms.yaml", "pi5-2ms", 4, "pi5-0"),
    ("pi5-tight-2ms.yaml", "pi5-tight-2ms", 4, "pi5-0"),
    ("pi-mixed.yaml", "pi-mixed", 4, "pi5"),
    ("local.yaml", "local", 4, "dev0"),
    ("single.yaml", "single", 1, "pi5-0"),
])
def test_shipped_profiles_load(file, name, n, coordinator):
    p = load_profile(PROFILES / file)
    assert isinstance(p, ClusterProfile)
    assert p.name == name
    assert len(p.devices) == n
    assert p.coordinator == coordinator
    assert len({d.name for d in p.devices}) == n and len({d.address for d in p.devices}) == n
    assert all(isinstance(d, Device) and d.memory_bytes > 0 and d.compute_gflops > 0 for d in p.devices)


def test_shipped_profiles_are_all_covered():
    assert sorted(f.name for f in PROFILES.glob("*.yaml")) == ["local.yaml", "pi-mixed.yaml", "pi5-2ms.yaml",
                                                                 "pi5-tight-2ms.yaml", "pi5.yaml", "single.yaml"]


def test_pi5_profile_values():
    p = load_profile(PROFILES / "pi5.yaml")
    assert [d.name for d in p.devices] == ["pi5-0", "pi5-1", "pi5-2", "pi5-3"]
    lossy = [d for d in p.devices if d.loss > 0]
    assert [d.name for d in lossy] == ["pi5-2", "pi5-3"]
    assert all(d.loss == 0.05 for d in lossy)
    assert all(d.memory_bytes == 6144 * MB for d in p.devices)
    assert p.devices[1].address == "pi5-1.local:7700" and p.devices[1].host == "pi5-1.local"
    assert p.devices[1].port == 7700


@pytest.mark.parametrize("file", ["pi5.yaml", "pi5-2ms.yaml", "pi5-tight-2ms.yaml", "pi-mixed.yaml", "local.yaml"])
def test_shipped_profiles_match_their_yaml(file):
    """Every device field is the device's own value, else the profile default, else the Device default
    (compared with the YAML itself, so retuning a profile's numbers does not break this test)."""
    raw = yaml.safe_load((PROFILES / file).read_text())
    defaults = raw.get("defaults") or {}
    p = load_profile(PROFILES / file)
    assert p.name == raw["name"] and p.coordinator == raw["coordinator"]
    assert len(p.devices) == len(raw["devices"])
    for dev, spec in zip(p.devices, raw["devices"]):
        assert dev.name == spec["name"] and dev.address == spec["address"]
        assert dev.memory_bytes == int(spec["memory_mb"] * MB)
        for key in ("compute_gflops", "latency_ms", "jitter_ms", "bandwidth_mbps", "loss"):
            want = spec.get(key, defaults.get(key, getattr(Device, key, None)))
            assert getattr(dev, key) == want, (file, dev.name, key)


def test_loaded_from_str_path_too():
    assert load_profile(str(PROFILES / "local.yaml")) == load_profile(PROFILES / "local.yaml")


# ---- defaults -------------------------------------------------------------------------------------

def test_defaults_are_inherited_and_overridable(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("name: d\ndefaults: {latency_ms: 1.5, jitter_ms: 0.25, loss: 0.01, compute_gflops: 3}\n"
                 "devices:\n"
                 "  - {name: a, address: 'h:1', memory_mb: 10}\n"
                 "  - {name: b, address: 'h:2', memory_mb: 20, latency_ms: 7, loss: 0.0, compute_gflops: 9}\n")
    a, b = load_profile(f).devices
    assert (a.latency_ms, a.jitter_ms, a.loss, a.compute_gflops) == (1.5, 0.25, 0.01, 3.0)
    assert (b.latency_ms, b.jitter_ms, b.loss, b.compute_gflops) == (7.0, 0.25, 0.0, 9.0)
    assert a.bandwidth_mbps == b.bandwidth_mbps == Device.bandwidth_mbps  # neither sets it: dataclass default
    assert a.memory_bytes == 10 * MB and b.memory_bytes == 20 * MB


def test_name_and_coordinator_default(tmp_path):
    f = tmp_path / "shelf-7.yaml"
    f.write_text("devices:\n  - {name: x, address: 'h:1', memory_mb: 1, compute_gflops: 1}\n"
                 "  - {name: y, address: 'h:2', memory_mb: 1, compute_gflops: 1}\n")
    p = load_profile(f)
    assert p.name == "shelf-7"        # file stem
    assert p.coordinator == "x"       # first device


def test_cluster_yaml_helper_parses():
    p = parse_profile(cluster_yaml(5, lossy=2), "helper.yaml")
    assert [d.loss for d in p.devices] == [0.0, 0.0, 0.0, 0.05, 0.05]
    assert p.coordinator == "dev0" and p.name == "test"


# ---- fingerprint ----------------------------------------------------------------------------------

def test_fingerprint_is_sha256_of_the_bytes(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes((PROFILES / "pi5.yaml").read_bytes())
    p = load_profile(f)
    assert p.fingerprint == hashlib.sha256(f.read_bytes()).hexdigest()
    changed = f.read_bytes().replace(b"#", b"# edited:", 1)   # the first comment, whatever it says
    assert changed != f.read_bytes()
    f.write_bytes(changed)
    q = load_profile(f)
    assert q.devices == p.devices and q.name == p.name       # same content...
    assert q.fingerprint != p.fingerprint                       # ...but a comment changed
    assert q.fingerprint == hashlib.sha256(f.read_bytes()).hexdigest()


def test_fingerprint_of_crlf_file_is_sha256_of_the_bytes(tmp_path):
    f = tmp_path / "crlf.yaml"
    f.write_bytes((PROFILES / "local.yaml").read_bytes().replace(b"\n", b"\r\n"))
    p = load_profile(f)
    assert p.devices == load_profile(PROFILES / "local.yaml").devices
    assert p.fingerprint == hashlib.sha256(f.read_bytes()).hexdigest()


# ---- bad profiles ---------------------------------------------------------------------------------

BASE = {
    "name": "bad",
    "coordinator": "a",
    "defaults": {"latency_ms": 0.1},
    "devices": [
        {"name": "a", "address": "10.0.0.1:7700", "memory_mb": 512, "compute_gflops": 4},
        {"name": "b", "address": "10.0.0.2:7700", "memory_mb": 512, "compute_gflops": 4, "loss": 0.05},
    ],
}


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _del(path):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]
    return edit


BAD = [
    # id, edit (callable on a copy of BASE) or raw text, substrings the message must contain
    ("yaml-syntax", "name: bad\ndevices:\n  - {name: a, address: 'h:1'\n  - oops: [\n",
     ["not valid YAML", "at line 4"]),
    ("top-level-list", "- name: a\n- name: b\n", ["expected a mapping", "'devices'"]),
    ("top-level-scalar", "just a string\n", ["expected a mapping"]),
    ("unknown-top-key", _set(["colour"], "red"), ["unknown key 'colour'"]),
    ("unknown-device-key", _set(["devices", 1, "ram_mb"], 512), ["devices[1]", "unknown key 'ram_mb'"]),
    ("missing-memory", _del(["devices", 1, "memory_mb"]), ["devices[1]", "missing required key 'memory_mb'"]),
    ("missing-address", _del(["devices", 0, "address"]), ["devices[0]", "missing required key 'address'"]),
    ("negative-memory", _set(["devices", 1, "memory_mb"], -1), ["devices[1] (b).memory_mb", "positive", "-1"]),
    ("zero-memory", _set(["devices", 0, "memory_mb"], 0), ["devices[0] (a).memory_mb", "positive"]),
    ("memory-string", _set(["devices", 1, "memory_mb"], "512"),
     ["devices[1] (b).memory_mb", "expected a number", "'512'"]),
    ("memory-bool", _set(["devices", 1, "memory_mb"], True), ["devices[1] (b).memory_mb", "expected a number"]),
    ("loss-one", _set(["devices", 1, "loss"], 1.0), ["devices[1] (b).loss", "outside [0, 1)"]),
    ("loss-negative", _set(["devices", 1, "loss"], -0.1), ["devices[1] (b).loss", "-0.1", "outside [0, 1)"]),
    ("burst-short", _set(["devices", 1, "burst"], 0.5), ["devices[1] (b).burst", "0.5", "mean burst length"]),
    ("zero-compute", _set(["devices", 0, "compute_gflops"], 0), ["devices[0] (a).compute_gflops", "positive"]),
    ("zero-bandwidth", _set(["devices", 0, "bandwidth_mbps"], 0), ["devices[0] (a).bandwidth_mbps", "positive"]),
    ("negative-latency", _set(["devices", 1, "latency_ms"], -0.5), ["devices[1] (b).latency_ms", ">= 0"]),
    ("negative-default-latency", _set(["defaults", "latency_ms"], -2), ["devices[0] (a).latency_ms", ">= 0"]),
    ("negative-jitter", _set(["devices", 0, "jitter_ms"], -1), ["devices[0] (a).jitter_ms", ">= 0"]),
    ("duplicate-names", _set(["devices", 1, "name"], "a"), ["devices", "duplicate device name 'a'"]),
    ("duplicate-addresses", _set(["devices", 1, "address"], "10.0.0.1:7700"),
     ["devices", "share the address '10.0.0.1:7700'"]),
    ("address-without-port", _set(["devices", 1, "address"], "10.0.0.2"),
     ["devices[1] (b)", "address '10.0.0.2' is not host:port"]),
    ("address-port-out-of-range", _set(["devices", 1, "address"], "10.0.0.2:70000"),
     ["devices[1] (b)", "address '10.0.0.2:70000' is not host:port"]),
    ("address-port-zero", _set(["devices", 1, "address"], "10.0.0.2:0"), ["devices[1] (b)", "not host:port"]),
    ("address-not-string", _set(["devices", 1, "address"], 7700), ["devices[1] (b).address", "host:port"]),
    ("bad-device-name", _set(["devices", 0, "name"], "a b"), ["devices[0].name", "'a b'"]),
    ("device-not-mapping", _set(["devices", 0], "a"), ["devices[0]", "expected a mapping"]),
    ("coordinator-not-a-device", _set(["coordinator"], "z"), ["coordinator", "'z' is not one of the devices"]),
    ("empty-devices", _set(["devices"], []), ["devices", "non-empty list"]),
    ("devices-missing", _del(["devices"]), ["devices", "non-empty list"]),
    ("defaults-name", _set(["defaults", "name"], "x"), ["defaults", "'name' cannot have a default"]),
    ("defaults-memory", _set(["defaults", "memory_mb"], 100), ["defaults", "'memory_mb' cannot have a default"]),
    ("defaults-not-mapping", _set(["defaults"], [1, 2]), ["defaults", "expected a mapping"]),
    ("empty-name", _set(["name"], ""), ["name", "non-empty string"]),
]


@pytest.mark.parametrize("case, expected", [(b[1], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_profile(tmp_path, case, expected):
    if isinstance(case, str):
        text = case
    else:
        data = copy.deepcopy(BASE)
        case(data)
        text = yaml.safe_dump(data, sort_keys=False)
    f = tmp_path / "cluster-under-test.yaml"
    f.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}: "), msg                 # names the file, first
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "\n" not in msg                               # one line, for the CLI


def test_base_of_bad_profiles_is_valid(tmp_path):
    """The cases above fail because of their one edit, not because BASE is broken."""
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(BASE, sort_keys=False))
    p = load_profile(f)
    assert [d.name for d in p.devices] == ["a", "b"] and p.devices[1].loss == 0.05


# Non-finite numbers are refused with the field named.
@pytest.mark.parametrize("field, value", [("memory_mb", ".inf"), ("memory_mb", ".nan"),
                                          ("compute_gflops", ".inf"), ("compute_gflops", ".nan"),
                                          ("latency_ms", ".nan"), ("bandwidth_mbps", ".inf")])
def test_non_finite_numbers_are_refused(tmp_path, field, value):
    f = tmp_path / "nonfinite.yaml"
    fields = {"name": "a", "address": "'h:1'", "memory_mb": "64", "compute_gflops": "1", field: value}
    f.write_text("devices:\n  - {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(f)
    assert str(err.value).startswith(f"{f}: ") and f".{field}" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no such profile") as err:
        load_profile(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(err.value)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"name: caf\xe9\ndevices: []\n")
    with pytest.raises(ProfileError, match="cannot read") as err:
        load_profile(f)
    assert str(f) in str(err.value)


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


def test_profile_dataclass_checks():
    d = Device(name="a", address="h:1", memory_bytes=1, compute_gflops=1.0)
    with pytest.raises(ValueError, match="at least one device"):
        ClusterProfile(name="p", coordinator="a", devices=(), fingerprint="")
    with pytest.raises(ValueError, match="'b' is not one of the devices"):
        ClusterProfile(name="p", coordinator="b", devices=(d,), fingerprint="")


def test_sources_of_parse_profile_appear_in_messages():
    with pytest.raises(ProfileError, match=r"^<stdin>: devices: expected a non-empty list$"):
        parse_profile("name: x\n", "<stdin>")


# ---- measured keys: compute per weight format, power (issue 25) ------------------------------------

MEASURED = ("name: m\ndefaults: {compute_gflops_by_format: {q8_0: 4.0}}\ndevices:\n"
            "  - {name: a, address: 'h:1', memory_mb: 64, compute_gflops: 2,"
            " compute_gflops_by_format: {fp32: 2.2, bf16: 2.6, q8_0: 5.1}, power_w: [2.7, 7.1]}\n"
            "  - {name: b, address: 'h:2', memory_mb: 64, compute_gflops: 1}\n")


@pytest.mark.parametrize("weights, a, b", [
    ("fp32", 2.2, 1.0),   # the measured fp32 figure wins over compute_gflops
    ("bf16", 2.6, 1.0),
    ("q8_0", 5.1, 4.0),   # b inherits the defaults' mapping
    ("q4_0", 2.0, 1.0),   # not measured in q4_0: compute_gflops
])
def test_compute_is_resolved_for_the_compiles_weight_format(weights, a, b):
    p = parse_profile(MEASURED, "m.yaml", weights)
    assert [d.compute_gflops for d in p.devices] == [a, b] and p.weights == weights


@pytest.mark.parametrize("by_format, weights, expected", [
    (None, "q8_0", 2.0), ({}, "fp32", 2.0), ({"q8_0": 5.1}, "q8_0", 5.1), ({"q8_0": 5.1}, "q4_0", 2.0),
    ({"fp32": 2.2}, "fp32", 2.2),
])
def test_compute_for_format(by_format, weights, expected):
    from halo_compile.cluster import compute_for_format

    assert compute_for_format(2.0, by_format, weights) == expected


def test_load_profile_resolves_too(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(MEASURED)
    assert load_profile(f, "q8_0").devices[0].compute_gflops == 5.1
    assert load_profile(f).devices[0].compute_gflops == 2.2
    assert load_profile(f).fingerprint == load_profile(f, "q8_0").fingerprint   # the file's bytes, either way
    with pytest.raises(ValueError, match="unknown weight format 'fp8'"):
        load_profile(f, "fp8")


def test_a_shared_medium_is_read_into_the_device_and_stays_out_of_plans_without_one(tmp_path):
    f = tmp_path / "air.yaml"
    f.write_text("coordinator: a\ndefaults: {medium: wifi0}\ndevices:\n"
                 "  - {name: a, address: 'h:1', memory_mb: 64, compute_gflops: 1, medium: ''}\n"
                 "  - {name: b, address: 'h:2', memory_mb: 64, compute_gflops: 1}\n")
    a, b = load_profile(f).devices
    assert (a.medium, b.medium) == ("", "wifi0")
    from halo_runtime.core.planjson import to_plain
    assert "medium" not in to_plain(a) and to_plain(b)["medium"] == "wifi0"


def test_power_is_read_into_the_device():
    a, b = parse_profile(MEASURED, "m.yaml").devices
    assert a.power_w == (2.7, 7.1) and b.power_w is None


@pytest.mark.parametrize("field, value, message", [
    ("power_w", "[7.1, 2.7]", "devices[0] (a).power_w: need 0 <= idle <= busy watts, got [7.1, 2.7]"),
    ("power_w", "[-1, 2]", "devices[0] (a).power_w: need 0 <= idle <= busy watts, got [-1, 2]"),
    ("power_w", "[2.7]", "devices[0] (a).power_w: expected [IDLE, BUSY] in watts, got [2.7]"),
    ("power_w", "7.1", "devices[0] (a).power_w: expected [IDLE, BUSY] in watts, got 7.1"),
    ("power_w", "[2, .inf]", "devices[0] (a).power_w: expected a number, got inf"),
    ("power_w", "[idle, 2]", "devices[0] (a).power_w: expected a number, got 'idle'"),
    ("medium", "[wifi]", "devices[0] (a).medium: expected the name of a shared medium, got ['wifi']"),
    ("medium", "'wi fi'", "devices[0] (a): device a: medium 'wi fi' is not a name (letters, digits, - and _)"),
    ("compute_gflops_by_format", "{q8_0: 0}", "devices[0] (a).compute_gflops_by_format.q8_0: must be positive, got 0"),
    ("compute_gflops_by_format", "{q8_0: fast}",
     "devices[0] (a).compute_gflops_by_format.q8_0: expected a number, got 'fast'"),
    ("compute_gflops_by_format", "{fp16: 3}",
     "devices[0] (a).compute_gflops_by_format: unknown weight format 'fp16' (choose from fp32, bf16, q8_0, q4_0)"),
    ("compute_gflops_by_format", "{int8: 3}",
     "devices[0] (a).compute_gflops_by_format: weight format 'int8' was replaced by q8_0"),
    ("compute_gflops_by_format", "[3, 4]",
     "devices[0] (a).compute_gflops_by_format: expected a mapping of weight format to GFLOP/s, got [3, 4]"),
])
def test_measured_keys_errors_name_file_device_and_field(tmp_path, field, value, message):
    f = tmp_path / "bad-measured.yaml"
    f.write_text(f"devices:\n  - {{name: a, address: 'h:1', memory_mb: 64, compute_gflops: 1, {field}: {value}}}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(f)
    assert str(err.value).startswith(f"{f}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_measured_key_through_the_cli_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from halo_compile.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text("devices:\n  - {name: a, address: 'h:1', memory_mb: 64, compute_gflops: 1, power_w: [3, 1]}\n")
    res = CliRunner().invoke(main, ["plan", "nothing-here", "--cluster", str(f), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip() == f"halo-compile: error: {f}: devices[0] (a).power_w: need 0 <= idle <= busy watts, " \
                                 "got [3, 1]"


@pytest.mark.parametrize("power", [(3.0, 1.0), (-1.0, 2.0), (1.0,), (1.0, float("nan"))])
def test_device_checks_power(power):
    with pytest.raises(ValueError, match="power_w"):
        Device("a", "h:1", 1, 1.0, power_w=power)


# ---- energy per token ---------------------------------------------------------------------------------

@pytest.mark.parametrize("power, compute_ms, token_ms, expected", [
    ((2.5, 7.0), 10.0, 40.0, 7.0 * 10 + 2.5 * 30),   # busy for its compute, idle for the rest
    ((2.5, 7.0), 40.0, 40.0, 280.0),                 # busy all the token
    ((2.5, 7.0), 0.0, 40.0, 100.0),                  # nothing placed: idle all the token
    ((0.0, 5.0), 50.0, 40.0, 250.0),                 # never a negative idle time
])
def test_energy_per_token(power, compute_ms, token_ms, expected):
    from halo_compile.placecost import energy_mj

    assert energy_mj(power, compute_ms, token_ms) == pytest.approx(expected)


def test_reports_get_energy_and_the_plan_their_sum():
    from halo_runtime.core.plan import DeviceReport, Plan, load_plan

    from halo_compile.place import with_energy
    from halo_compile.report import inspect_text

    plan = load_plan(ROOT / "artifacts" / "smollm2-135m-pi5")
    assert plan.predicted_token_mj is None and "energy" not in inspect_text(plan)
    devices = tuple(d if d.name == "pi5-3" else dataclasses.replace(d, power_w=(2.0, 6.0)) for d in plan.devices)
    reports = with_energy(plan.device_reports, devices, token_ms=100.0)
    for r in reports:
        want = None if r.name == "pi5-3" else 6.0 * r.predicted_time_ms + 2.0 * (100.0 - r.predicted_time_ms)
        assert r.energy_mj == (want if want is None else pytest.approx(want))
    withpower = dataclasses.replace(plan, devices=devices, device_reports=reports)
    assert withpower.predicted_token_mj == pytest.approx(sum(r.energy_mj for r in reports[:3]))
    line = next(ln for ln in inspect_text(withpower).splitlines() if ln.startswith("predicted energy"))
    assert f"{withpower.predicted_token_mj:.1f} mJ" in line and line.endswith("not counted, no power_w: pi5-3")
    again = Plan.from_json(withpower.to_json())          # the new fields survive plan.json
    assert again.devices[0].power_w == (2.0, 6.0) and again.device_reports[0].energy_mj == pytest.approx(
        reports[0].energy_mj, rel=1e-6)
    assert isinstance(again.device_reports[3], DeviceReport) and again.device_reports[3].energy_mj is None


def test_plans_without_power_keep_their_bytes():
    from halo_runtime.core.plan import Plan

    text = (ROOT / "artifacts" / "smollm2-135m-pi5" / "plan.json").read_text()
    assert Plan.from_json(text).to_json() == text and "power_w" not in text and "energy_mj" not in text
