"""`vpnctl rotate` over many keys, the planning parts: which keys take each step together, how
an abort walks them back, what in a deploy plan is not part of a rotation (and so refused),
which keys a deploy failed, and how a held key is kept out of a later step's deploy."""

from __future__ import annotations

from typing import Any

import pytest

from vpnctl.commands.rotate import deploy_failures
from vpnctl.deploy.common import HostOutcome, HostPlan
from vpnctl.deploy.plan import hold_links, skip_links_of_failed_ends
from vpnctl.inventory import UserError
from vpnctl.rotation import ACCEPT, RETIRE, SWITCH, abort_batches, step_batches, unrelated_changes


def test_fresh_keys_take_every_step_together() -> None:
    assert step_batches({"l1": None, "l2": None, "l3": None}) == [
        (ACCEPT, ["l1", "l2", "l3"]),
        (SWITCH, ["l1", "l2", "l3"]),
        (RETIRE, ["l1", "l2", "l3"]),
    ]


def test_a_resumed_key_joins_at_its_recorded_step_and_repeats_it() -> None:
    # l2 stopped at switch last time: it runs switch again (harmless) with the others
    assert step_batches({"l1": None, "l2": SWITCH, "l3": RETIRE}) == [
        (ACCEPT, ["l1"]),
        (SWITCH, ["l1", "l2"]),
        (RETIRE, ["l1", "l2", "l3"]),
    ]
    assert step_batches({}) == []
    with pytest.raises(UserError, match="unknown rotation phase 'bogus'"):
        step_batches({"l1": "bogus"})


def test_abort_takes_the_clients_back_first_then_every_key_drops_the_new_one() -> None:
    assert abort_batches({"l1": SWITCH, "l2": ACCEPT, "l3": SWITCH}) == [
        (ACCEPT, ["l1", "l3"]),
        (None, ["l1", "l2", "l3"]),
    ]
    with pytest.raises(UserError, match="l2: no rotation under way"):
        abort_batches({"l1": ACCEPT, "l2": None})
    with pytest.raises(UserError, match="l1: the old key is already retired"):
        abort_batches({"l1": RETIRE})


def _plan(host: str = "server", **fields: Any) -> HostPlan:
    base: dict[str, Any] = {"runtime": False, "changed": {}, "start": [], "removed": [],
                            "unchanged": [], "files": []}  # fmt: skip
    base.update(fields)
    return HostPlan(host, False, **base)


MANIFEST = {
    "links": {
        "l1": {"role": "server", "peer": "c1"},
        "l2": {"role": "server", "peer": "c2"},
        "hq": {
            "role": "hub",
            "clients": {"g1": {"key": "hq.g1", "host": "g1"}, "g2": {"key": "hq.g2"}},
        },
    }
}


def test_a_plan_that_only_reloads_the_rotated_keys_has_nothing_unrelated() -> None:
    plan = _plan(
        reload={"l1": ["config changed (keys only)"], "hq": ["client g1 changed"]},
        touched_clients={"hq": ["g1"]},
        prune={"l1": ["/etc/vpnd/l1.next.key"]},
    )
    assert unrelated_changes(plan, MANIFEST, ["l1", "hq.g1"]) == []


def test_every_change_beyond_the_rotated_keys_is_named_with_host_and_link() -> None:
    plan = _plan(
        runtime=True,
        changed={"l2": ["config changed"], "l1": ["runtime"]},
        start=["hq"],
        removed=["old"],
        reload={"hq": ["client g1 changed", "client g2 changed", "client g3 removed"]},
        touched_clients={"hq": ["g1", "g2"]},
        prune={"l2": ["/etc/vpnd/l2.next.key"]},
    )
    lines = unrelated_changes(plan, MANIFEST, ["l1", "hq.g1"])
    assert lines == [
        "server: a new vpnd runtime would be installed (every link there restarts)",
        "server: l2: would restart (config changed)",
        "server: hq: not running; deploy would start it",
        "server: old: no longer rendered; deploy would stop and remove it",
        "server: hub hq: client g3 removed, client g2 changed",
        "server: l2: would delete /etc/vpnd/l2.next.key",
    ]


def test_a_rotated_link_that_would_restart_is_not_hitless_and_is_named() -> None:
    plan = _plan(changed={"l1": ["config changed", "key changed"]})
    assert unrelated_changes(plan, MANIFEST, ["l1"]) == [
        "server: l1: would restart, not reload (config changed, key changed, not running, or "
        "more than its keys changed)"
    ]
    # another link's keys changing (a hand-made keygen --promote) is not this rotation's
    plan = _plan(reload={"l2": ["key changed (keys only)"]})
    assert unrelated_changes(plan, MANIFEST, ["l1"]) == [
        "server: l2: keys changed (key changed (keys only))"
    ]


def test_deploy_failures_name_the_host_and_leave_the_other_keys_alone() -> None:
    outcomes = {
        "server": HostOutcome("server"),
        "c1": HostOutcome("c1", error="c1: unreachable: connection refused"),
        "c2": HostOutcome("c2"),
        "c3": HostOutcome("c3", rolled_back={"l3": "did not come up"}),
        "g1": HostOutcome("g1", skipped={"hq": "not applied: its other end failed"}),
    }
    keys = {
        "l1": ("l1", ["server", "c1"]),
        "l2": ("l2", ["server", "c2"]),
        "l3": ("l3", ["server", "c3"]),
        "hq.g1": ("hq/g1", ["server", "g1"]),
    }
    assert deploy_failures(outcomes, keys) == {
        "l1": ("c1", "c1: unreachable: connection refused"),
        "l3": ("c3", "c3: l3 rolled back: did not come up"),
        "hq.g1": ("g1", "g1: hq not applied: its other end failed"),
    }


def test_a_held_key_and_a_link_whose_other_end_failed_are_left_as_they_are() -> None:
    manifest = {
        "links": {
            "l1": {"role": "server", "peer": "c1"},
            "l2": {"role": "server", "peer": "c2"},
            "l3": {"role": "server", "peer": "c3"},
            "hq": {"role": "hub", "clients": {"g1": {"key": "hq.g1"}, "g2": {"key": "hq.g2"}}},
        }
    }
    outcome = HostOutcome("server")
    outcome.plan = _plan(
        reload={"l1": ["k"], "l2": ["k"], "l3": ["k"], "hq": ["client g1 changed"]},
        prune={"l1": ["/etc/vpnd/l1.next.key"]},
        touched_clients={"hq": ["g1", "g2"]},
    )
    # a reload (a rotation step) is skipped like a restart when the other end failed
    assert skip_links_of_failed_ends("server", outcome, manifest, {"c3": "c3: unreachable"}) == [
        "l3"
    ]
    assert hold_links(outcome, manifest, {"l1": "stopped earlier", "hq.g1": "stopped"}) == ["l1"]
    assert sorted(outcome.plan.reload) == ["hq", "l2"]
    assert outcome.plan.prune == {}
    assert outcome.plan.touched_clients == {"hq": ["g2"]}  # the held pair is not confirmed
    assert outcome.skipped == {
        "l1": "not applied: stopped earlier",
        "l3": "not applied: its other end c3 failed before apply (unreachable)",
    }
