"""Hitless rotation, the pure parts: ages, which keys are due, the phase table (the two ends
always share a key), the order of the steps, and what confirms each step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from vpnctl.inventory import UserError
from vpnctl.rotation import (
    ACCEPT,
    PHASES,
    RETIRE,
    SWITCH,
    end_keys,
    keys_due,
    parse_age,
    remaining_steps,
    shared_key,
    step_verdict,
    steps_back,
)

DAY = 86400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * DAY), ("12h", 43200), ("30m", 1800), ("45s", 45), ("2w", 14 * DAY),
     ("1.5h", 5400), (" 7d ", 7 * DAY)],
)  # fmt: skip
def test_ages_are_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_age(text, "--max-age") == seconds


@pytest.mark.parametrize("text", ["90", "d", "90 days", "-1d", "0d", "1y", "", "9q"])
def test_a_bad_age_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_age(text, "--max-age")
    assert str(caught.value).startswith(f"--max-age: {text!r} ")
    assert "90d" in str(caught.value) or "longer than zero" in str(caught.value)


def test_keys_due_are_those_older_than_the_age_in_inventory_order() -> None:
    now = 1000 * DAY
    created = {"b": now - 100 * DAY, "a": now - 10 * DAY, "c": None, "d": now - 91 * DAY}
    assert keys_due(created, now, 90 * DAY) == ["b", "c", "d"]  # c: age unknown, so due
    assert keys_due(created, now, None) == ["b", "a", "c", "d"]  # no limit: every key
    assert keys_due(created, now, 1000 * DAY) == ["c"]


def test_steps_run_in_order_and_a_recorded_phase_is_resumed_not_skipped() -> None:
    assert remaining_steps(None) == [ACCEPT, SWITCH, RETIRE]
    assert remaining_steps(ACCEPT) == [ACCEPT, SWITCH, RETIRE]
    assert remaining_steps(SWITCH) == [SWITCH, RETIRE]
    assert remaining_steps(RETIRE) == [RETIRE]
    with pytest.raises(UserError, match="unknown rotation phase 'bogus'"):
        remaining_steps("bogus")


def test_abort_returns_the_client_first_and_is_refused_after_the_retire() -> None:
    assert steps_back(None) == []
    assert steps_back(ACCEPT) == [None]
    assert steps_back(SWITCH) == [ACCEPT, None]  # the client back on the old key first
    with pytest.raises(UserError, match="already retired"):
        steps_back(RETIRE)


def test_the_phase_table() -> None:
    assert end_keys("server", None, "OLD", None) == end_keys("client", None, "OLD", "NEW")
    assert end_keys("client", None, "OLD", "NEW").next is None  # staged only: not rendered
    server, client = (
        end_keys("server", ACCEPT, "OLD", "NEW"),
        end_keys("client", ACCEPT, "OLD", "NEW"),
    )
    assert (server.primary, server.next, server.session) == ("OLD", "NEW", "OLD")
    assert (client.primary, client.next, client.session) == ("OLD", "NEW", "OLD")
    server, client = end_keys("hub", SWITCH, "OLD", "NEW"), end_keys("client", SWITCH, "OLD", "NEW")
    assert (server.primary, server.next, server.session) == ("OLD", "NEW", "NEW")
    assert (client.primary, client.next, client.session) == ("NEW", "OLD", "NEW")
    # retire is rendered after the promotion: the new key is current, no staged key is left
    assert end_keys("server", RETIRE, "NEW", None) == end_keys("client", RETIRE, "NEW", None)
    assert end_keys("client", RETIRE, "NEW", None).next is None


def test_every_pair_of_neighbouring_phases_shares_a_key_at_both_ends() -> None:
    """A step changes one phase into the next, deployed to two hosts in any order: whichever
    end is on the new phase and whichever on the old, they must share a key."""

    def ends(phase: str | None) -> dict[str, object]:
        current, staged = ("NEW", None) if phase == RETIRE else ("OLD", "NEW")
        return {role: end_keys(role, phase, current, staged) for role in ("server", "client")}

    order = [None, *PHASES]
    for before, after in itertools.pairwise(order):
        for server_phase in (before, after):
            for client_phase in (before, after):
                pair = [ends(server_phase)["server"], ends(client_phase)["client"]]
                assert shared_key(pair), (server_phase, client_phase)  # type: ignore[arg-type]


@dataclass
class End:
    host: str
    state: str = "up"
    key_fingerprint: str | None = "OLD"
    session_key_fingerprint: str | None = "OLD"
    next_key_fingerprint: str | None = None


def test_each_step_is_confirmed_only_by_what_it_changes() -> None:
    before = [End("s"), End("c")]
    assert step_verdict(ACCEPT, before, "OLD", "NEW") == (
        "s: does not accept the new key NEW (next key: none)"
    )
    accepted = [End("s", next_key_fingerprint="NEW"), End("c", next_key_fingerprint="NEW")]
    assert step_verdict(ACCEPT, accepted, "OLD", "NEW") is None
    assert step_verdict(SWITCH, accepted, "OLD", "NEW") == (
        "s: session still on OLD, not the new key NEW"
    )
    switched = [
        End("s", next_key_fingerprint="NEW", session_key_fingerprint="NEW"),
        End("c", key_fingerprint="NEW", next_key_fingerprint="OLD", session_key_fingerprint="NEW"),
    ]
    assert step_verdict(SWITCH, switched, "OLD", "NEW") is None
    assert step_verdict(RETIRE, switched, "OLD", "NEW") == "s: key OLD, session NEW; expected NEW"
    retired = [End("s", "up", "NEW", "NEW"), End("c", "up", "NEW", "NEW")]
    assert step_verdict(RETIRE, retired, "OLD", "NEW") is None
    assert step_verdict(None, before, "OLD", "NEW") is None  # an abort's end: the old key alone
    down = [End("s", state="not running"), End("c")]
    assert step_verdict(ACCEPT, down, "OLD", "NEW") == "s: not running"
    assert step_verdict(ACCEPT, [End("s")], "OLD", "NEW") == "1 end(s) reported, expected 2"


def test_a_hub_peer_whose_keys_alone_changed_is_kept_by_a_reload() -> None:
    """The hub side of a rotation step: a peer file that gained (or lost) a ``nextkey``, or
    whose keys swapped, keeps the client's session; any other change does not."""
    from ipaddress import IPv4Address, IPv6Address

    from vpnd_runtime.peers import Peer
    from vpnd_runtime.reload import _same_but_keys

    def peer(key: bytes, next_key: bytes | None = None, address6: str | None = "fd00::2") -> Peer:
        return Peer("c1", IPv4Address("198.19.0.2"), key, "fp", (),
                    IPv6Address(address6) if address6 else None, next_key)  # fmt: skip

    old, new = b"o" * 32, b"n" * 32
    assert _same_but_keys(peer(old), peer(old, new))  # step 1: also accept the new key
    assert _same_but_keys(peer(old, new), peer(new, old))  # the keys swap
    assert _same_but_keys(peer(old, new), peer(new))  # step 3: the old key retired
    assert not _same_but_keys(peer(old), peer(old, address6="fd00::3"))
    assert not _same_but_keys(peer(old), peer(new, address6=None))
