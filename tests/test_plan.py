"""The plan schema: deterministic JSON that round-trips, a complete and disjoint placement, field-exact
errors for damaged plans, and shards that reassemble to the model."""
from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from halo_runtime.core.plan import PLAN_FILE, SCHEMA_VERSION, Plan, PlanError, load_plan
from halo_runtime.core.planjson import FLOAT_DIGITS
from halo_runtime.core.shards import load_shard

from halo_compile.slicing import assemble


@pytest.fixture(scope="module")
def plan_and_dir(tiny_plan):
    return tiny_plan


@pytest.fixture(scope="module")
def plan(plan_and_dir):
    """The plan as the runtime sees it: read back from plan.json.

    (compile_plan returns the Plan before serialisation, with unrounded floats; see
    test_compiled_plan_equals_the_file_up_to_rounding.)"""
    return load_plan(plan_and_dir[1])


@pytest.fixture(scope="module")
def plan_text(plan_and_dir):
    return (plan_and_dir[1] / PLAN_FILE).read_text()


@pytest.fixture
def data(plan_text):
    """plan.json parsed, a fresh copy for each test to damage."""
    return json.loads(plan_text)


@pytest.fixture(scope="module")
def shards(plan_and_dir):
    plan, directory = plan_and_dir
    return {dev: load_shard(directory, plan, dev) for dev in plan.device_names}


# ---- round trip and deterministic bytes -----------------------------------------------------------

def test_plan_json_round_trips(plan, plan_text, plan_and_dir):
    assert plan_text == plan.to_json()                       # the file holds exactly to_json()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    assert again.to_json().encode() == plan_text.encode()    # byte-identical
    assert Plan.from_json(again.to_json()) == again          # a fixed point
    assert load_plan(str(plan_and_dir[1])) == plan


def test_compiled_plan_equals_the_file_up_to_rounding(plan, plan_and_dir, plan_text):
    compiled = plan_and_dir[0]
    assert compiled.to_json() == plan_text                   # same bytes once serialised
    assert compiled.groups[0].importance == pytest.approx(plan.groups[0].importance, rel=1e-5)
    for a, b in zip(compiled.groups, plan.groups):
        assert (a.id, a.members, a.device, a.critical) == (b.id, b.members, b.device, b.critical)
        assert a.importance == pytest.approx(b.importance, rel=1e-5, abs=1e-12)


def test_plan_shape_matches_the_tiny_model(plan):
    assert plan.schema_version == SCHEMA_VERSION
    assert len(plan.devices) == 4 and plan.coordinator == "dev0"
    assert [d.loss for d in plan.devices] == [0.0, 0.0, 0.0, 0.05]
    assert plan.model.num_layers == 3 and plan.model.intermediate_size == 96
    assert plan.model.num_kv_heads == 2 and plan.model.num_heads == 4
    assert plan.max_context == 256
    assert plan.shards == tuple(f"shard-{d}.safetensors" for d in plan.device_names)
    assert [r.name for r in plan.device_reports] == list(plan.device_names)
    assert len(plan.profile_fingerprint) == 64 and len(plan.model_fingerprint) == 64


def _pairs_hook(seen):
    def hook(pairs):
        seen.append([k for k, _ in pairs])
        return dict(pairs)
    return hook


def test_json_keys_sorted(plan_text):
    seen: list[list[str]] = []
    json.loads(plan_text, object_pairs_hook=_pairs_hook(seen))
    assert len(seen) > 10                                    # plan, model, devices, groups, ...
    for keys in seen:
        assert keys == sorted(keys), keys
    assert plan_text.endswith("}\n") and not plan_text.endswith("\n\n")


def test_one_group_per_line(plan, plan_text):
    lines = plan_text.splitlines()
    for g in plan.groups:
        hits = [line for line in lines if f'"id": "{g.id}"' in line]
        assert len(hits) == 1, g.id


def _significant_digits(literal: str) -> int:
    mantissa = literal.lower().split("e")[0].lstrip("-").replace(".", "")
    return len(mantissa.lstrip("0").rstrip("0")) or 1


