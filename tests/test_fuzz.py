"""Property and fuzz tests (hypothesis): datagram authentication, reassembly and the replay window;
request and tensor decoding; plan and profile parsing. Malformed input is refused with the module's
own error type, never another exception. About 7,000 examples; well under a minute here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import cluster_yaml
from halo_runtime.core.codec import HEADER_SIZE, MAX_DATAGRAM, TAG_LEN, WireError, decode_request, decode_tensor
from halo_runtime.core.plan import Plan, PlanError
from halo_runtime.net.auth import Authenticator, ReplayGuard
from halo_runtime.net.wire import Message, Reassembler, check_datagram, encode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEY = Authenticator(b"\x07" * 32)

# ---- wire --------------------------------------------------------------------------------------

messages = st.builds(Message, kind=st.integers(1, 5), session=st.integers(0, 2 ** 32 - 1),
                     step=st.integers(0, 2 ** 32 - 1), layer=st.integers(0, 2 ** 16 - 1),
                     sender=st.integers(0, 50), payload=st.binary(max_size=6000))


@fast(400)
@given(st.lists(messages, min_size=1, max_size=4, unique_by=lambda m: (m.kind, m.session, m.step, m.layer, m.sender)),
       st.integers(HEADER_SIZE + TAG_LEN + 1, MAX_DATAGRAM), st.randoms(use_true_random=False))
def test_any_order_with_repeats_delivers_each_message_once(msgs, size, rnd):
    sent = [d for m in msgs for d in encode(m, size, auth=KEY)]
    resealed = [d for m in msgs for d in encode(m, size, auth=KEY)]  # the same message sealed again
    feed = sent + rnd.sample(sent, len(sent) // 2) + resealed
    rnd.shuffle(feed)
    r = Reassembler(auth=KEY, max_partials=64)
    got = [m for m in map(r.feed, feed) if m is not None]
    key = lambda m: (m.kind, m.session, m.step, m.layer, m.sender, m.payload)  # noqa: E731
    # each message arrives once per sealing at most; never twice per copy
    assert {key(m) for m in got} == {key(m) for m in msgs}
    assert len(got) == len(msgs)
    c = r.counters
    # a repeat of a chunk held or delivered is dropped unopened, one of anything else by the replay guard
    assert c.datagrams == len(feed) and c.replayed + c.duplicates >= len(sent) // 2
    assert c.forged == c.malformed == c.bad_length == 0


@fast(1500)
@given(st.sampled_from([d for n in (0, 40, 2000) for d in encode(Message(3, 9, 2, 1, 4, bytes(n)), auth=KEY)]),
       st.data())
def test_any_bit_flip_is_refused(datagram, data):
    bit = data.draw(st.integers(0, 8 * len(datagram) - 1))
    d = bytearray(datagram)
    d[bit // 8] ^= 1 << (bit % 8)
    header, reason = check_datagram(bytes(d), auth=KEY)
    assert header is None and reason in ("forged", "malformed", "bad_length")
    assert check_datagram(datagram, auth=KEY)[0] is not None


@fast(1500)
@given(st.binary(min_size=HEADER_SIZE + TAG_LEN, max_size=1500))
def test_keyed_random_datagrams_never_decode_or_raise(data):
    r = Reassembler(auth=KEY)
    assert r.feed(b"HL\x02" + data[3:]) is None
    c = r.counters
    assert c.forged + c.malformed + c.bad_length == 1


@fast(1000)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), max_size=200), st.integers(1, 64))
def test_replay_window_matches_a_model(events, window):
    g = ReplayGuard(window=window)
    seen: dict[int, set] = {}
    top: dict[int, int] = {}
    for sender, seq in events:
        s = seen.setdefault(sender, set())
        expect = seq not in s and (sender not in top or seq > top[sender] - window)
        assert g.accept(sender, seq) == expect, (sender, seq)
        if expect:
            s.add(seq)
            top[sender] = max(top.get(sender, seq), seq)


@fast(1000)
@given(st.binary(max_size=3000), st.sampled_from([None, 64]))
def test_request_and_tensor_decoding_raise_only_wire_errors(payload, width):
    for fn in (lambda: decode_request(payload, width or 64), lambda: decode_tensor(payload, None, width)):
        try:
            fn()
        except WireError:
            pass


# ---- plan and profile parsing ------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) |
                           st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):  # the first few of long lists (groups) are enough
            yield from _paths(v, prefix + (i,))


def _mutate(data, doc, values, actions) -> None:
    """Replace, delete, or add a sibling next to, one value at a random path of `doc` (in place)."""
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(actions))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(values)
    else:
        parent[path[-1]] = data.draw(values)


@pytest.fixture(scope="module")
def plan_text(tiny_plan):
    return (Path(tiny_plan[1]) / "plan.json").read_text()


@fast(500)  # each example parses a whole plan or profile
@given(st.data())
def test_mutated_plans_load_or_raise_plan_error(plan_text, data):
    doc = json.loads(plan_text)
    _mutate(data, doc, json_values, ("replace", "delete", "add"))
    try:
        Plan.from_json(json.dumps(doc), "fuzz/plan.json")
    except PlanError as e:
        assert str(e).startswith("fuzz/plan.json"), e


@fast(300)
@given(st.binary(max_size=400))
def test_garbage_plan_text_raises_plan_error(raw):
    try:
        Plan.from_json(raw.decode("utf-8", "replace"), "fuzz/plan.json")
    except PlanError:
        pass


PROFILE = yaml.safe_load(cluster_yaml(3, lossy=1))
yaml_values = st.none() | st.booleans() | st.integers(-10 ** 6, 10 ** 6) | st.floats() | st.text(max_size=10) | \
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)


@fast(500)  # each example parses a whole plan or profile
@given(st.data())
def test_mutated_profiles_load_or_raise_profile_error(data):
    from halo_compile.cluster import ProfileError, parse_profile

    doc = json.loads(json.dumps(PROFILE))
    _mutate(data, doc, yaml_values, ("replace", "delete"))
    try:
        parse_profile(yaml.safe_dump(doc), "fuzz.yaml")
    except ProfileError as e:
        assert str(e).startswith("fuzz.yaml"), e


@fast(500)
@given(st.text(max_size=300))
def test_random_profile_text_raises_profile_error(text):
    from halo_compile.cluster import ProfileError, parse_profile

    try:
        parse_profile(text, "fuzz.yaml")
    except ProfileError:
        pass

