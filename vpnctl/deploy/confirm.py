"""Phase 4, confirm: read the status records at both ends of each (re)started link until it is
up with the expected key, or the wait runs out."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vpnctl.deploy.common import POLL_INTERVAL, Echo, HostOutcome, HostPlan
from vpnctl.deploy.scripts import _MARK, status_script
from vpnctl.hostdata import check_record, clean_json
from vpnctl.rendering import session_fingerprint
from vpnctl.ssh import SshError, SshHost


@dataclass(frozen=True)
class LinkRecord:
    """One link's status as read on its host: the daemon's record, judged for liveness."""

    record: dict[str, Any] | None  # None: the link is not deployed on this host
    key_mtime: float | None
    now: float  # the host's clock when it was read


CONFIRM_WAIT_UP = 3.0  # seconds a host waits for its links to come up before it answers a poll
BAD_ANSWER = "bad answer"  # the state of an end whose host answered with a malformed record


STALE_AFTER = 5.0  # a running daemon rewrites its record every second (docs/architecture.md)


def finite_number(value: object) -> float | None:
    """`value` as a finite float when it is a number or a number's text; None otherwise.

    What a host prints is not trusted to be well formed: "nan", "inf", a bool or a stray line
    becomes None (unknown) instead of an exception or a NaN that poisons every comparison.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        value = float(value) if abs(value) < 2**1000 else None
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def parse_status_output(text: str) -> dict[str, LinkRecord]:
    """The output of :func:`status_script` as link -> LinkRecord.

    A record whose daemon is gone, or a deployed link with no record, is ``not running`` --
    the same rule ``vpnd status`` applies. A record is only trusted when it was written by the
    process the pidfile names (else ``not running``: a leftover of an earlier daemon) and
    rewritten within :data:`STALE_AFTER` seconds of the host's clock (else ``stale``: the
    daemon is hung or its record is not its own).
    """
    lines = text.splitlines()
    now = (_finite(lines[0]) if lines else None) or time.time()
    out: dict[str, LinkRecord] = {}
    i = 1
    while i < len(lines):
        if not lines[i].startswith(f"{_MARK} "):
            i += 1
            continue
        link = lines[i].split(" ", 1)[1].strip()
        block = [*lines[i + 1 : i + 6], "", "", "", "", ""][:5]
        i += 6
        configured = block[0] == "config yes"
        alive = block[1] == "alive yes"
        record: dict[str, Any] | None = None
        bad: str | None = None
        if block[2] not in {"", "-"}:  # a host's answer is data: parsed, type-checked, cleaned
            try:
                loaded = json.loads(block[2])
            except (ValueError, RecursionError):  # RecursionError: nested too deep for json
                loaded, bad = None, "the status record is not JSON (cut short?)"
            bad = bad or check_record(loaded)
            record = clean_json(loaded) if bad is None else None
        if bad is not None:
            record = {"state": BAD_ANSWER, "reason": f"malformed answer: {bad}"}
        elif record is not None and not alive:
            record["reason"] = f"daemon (pid {record.get('pid')}) is gone; last state " + str(
                record.get("state")
            )
            record["state"] = "not running"
        elif record is None and configured:
            record = {"state": "not running", "reason": "no status record (never started?)"}
        elif record is not None:
            _judge_freshness(record, block[4].removeprefix("pidfile ").strip(), now)
        out[link] = LinkRecord(record if configured or bad else None,
                               _finite(block[3].removeprefix("keymtime ")), now)  # fmt: skip
    return out


