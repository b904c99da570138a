"""The network time of a pass's rounds, star, push or mixed: what `place.choose_rounds` records in
the plan (`Plan.rounds`, `Plan.star_rounds`) and `inspect` reports. Placement prices star rounds
(placecost.py); this module compares the kinds after it.

- A star round is a round trip through the coordinator (`round_network_ms`): the slowest holder's
  two hops, the busiest link or shared medium carrying every request and reply (`busiest_link_ms`:
  devices naming one `medium` take turns on the air), the coordinator's CPU for every datagram.
- A push round is one hop from every holder to every device: the slowest pair, the busiest link
  carrying each part to every device, the busiest device's CPU. A push pass hands the
  coordinator's residual to every device before each run of rounds that leave it (`handed_off`).
- A push pass may send a round's parts to the coordinator alone (a star round among push rounds).
  After a push round that is one hop to the coordinator (`gather_ms`); after a round the
  coordinator computed alone or another star round it opens with the star's request, a round trip
  (`core.push.requested_rounds`). The next push round starts with a handoff, as after a round the
  coordinator computed alone. `mixed_pass` picks each round's kind by dynamic programming: star
  rounds where pushing costs more than a hop saves (the last round before the coordinator computes
  alone, Wi-Fi airtime, many devices).

Example (four boards on 2 ms links: push every round but the last, whose sum only the coordinator
needs; on one slow Wi-Fi channel, where pushing every part to every board costs airtime, none):
    >>> from dataclasses import replace
    >>> from halo_runtime.core.plan import Device
    >>> from halo_compile.placecost import PlaceOptions
    >>> boards = [Device(f"b{i}", f"10.0.0.{i}:7700", 10**9, 1.0, latency_ms=1.0) for i in range(4)]
    >>> ms, star_rounds = mixed_pass([["b0", "b1", "b2", "b3"]] * 4, boards, "b0", {}, PlaceOptions())
    >>> star_rounds
    (3,)
    >>> slow = [replace(d, medium="wifi", bandwidth_mbps=20) for d in boards]
    >>> ms, star_rounds = mixed_pass([["b0", "b1", "b2", "b3"]] * 4, slow, "b0", {}, PlaceOptions())
    >>> star_rounds
    (0, 1, 2, 3)
"""
from __future__ import annotations

from dataclasses import replace

from halo_runtime.core.codec import datagrams
from halo_runtime.core.plan import Device, Plan
from halo_runtime.core.policy import DeliveryPolicy, pair_link

from .placecost import PlaceOptions


def network_ms(rounds: list[list[str]], devices: list[Device], coordinator: str, copies: dict[str, int],
               options: PlaceOptions) -> dict[str, float]:
    """Per token, the network time of a pass's `rounds` (in order, each: the devices holding a
    group of it, the coordinator included where it holds one) as star rounds and as push rounds
    (`core.push`): the sums of `round_network_ms`, plus, for push, the handoff of the coordinator's
    residual before every run of rounds that leave it (`handoff_ms`): at the pass's start (after
    the embedding) and after every round it computes alone (a layer whose attention stays on the
    coordinator costs push rounds that hop, as the star's request).

        >>> from halo_runtime.core.plan import Device
        >>> boards = [Device(f"b{i}", f"10.0.0.{i}:7700", 10**9, 1.0, latency_ms=1.0) for i in range(4)]
        >>> net = network_ms([["b0", "b1", "b2", "b3"]] * 60, boards, "b0", {}, PlaceOptions())
        >>> net["push"] < net["star"]                       # one hop a round saves more than its datagrams cost
        True
        >>> local = network_ms([["b0"], ["b0", "b1", "b2", "b3"]] * 30, boards, "b0", {}, PlaceOptions())
        >>> local["push"] > local["star"]                   # attention on the coordinator: a hop each way either way
        True
        >>> from dataclasses import replace
        >>> air = [replace(d, medium="wifi") for d in boards]   # one channel: every datagram takes its turn
        >>> shared = network_ms([["b0", "b1", "b2", "b3"]] * 60, air, "b0", {}, PlaceOptions())
        >>> shared["push"] > net["push"] and shared["push"] - net["push"] > shared["star"] - net["star"]
        True
    """
    costs = pass_network_ms(rounds, devices, coordinator, copies, options)
    return {"star": sum(s for s, _ in costs), "push": sum(p for _, p in costs)}