def test_floats_have_at_most_six_significant_digits(plan_text):
    literals: list[str] = []
    json.loads(plan_text, parse_float=lambda s: literals.append(s) or float(s))
    assert len(literals) > 20
    # the tiny plan has importances and rates that are not short decimals, so rounding is exercised
    assert any(_significant_digits(s) == FLOAT_DIGITS for s in literals)
    for s in literals:
        assert _significant_digits(s) <= FLOAT_DIGITS, s
        assert float(f"{float(s):.{FLOAT_DIGITS}g}") == float(s), s


def test_to_json_rounds_floats(plan):
    g = plan.groups[0]
    wide = dataclasses.replace(plan, groups=(dataclasses.replace(g, importance=0.123456789012),) + plan.groups[1:],
                               predicted_token_ms=1234.56789)
    text = wide.to_json()
    assert '"importance": 0.123457' in text and "0.123456789" not in text
    assert re.search(r'"predicted_token_ms": 1234\.57\b', text)
    back = Plan.from_json(text)
    assert back.groups[0].importance == 0.123457 and back.predicted_token_ms == 1234.57


# ---- the placement is complete and disjoint -------------------------------------------------------

def test_every_neuron_and_kv_head_in_exactly_one_group(plan):
    cfg = plan.model
    for layer in range(cfg.num_layers):
        mlp = [n for g in plan.layer_groups(layer, "mlp") for n in g.members]
        assert sorted(mlp) == list(range(cfg.intermediate_size)), layer
        attn = [h for g in plan.layer_groups(layer, "attn") for h in g.members]
        assert sorted(attn) == list(range(cfg.num_kv_heads)), layer
    assert all(0 <= g.layer < cfg.num_layers for g in plan.groups)
    assert {g.layer for g in plan.groups} == set(range(cfg.num_layers))


def test_groups_well_formed(plan):
    names = set(plan.device_names)
    assert all(g.device in names for g in plan.groups)
    assert len({g.id for g in plan.groups}) == len(plan.groups)
    for g in plan.groups:
        assert g.id == f"L{g.layer}.{g.kind}.{g.index}"
        assert g.kind == "mlp" or g.critical
    # ordered by (layer, attention first, index)
    order = [(g.layer, g.kind != "attn", g.index) for g in plan.groups]
    assert order == sorted(order)
    # 5 MLP groups per layer were asked for, some of them relaxed (relaxed_share 0.3)
    for layer in range(plan.model.num_layers):
        assert [g.index for g in plan.layer_groups(layer, "mlp")] == list(range(5))
    assert any(not g.critical for g in plan.groups)
    # importance shares of each layer and kind sum to one
    for layer in range(plan.model.num_layers):
        for kind in ("attn", "mlp"):
            assert sum(g.importance for g in plan.layer_groups(layer, kind)) == pytest.approx(1.0, abs=1e-4)


def test_groups_on_covers_the_layer(plan):
    for layer in range(plan.model.num_layers):
        on = [g for dev in plan.device_names for g in plan.groups_on(dev, layer)]
        assert sorted(g.id for g in on) == sorted(g.id for g in plan.layer_groups(layer))


def test_groups_on_critical_before_relaxed(plan):
    for dev in plan.device_names:
        for layer in range(plan.model.num_layers):
            mine = plan.groups_on(dev, layer)
            assert all(g.device == dev and g.layer == layer for g in mine)
            keys = [(g.kind != "attn", not g.critical, g.index) for g in mine]
            assert keys == sorted(keys), (dev, layer)
            assert plan.groups_on(dev, layer, "mlp") == [g for g in mine if g.kind == "mlp"]


