"""The orchestration: :func:`deploy` runs the phases over every host (see the package doc)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vpnctl.deploy.apply import apply_hosts
from vpnctl.deploy.commit import _rollback_host, commit_hosts, roll_back_failed
from vpnctl.deploy.common import (
    DEFAULT_JOBS,
    DEFAULT_WAIT,
    DeployError,
    DeployReport,
    Echo,
    HostOutcome,
    RemoteState,
    _Printer,
)
from vpnctl.deploy.confirm import confirm_changes
from vpnctl.deploy.plan import (
    _describe,
    check_remote,
    desired_files,
    hold_links,
    load_manifest,
    parse_probe,
    plan_host,
    redacted_diff,
    skip_links_of_failed_ends,
)
from vpnctl.deploy.runtime import Runtime, _RuntimeBuilder, local_target
from vpnctl.deploy.scripts import (
    probe_script,
)
from vpnctl.inventory import Host, Inventory, UserError
from vpnctl.keystore import Keystore
from vpnctl.ssh import SshError, SshHost, SshTimeout, SshUnreachable, quote


def deploy(
    inventory: Inventory,
    hosts: list[str],
    build: Path,
    keystore: Keystore,
    *,
    dry_run: bool = False,
    wait: float = DEFAULT_WAIT,
    jobs: int = DEFAULT_JOBS,
    passphrase: bytes | None = None,
    echo: Echo = print,
    connect_timeout: float = 5.0,
    hold: Mapping[str, str] | None = None,
    before_apply: Callable[[Mapping[str, HostOutcome], Mapping[str, Any]], None] | None = None,
) -> DeployReport:
    """Deploy the rendered build to `hosts` (names from the inventory); see the module doc.

    `hold` (keystore key -> why) and `before_apply` serve `vpnctl rotate`: the ends of a held
    key are left as they are (:func:`hold_links`); `before_apply` sees every host's outcome
    (with its plan) and the rendered manifests once all are planned, and may raise to stop the
    deploy before anything is applied."""
    known = {h.name: h for h in inventory.hosts}
    hosts = list(dict.fromkeys(hosts))  # a host named twice is deployed once, not in parallel
    unknown = [h for h in hosts if h not in known]
    if unknown:
        raise DeployError(f"{inventory.file}: no host named {', '.join(unknown)}")
    if not hosts:
        raise DeployError("name at least one host, or give --all")
    build = Path(build)
    manifests = {h.name: load_manifest(build, h.name) for h in inventory.hosts}
    ssh = {h.name: SshHost(h.name, h.ssh, connect_timeout=connect_timeout) for h in inventory.hosts}
    here = local_target()
    runtimes = _RuntimeBuilder(build / ".runtime", echo)
    printer = _Printer(echo, len(hosts))
    outcomes = {name: HostOutcome(name) for name in hosts}
    states: dict[str, RemoteState] = {}
    host_runtime: dict[str, Runtime] = {}

    def probe(name: str) -> None:
        host: Host = known[name]
        manifest = manifests[name]
        outcome = outcomes[name]
        flag = manifest.get("systemd", "auto")
        try:
            all_files = desired_files(build, manifest, keystore, use_systemd=flag is not False,
                                      passphrase=passphrase)  # fmt: skip
            paths = [f.path for f in all_files]
            result = ssh[name].run(probe_script(manifest, paths), timeout=30, check=True)
            remote = parse_probe(result.text, paths)
            check_remote(name, host.ssh.user, remote)
            # a probe without a target line (none of ours) is taken as the operator's target
            runtime = runtimes.get(name, remote.target or here)
            use_systemd = flag is True or (flag == "auto" and remote.systemd_running)
            if flag is True and not remote.systemd_running:
                raise DeployError(f"{name}: manifest says systemd but the host does not run it")
            wanted = [f for f in all_files if use_systemd or f.kind != "unit"]
            plan = plan_host(
                host.name,
                manifest,
                wanted,
                remote,
                runtime_stamp=runtime.stamp,
                use_systemd=use_systemd,
            )
        except (SshError, DeployError, UserError) as exc:
            outcome.error = str(exc)
            outcome.unreachable = isinstance(exc, SshUnreachable | SshTimeout)
            printer.line(name, f"FAILED probe: {str(exc).removeprefix(f'{name}: ')}",
                         finished=True)  # fmt: skip
            return
        states[name] = remote
        host_runtime[name] = runtime
        outcome.plan = plan
        printer.line(name, _describe(plan), finished=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(probe, hosts))

    # a link whose other end failed at probe is not applied at this end either (nor waited for)
    failed = {n: str(outcomes[n].error) for n in hosts if outcomes[n].plan is None}
    for name in hosts:
        for link in skip_links_of_failed_ends(name, outcomes[name], manifests[name], failed):
            echo(f"{name}: {link} not applied: {outcomes[name].skipped[link].split(': ', 1)[1]}")
    for name in hosts:
        hold_links(outcomes[name], manifests[name], hold or {})
    if before_apply is not None:
        before_apply(outcomes, manifests)

    stamps = sorted({runtime.stamp for runtime in host_runtime.values()})
    report = DeployReport(outcomes, runtime_stamp=", ".join(stamps))
    if dry_run:
        report.diff = _dry_run_diff(outcomes, states, ssh,
                                    {n: r.stamp for n, r in host_runtime.items()})  # fmt: skip
        return report

    work = [n for n in hosts if outcomes[n].plan is not None and not outcomes[n].plan.noop]
    if not work:
        if report.ok:  # never "no changes" after a failure: the recap says what failed
            echo("no changes: every host is up to date, nothing restarted")
        return report

    tarballs: dict[str, bytes] = {}  # stamp -> tar, made once per target that is installed
    for name in work:
        runtime = host_runtime[name]
        if outcomes[name].plan.runtime and runtime.stamp not in tarballs:  # type: ignore[union-attr]
            tarballs[runtime.stamp] = runtime.tarball()
    host_runtimes = {name: (host_runtime[name], tarballs.get(host_runtime[name].stamp, b""))
                     for name in work}  # fmt: skip
    printer = _Printer(echo, len(work))
    applied: set[str] = set()  # hosts where the apply script was started (may have changes)
    try:
        _apply_confirm_commit(
            work, outcomes, manifests, states, ssh, host_runtimes=host_runtimes,
            printer=printer, applied=applied, wait=wait, jobs=jobs, echo=echo,
        )  # fmt: skip
    except KeyboardInterrupt:
        echo("interrupted: rolling back the hosts already changed")
        for name in sorted(applied):
            _rollback_host(name, outcomes[name], manifests[name], ssh[name], echo=echo,
                           why="interrupted (Ctrl-C)")  # fmt: skip
        raise
    return report


def _apply_confirm_commit(
    work: list[str],
    outcomes: dict[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    *,
    runtime: Runtime | None = None,
    tarball: bytes = b"",
    host_runtimes: Mapping[str, tuple[Runtime, bytes]] | None = None,
    printer: _Printer,
    applied: set[str],
    wait: float,
    jobs: int,
    echo: Echo,
) -> None:
    """Phases 3-6 of the package doc for the hosts in `work` (their plans are not no-ops).

    `host_runtimes` gives each host's wheelhouse and its tar (for its target); a host not in it
    gets `runtime` and `tarball`."""
    installs = {name: (host_runtimes or {}).get(name) or (runtime, tarball) for name in work}
    applied_at = apply_hosts(work, outcomes, manifests, states, ssh, installs=installs,
                             printer=printer, applied=applied, jobs=jobs)  # fmt: skip
    to_confirm, ends, results = confirm_changes(work, outcomes, manifests, ssh, applied_at,
                                                wait=wait, jobs=jobs, echo=echo)  # fmt: skip
    roll_back_failed(results, to_confirm, ends, outcomes, manifests, ssh=ssh, wait=wait, jobs=jobs,
                     echo=echo)  # fmt: skip
    commit_hosts(work, outcomes, manifests, states, ssh, applied=applied, jobs=jobs)


def _dry_run_diff(
    outcomes: Mapping[str, HostOutcome],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    stamps: Mapping[str, str] | str,
) -> str:
    """Fetch the deployed copies of the non-secret files that would change; diff them.
    `stamps` is each host's new runtime stamp (or one stamp for all)."""
    chunks = []
    for name, outcome in outcomes.items():
        plan = outcome.plan
        if plan is None or plan.noop:
            continue
        if plan.runtime:
            target = states[name].target
            what = f" (target {target.key})" if target else ""
            new = stamps if isinstance(stamps, str) else stamps[name]
            chunks.append(f"# {name}: runtime {states[name].stamp or 'none'} -> {new}{what}\n")
        for link in plan.start:
            chunks.append(f"# {name}: {link} is not running: would start it\n")
        for link in plan.removed:
            chunks.append(f"# {name}: {link} is no longer rendered: would stop and remove it\n")
        for link, why in sorted(plan.reload.items()):
            chunks.append(f"# {name}: hub {link}: {', '.join(why)}: would reload it (SIGHUP), "
                          "not restart it\n")  # fmt: skip
        for link, paths in sorted(plan.prune.items()):
            chunks += [f"# {name}: hub {link}: would delete {path}\n" for path in paths]
        current: dict[str, bytes | None] = {}
        readable = [f.path for f in plan.files if not f.secret and states[name].files.get(f.path)]
        if readable:
            result = ssh[name].run(
                f"tar -c -f - -C / {quote(*[p.lstrip('/') for p in readable])}", timeout=30
            )
            if result.returncode != 0:
                raise DeployError(
                    f"{name}: cannot read the deployed files for the diff (tar exited "
                    f"{result.returncode}: {result.error_text[-200:] or 'no message'})"
                )
            try:
                with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
                    for member in tar.getmembers():
                        handle = tar.extractfile(member)
                        if handle is not None:
                            current["/" + member.name] = handle.read()
            except tarfile.TarError as exc:
                raise DeployError(f"{name}: unreadable tar of the deployed files: {exc}") from exc
        present = [path for path, have in states[name].files.items() if have is not None]
        chunks.append(redacted_diff(name, plan, current, present))
    return "".join(chunks)