def handoff_ms(devices: list[Device], coordinator: str, copies: dict[str, int], options: PlaceOptions) -> float:
    """The coordinator's residual (fp32: twice a part's bytes) to every other device, priced as a
    star's requests: the slowest one's hop (and expected wait), the busiest link, the coordinator's
    CPU for every datagram."""
    return _one_way([(coordinator, d.name) for d in devices if d.name != coordinator], devices, copies,
                    replace(options, message_bytes=2 * options.message_bytes))


def pass_network_ms(rounds: list[list[str]], devices: list[Device], coordinator: str, copies: dict[str, int],
                    options: PlaceOptions) -> list[tuple[float, float]]:
    """(star, push) of each of `rounds` that leaves the coordinator (`round_network_ms`), push with
    the handoff of the coordinator's residual where one comes first (`handed_off`)."""
    handoff = handoff_ms(devices, coordinator, copies, options)
    return [(s, p + (handoff if first else 0.0))
            for held, first in handed_off(rounds, coordinator)
            for s, p in [round_network_ms(held, devices, coordinator, copies, options)]]


def mixed_pass(rounds: list[list[str]], devices: list[Device], coordinator: str, copies: dict[str, int],
               options: PlaceOptions) -> tuple[float, tuple[int, ...]]:
    """The least network time of a push pass over `rounds` in which any round leaving the
    coordinator may send its parts to the coordinator alone, and the indexes of those rounds
    among the rounds leaving it (`Plan.star_rounds`). The residual is either in every view (after
    a push round) or at the coordinator alone (at the pass's start, after a round it computed
    alone or a star round): from there a push round costs a handoff first and a star round is the
    star's round trip; from the views a star round is one hop (`gather_ms`). Dynamic programming
    over those two states, fewer star rounds on a tie."""
    handoff = handoff_ms(devices, coordinator, copies, options)
    at_views, at_coordinator = None, (0.0, ())  # (ms, star rounds so far) reaching each state
    for i, (held, first) in enumerate(handed_off(rounds, coordinator)):
        if first and at_views is not None:  # the coordinator computed alone: the views are behind
            at_coordinator, at_views = min(at_coordinator, at_views, key=_fewer), None
        star, push = round_network_ms(held, devices, coordinator, copies, options)
        # from the coordinator a star round opens with the star's request: its round trip
        pushed = [(at_coordinator[0] + handoff + push, at_coordinator[1])]
        starred = [(at_coordinator[0] + star, at_coordinator[1] + (i,))]
        if at_views is not None:
            pushed.append((at_views[0] + push, at_views[1]))
            starred.append((at_views[0] + gather_ms(held, devices, coordinator, copies, options), at_views[1] + (i,)))
        at_views, at_coordinator = min(pushed, key=_fewer), min(starred, key=_fewer)
    return min([at_coordinator] + ([at_views] if at_views else []), key=_fewer)


def _fewer(state: tuple[float, tuple]) -> tuple:
    """Less time first, then fewer star rounds, then the earlier ones (deterministic)."""
    return state[0], len(state[1]), state[1]


def handed_off(rounds: list[list[str]], coordinator: str) -> list[tuple[list[str], bool]]:
    """Each of `rounds` that leaves the coordinator, and whether a push pass hands every device the
    coordinator's residual before it: where it starts a run of such rounds (the first after the
    embedding, the others after a round the coordinator computed alone)."""
    out, alone = [], True  # a pass starts with the coordinator's embedding
    for held in rounds:
        remote = any(d != coordinator for d in held)
        if remote:
            out.append((held, alone))
        alone = not remote
    return out


