"""Phases 5 and 6, roll back and commit: put back what did not come up, then record what each
host now runs and drop its backups."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vpnctl.deploy.common import POLL_INTERVAL, Echo, HostOutcome, RemoteState, apply_timeout
from vpnctl.deploy.confirm import _poll_round, _unit_link
from vpnctl.deploy.scripts import commit_script, rollback_script
from vpnctl.ssh import SshError, SshHost


def _rollback_host(
    name: str,
    outcome: HostOutcome,
    manifest: Mapping[str, Any],
    ssh: SshHost,
    *,
    echo: Echo,
    why: str,
) -> None:
    """Put every link this deploy touched on `name` back (best effort) and say so."""
    plan = outcome.plan
    if plan is None:
        return
    links = sorted(set(plan.restarts) | set(plan.reload))
    echo(f"{name}: rolling back {', '.join(links) or 'runtime'} ({why})")
    for link in links:
        outcome.rolled_back.setdefault(link, why)
    try:
        ssh.run(rollback_script(plan, manifest, links, outcome.runtime_switched, finish=True),
                timeout=apply_timeout(plan), check=True)  # fmt: skip
    except SshError as exc:
        note = f"rollback failed too ({exc}); the next deploy finds it pending and retries"
        outcome.error = f"{outcome.error}; {note}" if outcome.error else note
        echo(f"{name}: {note}")
    else:
        for link in links:
            outcome.rolled_back[link] += " -- previous files and daemons restored"


def _committed_manifest(
    manifest: Mapping[str, Any], previous: Mapping[str, Any] | None, rolled_back: Iterable[str]
) -> dict[str, Any]:
    """The manifest a host records at commit: rolled-back links keep their previous entry (or
    are left out when they had none), so "removed" planning stays right next time."""
    record = json.loads(json.dumps(manifest))
    old_links = (previous or {}).get("links", {})
    for link in sorted({_unit_link(unit) for unit in rolled_back}):
        if link in old_links:
            record["links"][link] = old_links[link]
        else:
            record["links"].pop(link, None)
    return record


def roll_back_failed(
    results: Mapping[str, tuple[str, str]],
    to_confirm: Mapping[str, list[str]],
    ends: Mapping[str, list[str]],
    outcomes: Mapping[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    *,
    ssh: Mapping[str, SshHost],
    wait: float,
    jobs: int,
    echo: Echo,
) -> None:
    """Phase 5: record each confirm verdict on the hosts that (re)started the unit, roll back
    the failed units there (previous files, runtime and daemons), and report, per failed unit,
    the state of both ends once they are back up (or `wait` ran out)."""
    failed = {link for link, (state, _) in results.items() if state == "failed"}
    for link, (state, why) in results.items():
        for name in to_confirm[link]:
            if state == "up":
                outcomes[name].confirmed.append(link)
            elif state == "waiting":
                outcomes[name].waiting[link] = why
            else:
                outcomes[name].rolled_back[link] = why

    def rollback(name: str) -> None:
        outcome = outcomes[name]
        plan = outcome.plan
        assert plan is not None  # noqa: S101
        links = sorted({_unit_link(unit) for unit in outcome.rolled_back})
        echo(f"{name}: rolling back {', '.join(links)} (restoring previous files and daemons)")
        try:
            ssh[name].run(rollback_script(plan, manifests[name], links, outcome.runtime_switched),
                          timeout=apply_timeout(plan), check=True)  # fmt: skip
        except SshError as exc:
            outcome.error = f"rollback failed: {exc}"

    rollback_hosts = sorted({n for unit in failed for n in to_confirm[unit]})
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(rollback, rollback_hosts))

    restored: dict[str, str] = {}
    if failed:
        wanted: dict[str, set[str]] = {}
        for link in failed:
            for host in ends[link]:
                wanted.setdefault(host, set()).add(link)
        deadline = time.monotonic() + wait
        while True:
            records = _poll_round(wanted, ssh, manifests, jobs)
            back = all(
                (r := records.get((h, link))) is not None and r.get("state") == "up"
                for link in failed
                for h in ends[link]
            )
            if back or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        for link in sorted(failed):
            restored[link] = ", ".join(
                f"{h}: {'absent' if (r := records.get((h, link))) is None else r.get('state')}"
                for h in ends[link]
            )
            echo(f"link {link:<10} after rollback: {restored[link]}")
    for link, link_states in restored.items():
        for name in to_confirm[link]:
            outcomes[name].rolled_back[link] += f" -- previous version restored ({link_states})"


def commit_hosts(
    work: list[str],
    outcomes: Mapping[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    *,
    applied: set[str],
    jobs: int,
) -> None:
    """Phase 6: every host whose steps all ran records what it now runs -- the new entry of
    each link that stayed, the previously deployed entry of each link rolled back or not
    applied -- and only
    then drops its backups and the pending marker."""

    def commit(name: str) -> None:
        kept = [*outcomes[name].rolled_back, *outcomes[name].skipped]  # at their previous entry
        record = _committed_manifest(manifests[name], states[name].deployed, kept)
        body = json.dumps(record, indent=2, sort_keys=True).encode()
        try:
            ssh[name].run(commit_script(manifests[name]), stdin=body, timeout=30, check=True)
            applied.discard(name)
        except SshError as exc:
            outcomes[name].error = f"commit failed ({exc}); the next deploy will confirm it again"

    committable = [n for n in work if outcomes[n].error is None]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(commit, committable))
