"""The hub's placement logic: constraints, scores, reservations and the reasons for no fit."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_hub.placement import (
    NoPlacement,
    Offer,
    Placement,
    Placer,
    Reservation,
    Resources,
    bench_placements,
)

NOW = 1_000.0
_ids = itertools.count()


def offer(agent_id: str, site: str = "berlin", *, cpus: float = 4.0, mem_mb: int = 4096,
          disk_mb: int = 10_000, labels: dict[str, str] | None = None, status: str = "online",
          expires_at: float = NOW + 30, offer_id: str | None = None) -> Offer:
    return Offer(agent_id, site, labels or {}, cpus, mem_mb, disk_mb, expires_at, status,
                 offer_id if offer_id is not None else f"{agent_id}:1")


def spec(name: str = "web", *, cpus: float = 1.0, mem_mb: int = 128, disk_mb: int = 0,
         **constraints: Any) -> dict[str, Any]:
    return {"id": f"t{next(_ids)}", "name": name, "command": ["true"],
            "resources": {"cpus": cpus, "mem_mb": mem_mb, "disk_mb": disk_mb},
            "constraints": constraints}


def placer(*offers: Offer) -> Placer:
    p = Placer()
    for o in offers:
        p.update_offer(o)
    return p


def placed(result: Placement | NoPlacement) -> Placement:
    assert isinstance(result, Placement), result
    return result


def refused(result: Placement | NoPlacement) -> str:
    assert isinstance(result, NoPlacement), result
    return result.reason


# ------------------------------------------------------------------ constraints
def test_site_constraint_picks_an_agent_in_that_site() -> None:
    p = placer(offer("a1", "berlin", cpus=8), offer("a2", "paris"))
    got = placed(p.place(spec(site="paris"), now=NOW))
    assert (got.agent_id, got.site, got.offer_id) == ("a2", "paris", "a2:1")


def test_site_constraint_without_agents_says_so() -> None:
    p = placer(offer("a1", "berlin"))
    assert refused(p.place(spec(site="oslo"), now=NOW)) == (
        "no agent in site oslo has made an offer")


def test_agent_constraint_by_id() -> None:
    p = placer(offer("a1", cpus=8), offer("a2"))
    assert placed(p.place(spec(agent="a2"), now=NOW)).agent_id == "a2"
    assert "agent a9 has made no offer" in refused(p.place(spec(agent="a9"), now=NOW))
    assert refused(p.place(spec(agent="a1", site="paris"), now=NOW)) == (
        "agent a1 is in site berlin, not paris")


def test_label_eq() -> None:
    p = placer(offer("a1", labels={"zone": "office"}, cpus=8),
               offer("a2", labels={"zone": "store"}))
    sel = [{"key": "zone", "op": "eq", "values": ["store"]}]
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a2"
    sel = [{"key": "zone", "op": "eq", "values": ["plant"]}]
    assert refused(p.place(spec(labels=sel), now=NOW)) == "no online agent has label zone=plant"


def test_label_in() -> None:
    p = placer(offer("a1", labels={"zone": "office"}, cpus=8),
               offer("a2", labels={"zone": "store"}, cpus=2),
               offer("a3", labels={"zone": "plant"}, cpus=4))
    sel = [{"key": "zone", "op": "in", "values": ["store", "plant"]}]
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a3"
    sel = [{"key": "zone", "op": "in", "values": ["lab", "depot"]}]
    assert refused(p.place(spec(labels=sel), now=NOW)) == (
        "no online agent has label zone in (lab, depot)")


def test_label_not_in_passes_agents_without_the_key() -> None:
    p = placer(offer("a1", labels={"arch": "arm64"}, cpus=8),
               offer("a2", labels={"arch": "amd64"}, cpus=2),
               offer("a3", cpus=4))
    sel = [{"key": "arch", "op": "not_in", "values": ["arm64"]}]
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a3"
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a3"  # 3 left vs a2's 2
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a2"  # tie 2:2, smaller id
    only_arm = placer(offer("a1", labels={"arch": "arm64"}))
    assert refused(only_arm.place(spec(labels=sel), now=NOW)) == (
        "every online agent has label arch in (arm64)")
    assert refused(only_arm.place(spec(labels=sel, agent="a1"), now=NOW)) == (
        "agent a1 has label arch=arm64, which the task excludes")


def test_label_exists() -> None:
    p = placer(offer("a1", cpus=8), offer("a2", labels={"gpu": "t4"}))
    sel = [{"key": "gpu", "op": "exists"}]
    assert placed(p.place(spec(labels=sel), now=NOW)).agent_id == "a2"
    sel = [{"key": "tpu", "op": "exists"}]
    assert refused(p.place(spec(labels=sel), now=NOW)) == "no online agent has label tpu"


def test_labels_combine_and_the_reason_names_the_one_that_failed() -> None:
    p = placer(offer("a1", labels={"zone": "store"}), offer("a2", labels={"gpu": "t4"}))
    sel = [{"key": "zone", "op": "eq", "values": ["store"]}, {"key": "gpu", "op": "exists"}]
    assert refused(p.place(spec(labels=sel, site="berlin"), now=NOW)) == (
        "no online agent in site berlin has label gpu together with label zone=store")


def test_unique_per_agent() -> None:
    p = placer(offer("a1", cpus=8), offer("a2"), offer("b1", "paris"))
    existing = [("a1", "berlin")]
    got = placed(p.place(spec(unique="agent", site="berlin"), now=NOW, existing=existing))
    assert got.agent_id == "a2"
    existing.append(("a2", "berlin"))
    assert refused(p.place(spec(unique="agent", site="berlin"), now=NOW, existing=existing)) == (
        "every online agent in site berlin already runs an instance of service web "
        "(unique per agent)")
    assert refused(p.place(spec(unique="agent", agent="a1"), now=NOW, existing=existing)) == (
        "agent a1 already runs an instance of service web (unique per agent)")


def test_unique_per_site() -> None:
    p = placer(offer("a1", "berlin", cpus=8), offer("a2", "berlin"), offer("b1", "paris"))
    got = placed(p.place(spec(unique="site"), now=NOW, existing=[("a2", "berlin")]))
    assert (got.agent_id, got.site) == ("b1", "paris")
    existing = [("a2", "berlin"), ("b1", "paris")]
    assert refused(p.place(spec(unique="site"), now=NOW, existing=existing)) == (
        "every site with a matching online agent already runs an instance of service web "
        "(unique per site: berlin, paris)")
    assert refused(p.place(spec(unique="site", site="paris"), now=NOW, existing=existing)) == (
        "site paris already runs an instance of service web (unique per site)")


# ---------------------------------------------------------------------- scores
def test_spread_goes_to_the_site_with_fewest_instances_then_most_headroom() -> None:
    p = placer(offer("a1", "berlin", cpus=16), offer("b1", "paris", cpus=2),
               offer("b2", "paris", cpus=4))
    # berlin already runs one: paris wins despite berlin's bigger agent; b2 has more room
    got = placed(p.place(spec(), now=NOW, existing=[("a1", "berlin")]))
    assert (got.agent_id, got.site) == ("b2", "paris")


def test_spread_alternates_sites_through_reservations() -> None:
    p = placer(offer("a1", "berlin", cpus=8), offer("a2", "berlin", cpus=8),
               offer("b1", "paris", cpus=8))
    sites = [placed(p.place(spec(), now=NOW)).site for _ in range(4)]
    assert sites == ["berlin", "paris", "berlin", "paris"]


def test_spread_without_history_takes_the_agent_with_most_headroom() -> None:
    p = placer(offer("a1", "berlin", cpus=2), offer("b1", "paris", cpus=8))
    assert placed(p.place(spec(), now=NOW)).agent_id == "b1"


def test_headroom_is_the_scarcest_resource_for_this_task() -> None:
    # a1 has more cpus, but for a memory-heavy task a2 can take more copies
    p = placer(offer("a1", cpus=16, mem_mb=1024), offer("a2", cpus=4, mem_mb=8192))
    assert placed(p.place(spec(cpus=0.5, mem_mb=512), now=NOW)).agent_id == "a2"
    assert placed(p.place(spec(cpus=4, mem_mb=64), now=NOW)).agent_id == "a1"


def test_binpack_takes_the_fullest_agent_that_fits() -> None:
    p = placer(offer("a1", "berlin", cpus=8), offer("b1", "paris", cpus=2),
               offer("b2", "paris", cpus=1))
    assert placed(p.place(spec(cpus=1.5, strategy="binpack"), now=NOW)).agent_id == "b1"
    assert placed(p.place(spec(cpus=1, strategy="binpack"), now=NOW)).agent_id == "b2"
    assert placed(p.place(spec(cpus=1, strategy="binpack"), now=NOW)).agent_id == "a1"


def test_ties_go_to_the_smallest_agent_id_whatever_the_insertion_order() -> None:
    names = ["c3", "a1", "b2", "a10"]
    for order in (names, list(reversed(names))):
        for strategy in ("spread", "binpack"):
            p = placer(*(offer(n, "berlin" if n < "b" else "paris") for n in order))
            assert placed(p.place(spec(strategy=strategy), now=NOW)).agent_id == "a1"


# ---------------------------------------------------------------- reservations
def test_reservations_reduce_free_capacity() -> None:
    p = placer(offer("a1", cpus=2, mem_mb=1024))
    first = spec(cpus=1.5, mem_mb=256)
    assert placed(p.place(first, now=NOW)).agent_id == "a1"
    assert p.free("a1") == Resources(0.5, 768, 10_000)
    assert p.reservations() == [Reservation(first["id"], "a1", 1.5, 256, 0, False)]
    assert refused(p.place(spec(cpus=1.5), now=NOW)) == (
        "no agent has 1.5 cpus free (best: 0.5 cpus on a1, after 1.5 cpus reserved)")


def test_release_returns_the_reservation() -> None:
    p = placer(offer("a1", cpus=2))
    task = spec(cpus=2)
    placed(p.place(task, now=NOW))
    assert isinstance(p.place(spec(cpus=2), now=NOW), NoPlacement)
    assert p.release(task["id"]) is True
    assert p.release(task["id"]) is False
    assert p.free("a1") == Resources(2.0, 4096, 10_000)
    placed(p.place(spec(cpus=2), now=NOW))


def test_placing_a_reserved_task_again_moves_its_reservation() -> None:
    p = placer(offer("a1", cpus=2), offer("a2", cpus=2))
    task = spec(cpus=2)
    assert placed(p.place(task, now=NOW)).agent_id == "a1"
    assert placed(p.place(task, now=NOW, exclude={"a1"})).agent_id == "a2"
    assert [r.agent_id for r in p.reservations()] == ["a2"]
    assert p.free("a1") == Resources(2.0, 4096, 10_000)


def test_task_id_comes_from_the_argument_or_the_spec() -> None:
    p = placer(offer("a1"))
    body = spec()
    del body["id"]
    placed(p.place(body, now=NOW, task_id="x1"))
    assert [r.task_id for r in p.reservations("a1")] == ["x1"]
    with pytest.raises(ValueError, match="task_id"):
        p.place(body, now=NOW)


def test_a_newer_offer_drops_confirmed_reservations_and_keeps_unconfirmed() -> None:
    p = placer(offer("a1", cpus=4))
    started, in_flight = spec(cpus=1), spec(cpus=1)
    placed(p.place(started, now=NOW))
    placed(p.place(in_flight, now=NOW))
    assert p.confirm(started["id"]) is True
    assert p.confirm("nope") is False
    assert p.free("a1") == Resources(2.0, 3840, 10_000)
    # The edge started `started`, so its next offer already excludes it.
    p.update_offer(offer("a1", cpus=3, mem_mb=3968, offer_id="a1:2"))
    assert [r.task_id for r in p.reservations("a1")] == [in_flight["id"]]
    assert p.free("a1") == Resources(2.0, 3840, 10_000)
    assert p.release(started["id"]) is False  # already accounted for by the offer
    # Confirmed after that offer: kept until the next one.
    p.confirm(in_flight["id"])
    assert placed(p.place(spec(cpus=2), now=NOW)).offer_id == "a1:2"
    p.update_offer(offer("a1", cpus=0, mem_mb=3712, offer_id="a1:3"))
    assert p.free("a1") is not None and p.free("a1").cpus == -2.0  # only the new launch left
    assert [r.confirmed for r in p.reservations("a1")] == [False]


def test_a_shrunk_offer_takes_nothing_until_reservations_go() -> None:
    p = placer(offer("a1", cpus=4))
    task = spec(cpus=3)
    placed(p.place(task, now=NOW))
    p.update_offer(offer("a1", cpus=2))
    assert p.free("a1") == Resources(-1.0, 3968, 10_000)
    assert refused(p.place(spec(cpus=0.5), now=NOW)) == (
        "no agent has 0.5 cpus free (best: -1 cpus on a1, after 3 cpus reserved)")
    p.release(task["id"])
    placed(p.place(spec(cpus=0.5), now=NOW))


def test_an_agent_moving_site_carries_its_reservations() -> None:
    p = placer(offer("a1", "berlin", cpus=8), offer("b1", "paris", cpus=8))
    placed(p.place(spec(site="berlin"), now=NOW))
    p.update_offer(offer("a1", "paris", cpus=8))
    assert p.place(spec(site="berlin"), now=NOW) == NoPlacement(
        "no agent in site berlin has made an offer")
    # a1 still holds its reservation there, so b1 has more room
    assert placed(p.place(spec(site="paris"), now=NOW)).agent_id == "b1"


def test_remove_forgets_the_agent_and_its_reservations() -> None:
    p = placer(offer("a1"), offer("a2"))
    task = spec()
    assert placed(p.place(task, now=NOW)).agent_id == "a1"
    assert p.remove("a1") is True
    assert p.remove("a1") is False
    assert p.release(task["id"]) is False
    assert len(p) == 1 and [o.agent_id for o in p.offers()] == ["a2"]
    assert placed(p.place(spec(), now=NOW)).agent_id == "a2"


# --------------------------------------------------------- eligibility, reasons
def test_expired_offers_are_not_used() -> None:
    p = placer(offer("a1", cpus=8, expires_at=NOW - 1), offer("a2", expires_at=NOW + 5))
    assert placed(p.place(spec(), now=NOW)).agent_id == "a2"
    assert refused(p.place(spec(), now=NOW + 10)) == (
        "every online agent has an expired offer (the newest expired 5s ago)")
    assert refused(p.place(spec(agent="a1"), now=NOW)) == "agent a1's offer expired 1s ago"


@pytest.mark.parametrize("status", ["draining", "disconnected", "unreachable"])
def test_only_online_agents_get_tasks(status: str) -> None:
    p = placer(offer("a1", cpus=8, status=status), offer("a2"))
    assert placed(p.place(spec(), now=NOW)).agent_id == "a2"
    assert refused(p.place(spec(agent="a1"), now=NOW)) == f"agent a1 is {status}, not online"


def test_status_changes_without_an_offer() -> None:
    p = placer(offer("a1"), offer("a2", status="draining"), offer("a3", status="unreachable"))
    assert p.set_status("a1", "disconnected") is True
    assert p.set_status("zz", "online") is False
    assert [o.status for o in p.offers()] == ["disconnected", "draining", "unreachable"]
    assert refused(p.place(spec(), now=NOW)) == (
        "no online agent (1 disconnected, 1 draining, 1 unreachable)")
    p.set_status("a3", "online")
    assert placed(p.place(spec(), now=NOW)).agent_id == "a3"


def test_no_offers_at_all() -> None:
    assert refused(Placer().place(spec(), now=NOW)) == "no agent has made an offer yet"


def test_declining_agents_are_excluded() -> None:
    p = placer(offer("a1", cpus=8), offer("a2"))
    assert placed(p.place(spec(), now=NOW, exclude={"a1"})).agent_id == "a2"
    assert refused(p.place(spec(), now=NOW, exclude={"a1", "a2"})) == (
        "every agent declined this task (a1, a2)")
    assert refused(p.place(spec(agent="a1"), now=NOW, exclude={"a1"})) == (
        "agent a1 declined this task")


def test_resource_reasons_name_the_short_resource_and_the_best_agent() -> None:
    p = placer(offer("a1", "berlin", cpus=1.5, mem_mb=512, disk_mb=100),
               offer("a2", "berlin", cpus=1, mem_mb=2048, disk_mb=50),
               offer("a3", "berlin", cpus=64, status="draining"))
    assert refused(p.place(spec(cpus=2, site="berlin"), now=NOW)) == (
        "no agent in site berlin has 2 cpus free (best: 1.5 cpus on a1; "
        "1 more not online or with an expired offer)")
    assert refused(p.place(spec(cpus=1, mem_mb=4096), now=NOW)) == (
        "no agent has 4096 MB memory free (best: 2048 MB memory on a2; "
        "1 more not online or with an expired offer)")
    assert refused(p.place(spec(cpus=1, disk_mb=200, agent="a1"), now=NOW)) == (
        "agent a1 has 100 MB disk free; the task needs 200 MB disk")
    # each resource exists somewhere, never together
    assert refused(p.place(spec(cpus=1.5, mem_mb=1024, site="berlin"), now=NOW)) == (
        "no agent in site berlin has 1.5 cpus, 1024 MB memory and 0 MB disk free at once "
        "(closest: a2 with 1 cpu, 2048 MB memory and 50 MB disk; "
        "1 more not online or with an expired offer)")


def test_offer_from_body() -> None:
    body = {"id": "a1:7", "agent_id": "a1", "site": "berlin", "labels": {"zone": "store"},
            "cpus": 1.5, "mem_mb": 512, "disk_mb": 10, "expires_at": NOW + 30}
    assert Offer.from_body(body, status="draining") == Offer(
        "a1", "berlin", {"zone": "store"}, 1.5, 512, 10, NOW + 30, "draining", "a1:7")


# ------------------------------------------------------------------ properties
SITES = ["s0", "s1", "s2"]
AGENTS = [f"a{i}" for i in range(6)]
_MICRO = 1_000_000


def _micro(x: float) -> int:
    return round(x * _MICRO)


offers_st = st.builds(
    lambda aid, site, c, m, labels, status: Offer(aid, site, labels, c / 4, m, 100, NOW + 30,
                                                  status, f"{aid}:x"),
    st.sampled_from(AGENTS), st.sampled_from(SITES), st.integers(0, 16),
    st.integers(0, 4096), st.dictionaries(st.sampled_from(["zone", "arch"]),
                                          st.sampled_from(["x", "y"]), max_size=2),
    st.sampled_from(["online", "online", "online", "draining"]))

selector_st = st.builds(
    lambda key, op, values: {"key": key, "op": op, "values": values},
    st.sampled_from(["zone", "arch"]), st.sampled_from(["eq", "in", "not_in", "exists"]),
    st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2, unique=True))

spec_st = st.builds(
    lambda c, m, d, site, agent, labels, unique, strategy, name: {
        "name": name, "resources": {"cpus": c / 4, "mem_mb": m, "disk_mb": d},
        "constraints": {"site": site, "agent": agent, "labels": labels, "unique": unique,
                        "strategy": strategy}},
    st.integers(1, 8), st.integers(1, 2048), st.integers(0, 50),
    st.none() | st.sampled_from(SITES), st.none() | st.none() | st.sampled_from(AGENTS),
    st.lists(selector_st, max_size=2), st.sampled_from([None, None, "agent", "site"]),
    st.sampled_from(["spread", "binpack"]), st.sampled_from(["web", "db"]))

op_st = st.one_of(
    st.tuples(st.just("offer"), offers_st),
    st.tuples(st.just("place"), spec_st, st.lists(
        st.tuples(st.sampled_from(AGENTS), st.sampled_from(SITES)), max_size=3)),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("confirm"), st.integers(0, 30)),
    st.tuples(st.just("status"), st.sampled_from(AGENTS),
              st.sampled_from(["online", "draining"])),
    st.tuples(st.just("remove"), st.sampled_from(AGENTS)),
)


def _reference(p: Placer, spec: dict[str, Any], existing: list[tuple[str, str]]) -> str | None:
    """The documented rule, by brute force over the public state: the agent id, or None."""
    res, con = spec["resources"], spec["constraints"]
    c, m, d = max(1, _micro(res["cpus"])), res["mem_mb"], res["disk_mb"]
    reserved_in_site: dict[str, int] = {}
    offers = {o.agent_id: o for o in p.offers()}
    for r in p.reservations():
        site = offers[r.agent_id].site
        reserved_in_site[site] = reserved_in_site.get(site, 0) + 1
    eligible = []
    for o in offers.values():
        free = p.free(o.agent_id)
        assert free is not None
        fc = _micro(free.cpus)
        labels_ok = True
        for sel in con["labels"]:
            value = o.labels.get(sel["key"])
            if sel["op"] == "exists":
                labels_ok &= value is not None
            elif sel["op"] == "not_in":
                labels_ok &= value not in sel["values"]
            else:
                labels_ok &= value in sel["values"]
        if (o.status == "online" and o.expires_at > NOW and labels_ok
                and con["site"] in (None, o.site) and con["agent"] in (None, o.agent_id)
                and not (con["unique"] == "agent" and o.agent_id in {a for a, _ in existing})
                and not (con["unique"] == "site" and o.site in {s for _, s in existing})
                and fc >= c and free.mem_mb >= m and free.disk_mb >= d):
            headroom = min([fc / c, free.mem_mb / m] + ([free.disk_mb / d] if d else []))
            eligible.append((o, headroom))
    if not eligible:
        return None
    if con["strategy"] == "binpack":
        return min(eligible, key=lambda e: (e[1], e[0].agent_id))[0].agent_id
    count = {s: sum(1 for _, x in existing if x == s) for s in SITES}
    site_key = {o.site: (count[o.site], reserved_in_site.get(o.site, 0)) for o, _ in eligible}
    top = min(site_key.values())
    return min((e for e in eligible if site_key[e[0].site] == top),
               key=lambda e: (-e[1], e[0].agent_id))[0].agent_id


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_placement_matches_the_rule_and_never_overcommits(ops: list[tuple[Any, ...]]) -> None:
    p = Placer()
    shrunk: set[str] = set()  # agents whose offer may have dropped below their reservations
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "offer":
            p.update_offer(op[1])
            shrunk.add(op[1].agent_id)
        elif kind == "place":
            body = dict(op[1], id=f"t{n}")
            expected = _reference(p, body, op[2])
            result = p.place(body, now=NOW, existing=op[2])
            if expected is None:
                assert isinstance(result, NoPlacement) and result.reason
            else:
                assert isinstance(result, Placement) and result.agent_id == expected
                # the reservation just made always fits inside the offer
                _assert_within_offer(p, result.agent_id)
        elif kind == "release":
            p.release(f"t{op[1]}")
        elif kind == "confirm":
            p.confirm(f"t{op[1]}")
        elif kind == "status":
            p.set_status(op[1], op[2])
        else:
            p.remove(op[1])
            shrunk.discard(op[1])
        for o in p.offers():
            if o.agent_id not in shrunk:
                _assert_within_offer(p, o.agent_id)


@settings(max_examples=200, deadline=None)
@given(st.lists(offers_st, min_size=1, max_size=6, unique_by=lambda o: o.agent_id),
       st.lists(st.tuples(spec_st, st.booleans()), max_size=30))
def test_reservations_never_exceed_an_offer(offers: list[Offer],
                                            tasks: list[tuple[dict[str, Any], bool]]) -> None:
    p = placer(*offers)
    for n, (body, release_it) in enumerate(tasks):
        p.place(dict(body, id=f"t{n}"), now=NOW)
        if release_it and n % 3 == 0:
            p.release(f"t{n // 2}")
        for o in offers:
            _assert_within_offer(p, o.agent_id)


def _assert_within_offer(p: Placer, agent_id: str) -> None:
    (o,) = [o for o in p.offers() if o.agent_id == agent_id]
    rs = p.reservations(agent_id)
    assert sum(_micro(r.cpus) for r in rs) <= _micro(o.cpus)
    assert sum(r.mem_mb for r in rs) <= o.mem_mb
    assert sum(r.disk_mb for r in rs) <= o.disk_mb


# ------------------------------------------------------------------- benchmark
def test_bench_placements_runs() -> None:
    assert bench_placements(200, 1000) > 0