def pass_rounds(plan: Plan) -> list[list[str]]:
    """Every round of a pass of `plan` in order (attention, MLP, per layer): the devices holding a group of it."""
    return [sorted({g.device for g in plan.layer_groups(layer, kind)})
            for layer in range(plan.model.num_layers) for kind in ("attn", "mlp")]


def plan_network_ms(plan: Plan) -> tuple[dict[str, float], tuple[int, ...]]:
    """The network time of a token of `plan` in star, push and mixed rounds (`network_ms`, parts
    on the fp16 wire, the plan's copies per link), and the star rounds of the mix (`mixed_pass`)."""
    copies = {d: plan.link_copies(d) for d in plan.device_names}
    options = PlaceOptions(message_bytes=2 * plan.model.hidden_size)
    rounds, devices = pass_rounds(plan), list(plan.devices)
    net = network_ms(rounds, devices, plan.coordinator, copies, options)
    mixed, star_rounds = mixed_pass(rounds, devices, plan.coordinator, copies, options)
    return {**net, "mixed": mixed}, star_rounds


def _lat(devices: list[Device], a: str, b: str) -> float:
    """One datagram from a to b crosses a's access link and b's (the coordinator's too, as
    `benchmarks.plr_sweep --delay-from-plan` builds the lab)."""
    return sum(d.latency_ms for d in devices if d.name in (a, b))


def _msg_ms(devices: list[Device], d: str, options: PlaceOptions) -> float:
    """One part's time on d's link."""
    return options.message_bytes * 8 / (next(x for x in devices if x.name == d).bandwidth_mbps * 1e3)


def busiest_link_ms(sends: list[tuple[str, str, int]], devices: list[Device], options: PlaceOptions) -> float:
    """The longest any one link or shared medium is busy carrying `sends` ((sender, receiver,
    copies) of one part each): on switched links, a device's uplink carries what it sends and its
    downlink what it receives; devices naming the same `medium` (one Wi-Fi channel) take turns on
    the air, where a datagram from one station to another goes up to the access point and down
    again: twice, when both are on that channel.

        >>> from halo_runtime.core.plan import Device
        >>> d = [Device(n, f"10.0.0.{i}:7700", 10**9, 1.0, bandwidth_mbps=8, medium=m)
        ...      for i, (n, m) in enumerate([("a", ""), ("b", "air"), ("c", "air")])]
        >>> o = PlaceOptions(message_bytes=1000)            # 1 ms a part at 8 Mbit/s
        >>> busiest_link_ms([("a", "b", 1), ("a", "c", 2)], d, o)   # the channel: 1 + 2 transmissions
        3.0
        >>> busiest_link_ms([("b", "c", 1)], d, o)          # up and down the same channel
        2.0
    """
    medium = {d.name: d.medium for d in devices}
    busy: dict[tuple[str, str], float] = {}
    for s, v, c in sends:
        for end, direction in ((s, "up"), (v, "down")):
            key = ("air", medium[end]) if medium[end] else (direction, end)
            busy[key] = busy.get(key, 0.0) + c * _msg_ms(devices, end, options)
    return max(busy.values(), default=0.0)