def test_groups_on_order_with_everything_on_one_device(plan):
    """All of layer 0 on one device: attention, then critical MLP groups by index, then relaxed by index."""
    dev = plan.device_names[1]
    moved = tuple(dataclasses.replace(g, device=dev) if g.layer == 0 else g for g in plan.groups)
    p = dataclasses.replace(plan, groups=moved, failover=())  # the failover moves the old placement's groups
    mlp = p.layer_groups(0, "mlp")
    crit = [g.id for g in mlp if g.critical]
    relaxed = [g.id for g in mlp if not g.critical]
    assert crit and relaxed, "the tiny plan should have both kinds in layer 0"
    attn = [g.id for g in p.layer_groups(0, "attn")]
    assert [g.id for g in p.groups_on(dev, 0)] == attn + crit + relaxed
    assert [g.id for g in p.groups_on(dev, 0, "mlp")] == crit + relaxed
    assert p.groups_on(plan.device_names[0], 0) == []


def test_device_lookup(plan):
    assert plan.device("dev3").loss == 0.05
    assert plan.shard_file("dev2") == "shard-dev2.safetensors"
    with pytest.raises(KeyError, match="no device named 'pi'.*dev0, dev1, dev2, dev3"):
        plan.device("pi")


# ---- damaged plan.json ----------------------------------------------------------------------------

def _load(data, source="somewhere/plan.json"):
    return Plan.from_json(json.dumps(data), source)


@pytest.mark.parametrize("version", [999, 0, "1", None])
def test_schema_version_refused(data, version):
    data["schema_version"] = version
    with pytest.raises(PlanError) as err:
        _load(data)
    msg = str(err.value)
    assert msg.startswith("somewhere/plan.json: ")
    assert "schema_version" in msg and "recompile" in msg
    assert f"reads version {SCHEMA_VERSION}" in msg


def test_schema_version_missing(data):
    del data["schema_version"]
    with pytest.raises(PlanError, match="schema_version None is not supported.*recompile"):
        _load(data)


def _edit(path, value=KeyError):
    """Set (or, with the default, delete) data at path."""
    def apply(data):
        *head, last = path
        for k in head:
            data = data[k]
        if value is KeyError:
            del data[last]
        else:
            data[last] = value
    return apply


DAMAGE = [
    ("missing-top", _edit(["coordinator"]), "somewhere/plan.json: missing field 'coordinator'"),
    ("missing-group-field", _edit(["groups", 3, "importance"]),
     "somewhere/plan.json: groups[3]: missing field 'importance'"),
    ("missing-model-field", _edit(["model", "hidden_size"]),
     "somewhere/plan.json: model: missing field 'hidden_size'"),
    ("missing-solver-field", _edit(["solver", "status"]), "somewhere/plan.json: solver: missing field 'status'"),
    ("unknown-top", _edit(["comment"], "hi"), "somewhere/plan.json: unknown field 'comment'"),
    ("unknown-device-field", _edit(["devices", 2, "colour"], "red"),
     "somewhere/plan.json: devices[2]: unknown field 'colour'"),
    ("int-as-string", _edit(["max_context"], "256"),
     "somewhere/plan.json: max_context: expected an integer, got '256'"),
    ("nested-int-as-string", _edit(["model", "num_layers"], "3"),
     "somewhere/plan.json: model: num_layers: expected an integer, got '3'"),
    ("group-layer-as-string", _edit(["groups", 0, "layer"], "0"),
     "somewhere/plan.json: groups[0]: layer: expected an integer, got '0'"),
    ("member-as-string", _edit(["groups", 1, "members", 0], "0"),
     "somewhere/plan.json: groups[1]: members[0]: expected an integer, got '0'"),
    ("int-as-float", _edit(["seed"], 0.5), "somewhere/plan.json: seed: expected an integer, got 0.5"),
    ("int-as-bool", _edit(["devices", 0, "memory_bytes"], True),
     "somewhere/plan.json: devices[0]: memory_bytes: expected an integer, got True"),
    ("float-as-string", _edit(["expected_lost_importance"], "0.1"),
     "somewhere/plan.json: expected_lost_importance: expected a number, got '0.1'"),
    ("str-as-int", _edit(["coordinator"], 0), "somewhere/plan.json: coordinator: expected str, got 0"),
    ("bool-as-int", _edit(["groups", 0, "critical"], 1),
     "somewhere/plan.json: groups[0]: critical: expected bool, got 1"),
    ("list-as-object", _edit(["devices"], {"dev0": {}}), "somewhere/plan.json: devices: expected a list"),
    ("object-as-list", _edit(["model"], []), "somewhere/plan.json: model: expected an object for ModelConfig"),
    ("coordinator-not-device", _edit(["coordinator"], "dev9"),
     "somewhere/plan.json: coordinator: 'dev9' is not a device"),
    ("group-on-unknown-device", _edit(["groups", 0, "device"], "dev9"),
     "somewhere/plan.json: group L0.attn.0: device 'dev9' is not in devices"),
    ("relaxed-attention", _edit(["groups", 0, "critical"], False), "must be critical"),
    ("shards-count", _edit(["shards"], ["shard-dev0.safetensors"]), "one shard file per device"),
    ("bad-address", _edit(["devices", 1, "address"], "nohost"), "devices[1]: device dev1: address 'nohost'"),
]


