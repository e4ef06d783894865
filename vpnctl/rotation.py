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

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vpnctl.inventory import UserError

if TYPE_CHECKING:  # deploy imports rendering, which imports this module
    from vpnctl.deploy.common import HostPlan

__all__ = [
    "ACCEPT",
    "PHASES",
    "RETIRE",
    "STEPS",
    "SWITCH",
    "EndKeys",
    "EndView",
    "abort_batches",
    "end_keys",
    "end_keys_of",
    "keys_due",
    "manifest_fields",
    "parse_age",
    "remaining_steps",
    "session_keys",
    "shared_key",
    "step_batches",
    "step_verdict",
    "steps_back",
    "unrelated_changes",
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


def end_keys_of(
    name: str,
    role: str,
    fingerprints: Mapping[str, str],
    rotations: Mapping[str, tuple[str, str | None]],
) -> EndKeys:
    """What the ``role`` end of keystore key ``name`` holds for render: ``fingerprints`` maps
    each key to its current fingerprint, ``rotations`` a key under rotation to (phase, staged
    fingerprint) as :meth:`vpnctl.keystore.Keystore.rotations` reads them."""
    phase, staged = rotations.get(name, (None, None))
    return end_keys(role, phase, fingerprints[name], staged)


def session_keys(
    fingerprints: Mapping[str, str], rotations: Mapping[str, tuple[str, str | None]]
) -> dict[str, str]:
    """Each key's session key in its recorded phase (the client's view: the key both ends'
    session should use), as `render --check` and `deploy` compare it."""
    return {name: end_keys_of(name, "client", fingerprints, rotations).session
            for name in fingerprints}  # fmt: skip


def manifest_fields(keys: EndKeys, nextkey: str | None, keyless: bytes | None) -> dict[str, Any]:
    """The manifest fields of a rotation under way (none when there is none, so a build
    without rotations keeps its bytes): the next key's fingerprint and path on the host
    (``nextkey``), the key the session should use, and the sha256 of the config rendered
    without its ``nextkey`` line (``keyless``; deploy reloads rather than restarts a link
    whose config differs only in its keys)."""
    if keys.next is None or nextkey is None:
        return {}
    return {
        "next_key_fingerprint": keys.next,
        "nextkeyfile": nextkey,
        "session_key_fingerprint": keys.session,
        **(
            {"config_sans_keys": hashlib.sha256(keyless).hexdigest()} if keyless is not None else {}
        ),
    }


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


def step_batches(phases: Mapping[str, str | None]) -> list[tuple[str, list[str]]]:
    """How `vpnctl rotate` runs many keys: one batch per step, in step order, each with the
    keys (in ``phases``' order) that still have that step to run from their recorded phase
    (None: not started). Every key of a batch is deployed and confirmed together; a key that
    fails a step is left out of the later batches by the caller. Steps no key needs are left
    out; a key resumed at switch joins the others from the switch batch on."""
    todo = {name: remaining_steps(phase) for name, phase in phases.items()}
    return [
        (step, names)
        for step in PHASES
        if (names := [name for name, steps in todo.items() if step in steps])
    ]


def abort_batches(phases: Mapping[str, str | None]) -> list[tuple[str | None, list[str]]]:
    """The batches of ``vpnctl rotate --abort``: from switch the clients first go back to the
    old key (phase accept), then every key drops the new one (phase None). Raises UserError
    naming the key when one cannot be walked back (none under way, or already retired)."""
    back: dict[str, list[str | None]] = {}
    for name, phase in phases.items():
        if phase is None:
            raise UserError(f"{name}: no rotation under way; nothing to abort")
        try:
            back[name] = steps_back(phase)
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    return [
        (target, names)
        for target in (ACCEPT, None)
        if (names := [name for name, steps in back.items() if target in steps])
    ]


def _entry_keys(link: str, entry: Mapping[str, Any]) -> set[str]:
    """The keystore keys a manifest entry holds: a link's own, a hub client end's
    ``<hub>.<client>``, every client key of a hub."""
    if entry.get("role") == "hub":
        clients = entry.get("clients")
        return (
            {str(c.get("key")) for c in clients.values()} if isinstance(clients, Mapping) else set()
        )
    return {str(entry.get("key") or link)}


def unrelated_changes(
    plan: HostPlan, manifest: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """What a deploy of ``plan`` (one host, as deploy planned it) would do beyond rotating
    ``keys`` (keystore names), one line each naming the link: an empty list when the deploy
    only reloads those keys' links. A rotation step must change keys and nothing else: a
    pending route edit on another link, a link not running (it would be started), a link no
    longer rendered, a new runtime (every link restarts) or a rotated link whose config
    changed beyond its keys (it would restart, not reload) all show here. ``manifest`` is the
    host's rendered manifest."""
    keys = set(keys)
    links = manifest.get("links", {})
    host = plan.host
    out = []
    if plan.runtime:
        out.append(f"{host}: a new vpnd runtime would be installed (every link there restarts)")
    for link, why in sorted(plan.changed.items()):
        ours = (
            _entry_keys(link, links.get(link, {})) <= keys
            and links.get(link, {}).get("role") != "hub"
        )
        if plan.runtime and why == ["runtime"]:
            continue  # said once above
        # a link is reloaded only while its daemon runs and nothing but its keys changed
        note = ["not running, or more than its keys changed"] if ours else []
        what = "restart, not reload" if ours else "restart"
        out.append(f"{host}: {link}: would {what} ({', '.join([*why, *note])})")
    for link in plan.start:
        if not (_entry_keys(link, links.get(link, {})) <= keys):
            out.append(f"{host}: {link}: not running; deploy would start it")
    for link in plan.removed:
        out.append(f"{host}: {link}: no longer rendered; deploy would stop and remove it")
    for link, why in sorted(plan.reload.items()):
        entry = links.get(link, {})
        if entry.get("role") == "hub":
            clients = entry.get("clients", {})
            others = [
                c for c in plan.touched_clients.get(link, [])
                if c not in clients or str(clients[c].get("key")) not in keys
            ]  # fmt: skip
            extra = [w for w in why if " removed" in w] + [f"client {c} changed" for c in others]
            if extra:
                out.append(f"{host}: hub {link}: {', '.join(extra)}")
        elif not (_entry_keys(link, entry) <= keys):
            out.append(f"{host}: {link}: keys changed ({', '.join(why)})")
    for link, paths in sorted(plan.prune.items()):
        entry = links.get(link, {})
        if entry.get("role") != "hub" and not (_entry_keys(link, entry) <= keys):
            out.append(f"{host}: {link}: would delete {', '.join(paths)}")
    return out