def _finite(text: str) -> float | None:
    """A host's number (a clock, an mtime), or None when it is absent or not a finite number:
    a bad value from a host must never abort a deploy half way."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _judge_freshness(record: dict[str, Any], pidfile_pid: str, now: float) -> None:
    """Mark `record` (of a live pidfile process) not running/stale unless it is that process's
    and recent (see :func:`parse_status_output`)."""
    pid = record.get("pid")
    updated = finite_number(record.get("updated"))
    if str(pid) != pidfile_pid:
        record["reason"] = (
            f"status record is from pid {pid}, the pidfile names {pidfile_pid}; last state "
            f"{record.get('state')}"
        )
        record["state"] = "not running"
    elif updated is None or now - updated > STALE_AFTER:
        age = f"{now - updated:.0f}s" if updated is not None else "never"
        record["reason"] = (
            f"status record not rewritten for {age} (daemon pid {pid} hung?); last state "
            f"{record.get('state')}"
        )
        record["state"] = "stale"


def read_statuses(
    ssh: SshHost,
    manifest: Mapping[str, Any],
    links: Iterable[str],
    timeout: float = 10.0,
    *,
    wait_up: float = 0.0,
) -> dict[str, LinkRecord]:
    """The status of `links` on one host in one ssh call (SshError when it does not answer);
    with `wait_up`, read once they are all up or after that many seconds on the host."""
    script = status_script(manifest, list(links), wait_up=wait_up)
    result = ssh.run(script, timeout=timeout + wait_up)
    return parse_status_output(result.text)


def _poll_round(
    wanted: Mapping[str, set[str]],
    ssh: Mapping[str, SshHost],
    manifests: Mapping[str, Mapping[str, Any]],
    jobs: int,
    wait_up: float = 0.0,
) -> dict[tuple[str, str], dict[str, Any] | None]:
    """One status read per host, in parallel: (host, link) -> record (None: not deployed).
    With `wait_up`, each host answers once its links are up (or after `wait_up` seconds)."""

    def one(host: str) -> dict[tuple[str, str], dict[str, Any] | None]:
        links = manifests[host]["links"]
        try:
            found = read_statuses(ssh[host], manifests[host],
                                  sorted({_unit_link(u) for u in wanted[host]}),
                                  wait_up=wait_up)  # fmt: skip
        except SshError as exc:
            return {(host, link): {"state": "unreachable", "reason": str(exc)}
                    for link in wanted[host]}  # fmt: skip
        out: dict[tuple[str, str], dict[str, Any] | None] = {}
        for unit in wanted[host]:
            link = _unit_link(unit)
            record = found[link].record if link in found else None
            if "/" in unit and links.get(link, {}).get("role") == "hub":
                record = _peer_record(record, unit.split("/", 1)[1])
            out[(host, unit)] = record
        return out

    out: dict[tuple[str, str], dict[str, Any] | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(wanted)))) as pool:
        for part in pool.map(one, sorted(wanted)):
            out.update(part)
    return out


def _describe_ends(ends: list[str], records: Mapping[tuple[str, str], Any], link: str) -> str:
    parts = []
    for host in ends:
        record = records.get((host, link))
        if record is None:
            parts.append(f"{host}: not deployed")
        else:
            why = f" ({record['reason']})" if record.get("reason") else ""
            parts.append(f"{host}: {record.get('state')}{why}")
    return "; ".join(parts)


def confirm_links(
    links: Mapping[str, list[str]],
    fingerprints: Mapping[str, str],
    ssh: Mapping[str, SshHost],
    manifests: Mapping[str, Mapping[str, Any]],
    *,
    wait: float,
    jobs: int,
    on_result: Callable[[str, str, str], None] | None = None,
    restarted: Mapping[str, Iterable[str]] | None = None,
    not_before: Mapping[str, float] | None = None,
    reloaded: Iterable[tuple[str, str]] = (),
    next_keys: Mapping[tuple[str, str], str | None] | None = None,
) -> dict[str, tuple[str, str]]:
    """Poll every link's two ends (``links``: link -> [changed end, other end]) until both are
    up with the expected key fingerprint, or `wait` runs out.

    `restarted` names, per link, the ends this deploy (re)started (default: the first end).
    Returns link -> ("up" | "waiting" | "failed", explanation). An end restarted by this deploy
    that is not running is a failure (its start failed or it died): the link is rolled back.
    "waiting" only when the other end was *not* touched by this deploy and is not deployed, not
    running or unreachable, so the link cannot be confirmed either way. `not_before` gives, per
    host, the host's clock when its daemons were restarted: a record there whose ``since`` is
    older belongs to a daemon from before the restart and counts as ``stale`` -- except at the
    (host, link) pairs in `reloaded`: a reload (SIGHUP) keeps the daemon and its session.
    The key compared is the one each end's session uses (``session_key_fingerprint``; a record
    without it: its key), so a rotation's phase whose two ends' primary keys differ confirms.
    `next_keys` gives, per (host, link), the next key that end must also accept (None: none):
    a SIGHUP the daemon could not apply (an unreadable ``nextkey``) keeps its session on the
    old key, and only this tells.
    """
    skip_floor = set(reloaded)
    ours = {link: set(restarted.get(link, ())) if restarted else set() for link in links}
    for link, ends in links.items():
        ours[link].add(ends[0])
    results: dict[str, tuple[str, str]] = {}
    pending = dict(links)
    deadline = time.monotonic() + wait
    records: dict[tuple[str, str], dict[str, Any] | None] = {}
    while pending:
        wanted: dict[str, set[str]] = {}
        for link, ends in pending.items():
            for host in ends:
                wanted.setdefault(host, set()).add(link)
        # the hosts wait (up to CONFIRM_WAIT_UP s) for their links to come up before answering
        left = max(0.0, deadline - time.monotonic())
        records = _poll_round(wanted, ssh, manifests, jobs, wait_up=min(CONFIRM_WAIT_UP, left))
        for (host, link), record in records.items():
            floor = (not_before or {}).get(host)
            since = record.get("since") if record is not None else None
            if (
                record is not None
                and floor is not None
                and host in ours.get(link, ())
                and (host, link) not in skip_floor
                and record.get("state") not in {"not running", "unreachable", "stale"}
                and (not isinstance(since, int | float) or since < floor)
            ):
                record["reason"] = (
                    f"record predates the restart (since {since}); last state "
                    + str(record.get("state"))
                )
                record["state"] = "stale"
        expired = time.monotonic() >= deadline
        for link, ends in list(pending.items()):
            ends_records = [records.get((host, link)) for host in ends]
            verdict: tuple[str, str] | None = None
            if all(r is not None and r.get("state") == "up" for r in ends_records):
                fps = {
                    r.get("session_key_fingerprint") or r.get("key_fingerprint")
                    for r in ends_records
                    if r is not None
                }
                unloaded = [
                    f"{host} does not accept the next key {want or 'none'} "
                    f"(it reports {(r or {}).get('next_key_fingerprint') or 'none'}; see its log)"
                    for host, r in zip(ends, ends_records, strict=True)
                    if (host, link) in (next_keys or {})
                    and ((r or {}).get("next_key_fingerprint") or None)
                    != (want := (next_keys or {})[(host, link)] or None)
                ]
                if fps == {fingerprints[link]} and not unloaded:
                    verdict = ("up", f"up at both ends, key {fingerprints[link]}")
                elif expired and unloaded:
                    verdict = ("failed", "; ".join(unloaded))
                elif expired:
                    verdict = ("failed", f"key fingerprints differ: {sorted(map(str, fps))}")
            elif expired:
                last = _describe_ends(ends, records, link)
                other = ends_records[-1]
                dead_here = [
                    host
                    for host, r in zip(ends, ends_records, strict=True)
                    if host in ours[link]
                    and (r is None or r.get("state") in {"not running", "stale"})
                ]
                if dead_here:
                    verdict = ("failed", f"not running after the restart: {last}")
                elif other is None or other.get("state") in {"not running", "unreachable"}:
                    verdict = ("waiting", f"the other end is not up to confirm ({last})")
                else:
                    verdict = ("failed", f"not up within {wait:g}s: {last}")
            if verdict is not None:
                results[link] = verdict
                del pending[link]
                if on_result is not None:
                    on_result(link, *verdict)
        if pending:
            time.sleep(POLL_INTERVAL)
    return results


def _unit_link(unit: str) -> str:
    """The link (or hub) a confirm unit belongs to: ``hub/client`` -> ``hub``."""
    return unit.split("/", 1)[0]


def _confirm_units(
    host: str, manifest: Mapping[str, Any], link: str, plan: HostPlan
) -> list[tuple[str, list[str], str, str | None]]:
    """What confirming `link` on `host` means: (unit, [its two end hosts], key fingerprint, the
    next key this end also accepts or None).

    A point-to-point link is one unit. A hub is one unit per client pair ``hub/client`` --
    every client when the hub (re)started, only the added or changed clients when it was
    reloaded (the others keep their sessions). A hub's client is the unit of its own pair."""
    entry = manifest["links"][link]
    if entry.get("role") == "hub":
        clients = entry.get("clients", {})
        names = plan.touched_clients.get(link, sorted(clients)) if link in plan.reload else clients
        return [
            (
                f"{link}/{c}",
                [host, str(clients[c]["host"])],
                str(session_fingerprint(clients[c])),
                clients[c].get("next_key_fingerprint"),
            )
            for c in sorted(names)
            if c in clients
        ]
    unit = f"{entry['hub']}/{host}" if entry.get("hub") else link
    return [
        (
            unit,
            [host, str(entry["peer"])],
            str(session_fingerprint(entry)),
            entry.get("next_key_fingerprint"),
        )
    ]


