"""Hitless key rotation, the pure parts: ages, which keys to rotate, and what each end holds.

A rotation of one key (a point-to-point link, or one hub client's key ``<hub>.<client>``) moves
through phases recorded in the keystore (``<key>.rotation.json``, see :mod:`vpnctl.keystore`),
so that `vpnctl rotate` can stop after any step and continue (or go back) later:

====== ============================================= ==========================================
phase  server end (or the hub's peer file)          client end (the initiator)
====== ============================================= ==========================================
none   ``keyfile OLD``                               ``keyfile OLD``
accept ``keyfile OLD`` + ``nextkey NEW``             ``keyfile OLD`` + ``nextkey NEW``
switch ``keyfile OLD`` + ``nextkey NEW``             ``keyfile NEW`` + ``nextkey OLD``
retire ``keyfile NEW`` (promoted in the keystore)    ``keyfile NEW``
====== ============================================= ==========================================

Each step deploys one phase and is confirmed from the daemons' status records before the next:

1. **accept** -- both ends also accept NEW (``nextkey``); confirmed when both report NEW as
   their next key and the session still runs (on OLD).
2. **switch** -- the client makes NEW its primary key: it opens a session with NEW beside the
   running one (make before break); confirmed when both ends' session uses NEW.
3. **retire** -- the keystore promotes NEW (OLD kept as ``retired-<UTC>``) and both ends drop
   OLD; confirmed when both ends hold NEW only, with the session on it.

At every phase the two ends share a key: OLD until the client switched, NEW from then on, and
the server accepts both across the switch. Going back (``--abort``) walks the same table
upwards: from switch the client returns to OLD first, then both drop NEW.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from vpnctl.inventory import UserError

__all__ = [
    "ACCEPT",
    "PHASES",
    "RETIRE",
    "STEPS",
    "SWITCH",
    "EndKeys",
    "EndView",
    "end_keys",
    "keys_due",
    "parse_age",
    "remaining_steps",
    "shared_key",
    "step_verdict",
    "steps_back",
]

ACCEPT, SWITCH, RETIRE = "accept", "switch", "retire"
PHASES = (ACCEPT, SWITCH, RETIRE)
#: What each step does, in words for the operator (the step's number is its index + 1).
STEPS = {
    ACCEPT: "both ends also accept the new key",
    SWITCH: "the client switches to the new key",
    RETIRE: "the old key is retired",
}

_AGE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, where: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s`` or ``2w`` as seconds (> 0); ``where`` names the option
    or inventory field in the error, e.g. ``--max-age``."""
    match = _AGE_RE.fullmatch(str(text))
    if match is None:
        raise UserError(
            f"{where}: {text!r} is not an age; give a number and a unit: 90d, 12h, 30m, 45s, 2w"
        )
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0:
        raise UserError(f"{where}: {text!r} must be longer than zero")
    return seconds


def keys_due(created: Mapping[str, float | None], now: float, max_age: float | None) -> list[str]:
    """The keys (in the mapping's order) to rotate: every one when ``max_age`` is None, else
    those created more than ``max_age`` seconds before ``now``. A key with no known creation
    time (None) is due: an unknown age cannot be shown to be young."""
    if max_age is None:
        return list(created)
    return [name for name, when in created.items() if when is None or now - when > max_age]


def remaining_steps(phase: str | None) -> list[str]:
    """The steps still to run from the recorded ``phase`` (None: a rotation not started).

    A recorded phase is a step that was deployed but maybe not confirmed: it is run (and
    confirmed) again, which is harmless -- a deploy of an unchanged build changes nothing."""
    if phase is None:
        return list(PHASES)
    if phase not in PHASES:
        raise UserError(f"unknown rotation phase {phase!r} (expected one of {', '.join(PHASES)})")
    return list(PHASES[PHASES.index(phase) :])


def steps_back(phase: str | None) -> list[str | None]:
    """The phases an abort deploys, in order, from the recorded ``phase``: each keeps a key the
    two ends share. After retire (the keystore promoted the new key) there is no way back: the
    rotation is finished, not aborted."""
    if phase is None:
        return []
    if phase == SWITCH:
        return [ACCEPT, None]
    if phase == ACCEPT:
        return [None]
    raise UserError(
        "the old key is already retired (phase retire): the rotation can only be finished; "
        "run `vpnctl rotate` again"
    )


@dataclass(frozen=True)
class EndKeys:
    """The keys one end of a link holds in a phase: its primary key (``keyfile``), the one it
    also accepts (``nextkey``, or None) and the key the link's session should use."""

    primary: str
    next: str | None
    session: str


def end_keys(role: str, phase: str | None, current: str, staged: str | None) -> EndKeys:
    """What the ``role`` end ("server", "hub" or "client") holds in ``phase``, as fingerprints
    (or any key names): ``current`` is the keystore's current key, ``staged`` the new one.

    ``retire`` is rendered after the keystore promoted the new key: ``current`` is then the new
    key and ``staged`` is gone, so it looks like no rotation at all."""
    if phase in (None, RETIRE) or staged is None:
        return EndKeys(current, None, current)
    if phase == ACCEPT:
        return EndKeys(current, staged, current)
    if phase == SWITCH:
        if role == "client":
            return EndKeys(staged, current, staged)
        return EndKeys(current, staged, staged)
    raise UserError(f"unknown rotation phase {phase!r}")


def shared_key(ends: Iterable[EndKeys]) -> set[str]:
    """The keys every end accepts (primary or next): never empty along a rotation."""
    sets = [{e.primary} | ({e.next} if e.next else set()) for e in ends]
    return set.intersection(*sets) if sets else set()


class EndView(Protocol):
    """What a step's confirmation reads of one end (:class:`vpnctl.fleetstatus.EndStatus`)."""

    host: str
    state: str
    key_fingerprint: str | None
    session_key_fingerprint: str | None
    next_key_fingerprint: str | None


def step_verdict(step: str | None, ends: Sequence[EndView], old: str, new: str) -> str | None:
    """None when both ``ends`` show that ``step`` took effect, else what is missing (naming the
    host). ``step`` None is the end of an abort: both ends back on ``old`` alone.

    accept: both up, both also accept ``new``, the session still on ``old``;
    switch: both up with the session on ``new``; retire: both up on ``new`` alone."""
    if len(ends) != 2:
        return f"{len(ends)} end(s) reported, expected 2"
    for end in ends:
        used = end.session_key_fingerprint or end.key_fingerprint
        if end.state != "up":
            return f"{end.host}: {end.state}"
        if step == ACCEPT and end.next_key_fingerprint != new:
            nxt = end.next_key_fingerprint or "none"
            return f"{end.host}: does not accept the new key {new} (next key: {nxt})"
        if step == ACCEPT and used != old:
            return f"{end.host}: session on {used}, expected the old key {old} until the switch"
        if step == SWITCH and used != new:
            return f"{end.host}: session still on {used}, not the new key {new}"
        if step in (RETIRE, None):
            keep = new if step == RETIRE else old
            if end.key_fingerprint != keep or used != keep:
                return f"{end.host}: key {end.key_fingerprint}, session {used}; expected {keep}"
            if end.next_key_fingerprint is not None:
                return f"{end.host}: still also accepts {end.next_key_fingerprint}"
    return None