def round_network_ms(held: list[str], devices: list[Device], coordinator: str, copies: dict[str, int],
                     options: PlaceOptions) -> tuple[float, float]:
    """(star, push): the network time of one round whose groups `held` lists the devices of.
    `copies`: the plan's per link (between two boards: `core.policy.pair_link`, as the runtime
    sends). Star round: the slowest participant's round trip (2 latencies, the expected wait for a
    lost request or reply), the busiest link or medium carrying every request and reply
    (`busiest_link_ms`), and the coordinator's CPU for every datagram it seals and opens
    (`datagram_ms`). Push round: the slowest pair's one-way trip (and expected wait), the busiest
    link or medium carrying every device's part to every other, and the busiest device's CPU for
    what it sends and receives. So push saves a hop only where the coordinator's link is as slow as
    the boards': behind a wired coordinator a board-to-board datagram crosses two slow links, as a
    star's round trip does; and on a shared medium it pays N - 1 times the airtime of a star's
    replies. A part of several datagrams (a wide model's row) counts each of them, and goes to and
    from a lossy board as the runtime sends it (`_part_link`). Compute is left out: it is the same
    either way."""
    by_name = {d.name: d for d in devices}
    names = list(by_name)
    one = DeliveryPolicy(relaxed_retries=0)
    remote = [d for d in held if d != coordinator]
    if not remote:
        return 0.0, 0.0
    n = datagrams(options.message_bytes)  # of one part: a wide model's part takes several

    def pair(a: str, b: str) -> tuple[float, int]:
        return _part_link(pair_link(by_name[a].loss, by_name[b].loss, copies.get(a, 1), copies.get(b, 1)), n, one)

    # the star's link to d: its loss and copies as the plan chose them for d alone
    star_copies = {d: _part_link((by_name[d].loss, copies.get(d, 1)), n, one)[1] for d in remote}
    # a part of several datagrams: the policy counts them from the hidden size (fp16: 2 bytes a value)
    hidden = options.message_bytes // 2 if n > 1 else None
    miss = {d: one.miss_probability(by_name[d].loss, hidden, planned=copies.get(d, 1)) for d in remote}
    star = (max(2 * _lat(devices, coordinator, d) + miss[d] * options.rto_ms for d in remote)
            + busiest_link_ms([(a, b, star_copies[d]) for d in remote for a, b in ((coordinator, d), (d, coordinator))],
                              devices, options)
            + options.datagram_ms * n * sum(2 * star_copies[d] for d in remote))
    sends = [(s, v, pair(s, v)[1]) for s in held for v in names if v != s]
    handled = dict.fromkeys(names, 0)  # datagrams each device seals or opens
    for s, v, c in sends:
        handled[s] += c * n
        handled[v] += c * n
    push = (max(_lat(devices, s, v) + pair(s, v)[0] ** c * options.rto_ms for s, v, c in sends)
            + busiest_link_ms(sends, devices, options) + options.datagram_ms * max(handled.values()))
    return star, push


def _part_link(link: tuple[float, int], n: int, policy: DeliveryPolicy) -> tuple[float, int]:
    """(chance one copy of a part is lost, copies sent) of a part of `n` datagrams on a link of
    (loss per datagram, copies the plan chose): a copy is lost when any of its datagrams is, and
    the runtime sends a part of several datagrams `DeliveryPolicy.copies` times. One datagram: the
    link as it is."""
    loss, planned = link
    if n <= 1:
        return loss, planned
    return 1.0 - (1.0 - loss) ** n, policy.copies(loss, n, planned)


def gather_ms(held: list[str], devices: list[Device], coordinator: str, copies: dict[str, int],
              options: PlaceOptions) -> float:
    """A round of a push pass whose parts go to the coordinator alone (`Plan.star_rounds`), priced
    as a star's replies (`_one_way`). The handoff before the next round is `mixed_pass`'s."""
    return _one_way([(d, coordinator) for d in held if d != coordinator], devices, copies, options)


def _one_way(pairs: list[tuple[str, str]], devices: list[Device], copies: dict[str, int],
             options: PlaceOptions) -> float:
    """One message of `options.message_bytes` over each (sender, receiver) pair at once: the
    slowest pair's hop (and expected wait for a lost one), the busiest link or medium, and the
    CPU of whichever end handles most datagrams."""
    if not pairs:
        return 0.0
    by_name = {d.name: d for d in devices}
    n, one = datagrams(options.message_bytes), DeliveryPolicy(relaxed_retries=0)
    link = {(a, b): _part_link(pair_link(by_name[a].loss, by_name[b].loss, copies.get(a, 1), copies.get(b, 1)), n, one)
            for a, b in pairs}
    sends = [(a, b, link[a, b][1]) for a, b in pairs]
    handled: dict[str, int] = {}
    for a, b, c in sends:
        for end in (a, b):
            handled[end] = handled.get(end, 0) + c * n
    return (max(_lat(devices, a, b) + link[a, b][0] ** link[a, b][1] * options.rto_ms for a, b in pairs)
            + busiest_link_ms(sends, devices, options) + options.datagram_ms * max(handled.values()))
