"""Phase 3, apply: install the runtime and the changed files on each host and (re)start links.

A host whose apply fails or times out is rolled back at once (best effort); the confirm phase
then fails every link it shares with another host of this deploy."""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vpnctl.deploy.commit import _rollback_host
from vpnctl.deploy.common import DesiredFile, HostOutcome, RemoteState, _Printer, apply_timeout
from vpnctl.deploy.runtime import Runtime
from vpnctl.deploy.scripts import apply_script, install_runtime_script, start_script
from vpnctl.ssh import SshError, SshHost


def _tar_files(files: Iterable[DesiredFile]) -> bytes:
    """The files as a tar stream rooted at / (modes and key mtimes set; owner root)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in files:
            info = tarfile.TarInfo(item.path.lstrip("/"))
            info.size = len(item.data)
            info.mode = item.mode
            info.mtime = int(item.mtime if item.mtime is not None else time.time())
            tar.addfile(info, io.BytesIO(item.data))
    return buf.getvalue()


def apply_hosts(
    work: list[str],
    outcomes: Mapping[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    *,
    installs: Mapping[str, tuple[Runtime | None, bytes]],
    printer: _Printer,
    applied: set[str],
    jobs: int,
) -> dict[str, float]:
    """Apply each host's plan in parallel: the runtime (from `installs`: host -> (wheelhouse,
    its tar)) when its stamp differs, then the files, stops and (re)starts. A host whose apply
    fails is rolled back there and gets ``outcome.error``. `applied` collects the hosts that
    may hold uncommitted changes (Ctrl-C rolls them back). Returns each applied host's clock
    when its apply began (before any restart), for confirm to tell old records from new."""
    applied_at: dict[str, float] = {}
    defer = deferred_starts(work, outcomes, manifests)

    def apply(name: str) -> None:
        outcome = outcomes[name]
        plan = outcome.plan
        assert plan is not None  # noqa: S101 - filtered by the caller
        manifest = manifests[name]
        try:
            applied.add(name)
            if plan.runtime:
                rt, tar = installs[name]
                assert rt is not None  # noqa: S101 - a plan installs a runtime only if built
                if rt.stamp in states[name].venvs:  # complete on the host already: switch only
                    tar = b""
                    printer.line(name, f"reusing runtime {rt.stamp} (already on the host)")
                else:
                    printer.line(name, f"installing runtime {rt.stamp}")
                remote = states[name]
                cached = (f"{remote.target_text}|{remote.python_exe}"
                          if remote.target is not None and remote.python_exe else None)  # fmt: skip
                script = install_runtime_script(manifest["prefix"], rt.stamp,
                                                remote.python_exe, cached)  # fmt: skip
                ssh[name].run(script,
                              stdin=tar, timeout=300, check=True)  # fmt: skip
                outcome.runtime_switched = True
            deployed = states[name].deployed or {}
            script = apply_script(plan, manifest, deployed, defer=defer.get(name, ()))
            result = ssh[name].run(script, stdin=_tar_files(plan.files),
                                   timeout=apply_timeout(plan))  # fmt: skip
            for line in result.text.splitlines():
                if line.startswith("applied-at "):
                    with contextlib.suppress(ValueError):
                        applied_at[name] = float(line.split()[1])
                if "start-failed" in line:  # the confirm phase will roll this link back
                    printer.line(name, line)
            if result.returncode != 0:
                detail = result.error_text[-300:] or result.text.strip()[-300:]
                raise SshError(name, f"apply exited {result.returncode}: {detail}")
            later = defer.get(name, [])
            what = ", ".join(link for link in plan.restarts if link not in later) or "none"
            if later:
                what += f"; after their servers: {', '.join(later)}"
            reloaded = f"; reloaded: {', '.join(sorted(plan.reload))}" if plan.reload else ""
            printer.line(name, f"applied; (re)started: {what}{reloaded}", finished=True)
        except SshError as exc:
            outcome.error = str(exc)
            printer.line(name, f"FAILED apply: {exc}", finished=True)
            _rollback_host(name, outcome, manifest, ssh[name], echo=printer.echo,
                           why="apply failed")  # fmt: skip
            if "rollback failed" not in (outcome.error or ""):
                applied.discard(name)

    def start(name: str) -> None:
        outcome = outcomes[name]
        assert outcome.plan is not None  # noqa: S101 - filtered by the caller
        try:
            result = ssh[name].run(start_script(outcome.plan, manifests[name], defer[name]),
                                   timeout=apply_timeout(outcome.plan))  # fmt: skip
            for line in result.text.splitlines():
                if "start-failed" in line:
                    printer.echo(f"{name}: {line}")
            if result.returncode != 0:
                detail = result.error_text[-300:] or result.text.strip()[-300:]
                raise SshError(name, f"start exited {result.returncode}: {detail}")
        except SshError as exc:
            outcome.error = str(exc)
            printer.echo(f"{name}: FAILED start: {exc}")
            _rollback_host(name, outcome, manifests[name], ssh[name], echo=printer.echo,
                           why="start failed")  # fmt: skip
            if "rollback failed" not in (outcome.error or ""):
                applied.discard(name)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(apply, work))
        # the client ends, now that every server end of this deploy listens again
        list(pool.map(start, [n for n in work if defer.get(n) and outcomes[n].error is None]))
    return applied_at


def deferred_starts(
    work: list[str],
    outcomes: Mapping[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
) -> dict[str, list[str]]:
    """Per host, the client ends whose server end (another host of this deploy) is restarted
    too: they start after every apply, so their first connect finds the server listening
    instead of backing off (0.5 s, 1 s, 2 s, ... up to 30 s) while it is still being set up."""
    restarting = {
        (name, link)
        for name in work
        if (plan := outcomes[name].plan) is not None
        for link in plan.restarts
    }
    out: dict[str, list[str]] = {}
    for name in work:
        plan = outcomes[name].plan
        if plan is None:
            continue
        for link in plan.restarts:
            entry = manifests[name]["links"][link]
            server = entry.get("peer")
            served = entry.get("hub") or link
            if entry.get("role") == "client" and server != name and (server, served) in restarting:
                out.setdefault(name, []).append(link)
    return out