def _peer_record(record: dict[str, Any] | None, client: str) -> dict[str, Any] | None:
    """A hub's view of one client, from its status record's ``peers[]`` (HUB-SPEC.md), shaped
    like a link's record (state, reason, key_fingerprint, since) so confirm can judge it."""
    if record is None or record.get("state") in {"not running", "stale", "unreachable"}:
        return record
    for peer in record.get("peers") or []:
        if isinstance(peer, dict) and peer.get("name") == client:
            state = str(peer.get("state"))
            started = peer.get("session_started")
            return {
                "state": state,
                "reason": peer.get("reason"),
                "key_fingerprint": peer.get("key_fingerprint"),
                "session_key_fingerprint": peer.get("session_key_fingerprint"),
                "next_key_fingerprint": peer.get("next_key_fingerprint"),
                "since": started if state == "up" and started is not None else peer.get("since"),
                "peer": peer.get("peer"),
                "session_age": peer.get("session_age"),
                "last_rtt": peer.get("last_rtt"),
                "bytes_in": peer.get("bytes_in"),
                "bytes_out": peer.get("bytes_out"),
                "pid": record.get("pid"),
            }
    return {"state": "down", "reason": f"the hub lists no client {client!r} in peers[]"}


def confirm_changes(
    work: list[str],
    outcomes: Mapping[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    ssh: Mapping[str, SshHost],
    applied_at: Mapping[str, float],
    *,
    wait: float,
    jobs: int,
    echo: Echo,
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, tuple[str, str]]]:
    """Phase 4: confirm every (re)started link from both ends; a hub's unit is each hub-client
    pair (``hub/client``) it (re)started or reloaded, seen in the hub's peers[] and at the
    client. A unit whose apply failed on one of its hosts fails at once (that end went back to
    its old version: this end must follow it).

    Returns (unit -> hosts where it was (re)started, unit -> its [first, other] end hosts,
    unit -> (verdict, why))."""
    to_confirm: dict[str, list[str]] = {}  # unit -> hosts where it was (re)started/reloaded
    broken_elsewhere: dict[str, str] = {}  # unit -> host whose apply of it failed
    unit_ends: dict[str, list[str]] = {}  # unit -> [hub or server host, client host]
    fingerprints: dict[str, str] = {}
    reloaded: set[tuple[str, str]] = set()  # (host, unit) reloaded there, not restarted
    next_keys: dict[tuple[str, str], str | None] = {}  # (host, unit) -> the next key it accepts
    for name in work:
        plan = outcomes[name].plan
        if plan is None:
            continue
        for link in sorted(set(plan.restarts) | set(plan.reload)):
            for unit, ends, fp, next_fp in _confirm_units(name, manifests[name], link, plan):
                next_keys[(name, unit)] = next_fp
                if link not in plan.restarts:
                    reloaded.add((name, unit))
                unit_ends.setdefault(unit, ends)
                fingerprints.setdefault(unit, fp)
                if outcomes[name].error is None:
                    to_confirm.setdefault(unit, []).append(name)
                else:
                    broken_elsewhere[unit] = name

    def ends_of(unit: str) -> list[str]:
        first = to_confirm[unit][0]
        return [first, *(h for h in unit_ends[unit] if h != first)][:2]

    def said(link: str, state: str, why: str) -> None:
        echo(f"link {link:<10} {state.upper() if state == 'failed' else state}: {why}")

    results: dict[str, tuple[str, str]] = {}
    for unit in sorted(to_confirm):  # a hub pair whose client failed before apply (no plan)
        other = next((h for h in unit_ends[unit] if h not in to_confirm[unit]), None)
        if other in outcomes and outcomes[other].plan is None and outcomes[other].error:
            why = str(outcomes[other].error).removeprefix(f"{other}: ")
            results[unit] = ("waiting", f"not confirmed: the other end {other} failed before "
                                        f"apply ({why})")  # fmt: skip
            said(unit, *results[unit])
    for link in sorted(set(to_confirm) & set(broken_elsewhere)):
        results[link] = ("failed", f"the apply on {broken_elsewhere[link]} failed and was "
                                   "rolled back there")  # fmt: skip
        said(link, *results[link])
    ends = {link: ends_of(link) for link in sorted(to_confirm)}
    checked = {link: ends[link] for link in sorted(to_confirm) if link not in results}
    results.update(confirm_links(checked, fingerprints, ssh, manifests, wait=wait, jobs=jobs,
                                 on_result=said, restarted=to_confirm,
                                 not_before=applied_at, reloaded=reloaded,
                                 next_keys=next_keys))  # fmt: skip
    return to_confirm, ends, results