@pytest.mark.parametrize("damage, message", [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_plan(data, damage, message):
    damage(data)
    with pytest.raises(PlanError) as err:
        _load(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_undamaged_copy_loads(plan, data):
    """The damage cases fail because of their one edit."""
    assert _load(data) == plan


@pytest.mark.parametrize("text, message", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    ('{"schema_version": 1,', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"plan"', "expected a JSON object"),
])
def test_not_json(text, message):
    with pytest.raises(PlanError) as err:
        Plan.from_json(text, "x/plan.json")
    assert str(err.value).startswith("x/plan.json: ") and message in str(err.value)


def test_truncated_plan_file(plan_text):
    with pytest.raises(PlanError, match=r"^plan\.json: not valid JSON .* at line \d+\)$"):
        Plan.from_json(plan_text[: len(plan_text) // 2])


def test_load_plan_on_empty_dir(tmp_path):
    with pytest.raises(PlanError) as err:
        load_plan(tmp_path)
    assert str(tmp_path / PLAN_FILE) in str(err.value)
    assert "no plan here" in str(err.value)


def test_load_plan_names_the_file_on_bad_json(tmp_path):
    (tmp_path / PLAN_FILE).write_text("{")
    with pytest.raises(PlanError) as err:
        load_plan(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / PLAN_FILE}: not valid JSON")


def test_plan_error_is_a_value_error():
    assert issubclass(PlanError, ValueError)


# ---- shards reassemble to the model ---------------------------------------------------------------

def test_assemble_reproduces_the_model(plan, shards, tiny_vocab_dir):
    from halo_compile.load import load_model

    model = load_model(str(tiny_vocab_dir), progress=False)
    full = assemble(plan, shards)
    assert set(full) == set(model.weights)
    for name, t in model.weights.items():
        assert full[name].shape == t.shape, name
        assert torch.equal(full[name].float(), t.float()), name


def test_shards_hold_only_their_groups(plan, shards):
    """Devices without groups in a layer hold no tensors of it; only the coordinator holds norms and
    embeddings."""
    for dev in plan.device_names:
        keys = set(shards[dev])
        assert ("embed_tokens" in keys) == (dev == plan.coordinator)
        for layer in range(plan.model.num_layers):
            has_mlp = bool(plan.groups_on(dev, layer, "mlp"))
            assert (f"layers.{layer}.mlp.up_proj" in keys) == has_mlp
            if has_mlp:
                n = sum(len(g.members) for g in plan.groups_on(dev, layer, "mlp"))
                assert shards[dev][f"layers.{layer}.mlp.up_proj"].shape[0] == n


def _copy(shards):
    return {dev: dict(tensors) for dev, tensors in shards.items()}


def _holder(plan, shards, tensor):
    return next(dev for dev in plan.device_names if tensor in shards[dev])


@pytest.mark.parametrize("tensor", ["layers.1.mlp.up_proj", "layers.2.attn.k_proj", "layers.0.input_layernorm",
                                    "embed_tokens", "norm"])
def test_assemble_missing_tensor(plan, shards, tensor):
    broken = _copy(shards)
    dev = _holder(plan, broken, tensor)
    del broken[dev][tensor]
    with pytest.raises(PlanError) as err:
        assemble(plan, broken)
    assert str(err.value) == f"shard of {dev}: missing tensor {tensor}"


def test_assemble_row_held_twice(plan, shards):
    """A plan whose groups overlap (neuron 0 in two groups) reassembles to an error, not to a model."""
    layer0 = plan.layer_groups(0, "mlp")
    a = next(g for g in layer0 if 0 in g.members)
    b = next(g for g in layer0 if g is not a)
    m = max(b.members)
    b2 = dataclasses.replace(b, members=tuple(sorted((set(b.members) - {m}) | {0})))
    overlapping = dataclasses.replace(plan, groups=tuple(b2 if g.id == b.id else g for g in plan.groups))
    with pytest.raises(PlanError) as err:
        assemble(overlapping, _copy(shards))   # same row counts, so only the overlap is wrong
    assert str(err.value) == "model.layers.0.mlp.gate_proj.weight: row 0 is held more than once across the shards"


def test_assemble_row_missing(plan, shards):
    layer1 = plan.layer_groups(1, "mlp")
    g = max(layer1, key=lambda g: len(g.members))
    assert len(g.members) >= 2
    gone = g.members[-1]
    shrunk = dataclasses.replace(g, members=g.members[:-1])
    p = dataclasses.replace(plan, groups=tuple(shrunk if x.id == g.id else x for x in plan.groups))
    broken = _copy(shards)
    # drop the same neuron from the shard so the row counts agree with the damaged plan
    dev = g.device
    order = [n for grp in plan.groups_on(dev, 1, "mlp") for n in grp.members]
    keep = np.array([i for i, n in enumerate(order) if n != gone])
    broken[dev]["layers.1.mlp.gate_proj"] = broken[dev]["layers.1.mlp.gate_proj"][keep]
    broken[dev]["layers.1.mlp.up_proj"] = broken[dev]["layers.1.mlp.up_proj"][keep]
    broken[dev]["layers.1.mlp.down_proj"] = broken[dev]["layers.1.mlp.down_proj"][:, keep]
    with pytest.raises(PlanError) as err:
        assemble(p, broken)
    assert str(err.value) == f"model.layers.1.mlp.gate_proj.weight: row {gone} is missing across the shards"


def test_assemble_extra_row_in_a_shard(plan, shards):
    broken = _copy(shards)
    dev = _holder(plan, broken, "layers.0.mlp.up_proj")
    t = broken[dev]["layers.0.mlp.up_proj"]
    broken[dev]["layers.0.mlp.up_proj"] = np.concatenate([t, t[:1]])
    n = t.shape[0]
    with pytest.raises(PlanError) as err:
        assemble(plan, broken)
    assert str(err.value) == (f"shard of {dev}: layers.0.mlp.up_proj has shape ({n + 1}, {t.shape[1]}), "
                              f"plan says ({n}, {t.shape[1]})")


def test_assemble_does_not_modify_its_input(plan, shards):
    before = {dev: {k: v.copy() for k, v in t.items()} for dev, t in shards.items()}
    assemble(plan, shards)
    for dev, tensors in shards.items():
        assert tensors.keys() == before[dev].keys()
        assert all(np.array_equal(v, before[dev][k]) for k, v in tensors.items())


def test_load_shard_errors(plan_and_dir, tmp_path):
    plan, directory = plan_and_dir
    with pytest.raises(PlanError, match="shard of device dev1 is missing"):
        load_shard(tmp_path, plan, "dev1")
    (tmp_path / plan.shard_file("dev1")).write_bytes(b"\x00" * 7)
    with pytest.raises(PlanError) as err:
        load_shard(tmp_path, plan, "dev1")
    assert str(err.value).startswith(f"{tmp_path / 'shard-dev1.safetensors'}: shard of device dev1 is unreadable")


def test_damaged_plan_copy_is_independent(plan_text, data):
    """Sanity: the `data` fixture is a fresh copy, so damage in one test cannot leak into another."""
    assert json.loads(plan_text) == data and copy.deepcopy(data) is not data
