"""``vpnctl deploy HOST… | --all``: ship runtime, configs and keys; restart only what changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vpnctl.deploy import (
    DEFAULT_JOBS,
    DEFAULT_WAIT,
    DeployError,
    DeployReport,
    deploy,
    load_manifest,
)
from vpnctl.hostdata import clean_text
from vpnctl.inventory import Inventory, UserError
from vpnctl.keystore import Keystore
from vpnctl.rendering import changed_paths
from vpnctl.workspace import EXIT_FAILED, PassphraseEnv, PassphraseFile, workspace

if TYPE_CHECKING:
    from vpnctl.workspace import Workspace

__all__ = ["deploy_json", "format_recap", "main", "preflight", "recap"]


def main(  # noqa: PLR0917 - typer maps each option to a parameter
    ctx: typer.Context,
    hosts: Annotated[list[str] | None, typer.Argument(help="Hosts to deploy to.")] = None,
    all_hosts: Annotated[bool, typer.Option("--all", help="Deploy to every host.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print a unified diff of what would change (keys redacted) and touch nothing.",
        ),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(help="Seconds each changed link has to come up before it is rolled back."),
    ] = DEFAULT_WAIT,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Hosts worked on at once.")] = (
        DEFAULT_JOBS
    ),
    passphrase_env: PassphraseEnv = None,
    passphrase_file: PassphraseFile = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON document (docs/json.md): each host's plan and result; progress "
            "goes to stderr.",
        ),
    ] = False,
) -> None:
    """Deploy the rendered build (`vpnctl render`) to hosts over the system ssh client.

    Ships the runtime (a wheelhouse: hosts need no internet; skipped when the installed
    version matches), the configs and the keys (0600, on stdin only), then (re)starts only the
    links whose files changed. Each changed link must come up at both ends with the same key
    fingerprint within --wait seconds, else its previous files and daemon are restored.
    Exit 1 when a host failed or a link was rolled back.
    """
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    if all_hosts and hosts:
        raise UserError("give host names or --all, not both")
    names = [h.name for h in inventory.hosts] if all_hosts else list(hosts or [])
    store = preflight(ws, inventory, names, passphrase_env, passphrase_file)
    report = deploy(
        inventory,
        names,
        ws.build_path,
        store,
        dry_run=dry_run,
        wait=wait,
        jobs=jobs,
        passphrase=None,
        echo=_progress if as_json else _echo,
    )
    if as_json:
        typer.echo(json.dumps(deploy_json(report, dry_run=dry_run), indent=2, sort_keys=True))
        if not report.ok:
            raise typer.Exit(EXIT_FAILED)
        return
    if dry_run:
        if report.diff or report.ok:
            _echo(report.diff or "no changes", nl=not report.diff)
    else:
        _summary(report)
    rows = recap(report, dry_run=dry_run)
    _echo(format_recap(rows, dry_run=dry_run), nl=False)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _echo(text: str, *, nl: bool = True) -> None:
    """Print a line that may hold text from a host (ssh errors, deployed files in a diff):
    control characters are shown as escapes, never sent to the terminal raw."""
    typer.echo(clean_text(text, keep_newlines=True), nl=nl)


def _progress(text: str) -> None:
    """Progress lines while --json keeps stdout for the document."""
    typer.echo(clean_text(text, keep_newlines=True), err=True)


def deploy_json(report: DeployReport, *, dry_run: bool) -> dict[str, Any]:
    """The document of ``deploy --json`` (schema: docs/json/deploy.schema.json)."""
    rows = {row["host"]: row for row in recap(report, dry_run=dry_run)}
    hosts = []
    for name, outcome in report.outcomes.items():
        plan = outcome.plan
        hosts.append(
            {
                **rows[name],
                "error": clean_text(outcome.error) if outcome.error else None,
                "plan": None
                if plan is None
                else {
                    "runtime": plan.runtime,
                    "changed": plan.changed,
                    "start": plan.start,
                    "removed": plan.removed,
                    "unchanged": plan.unchanged,
                },
                "confirmed": sorted(outcome.confirmed),
                "waiting": {k: clean_text(v) for k, v in sorted(outcome.waiting.items())},
                "rolled_back": {k: clean_text(v) for k, v in sorted(outcome.rolled_back.items())},
                "skipped": {k: clean_text(v) for k, v in sorted(outcome.skipped.items())},
            }
        )
    return {
        "version": 1,
        "dry_run": dry_run,
        "ok": report.ok,
        "hosts": hosts,
        "diff": clean_text(report.diff, keep_newlines=True) if dry_run else None,
    }


class _UnlockedKeystore(Keystore):
    """The keystore with the keys the pre-flight loaded (and checked) once, so deploy neither
    asks for nor derives a passphrase again per host."""

    def __init__(
        self, root: Path, keys: dict[str, bytes], staged: dict[str, bytes] | None = None
    ) -> None:
        super().__init__(root)
        self._keys = keys
        self._staged = staged or {}  # the new keys of rotations under way (`vpnctl rotate`)

    def load(self, link: str, *, passphrase: bytes | None = None, staged: bool = False) -> bytes:
        """The key the pre-flight loaded for ``link``, else the keystore's."""
        if not staged and link in self._keys:
            return self._keys[link]
        if staged and link in self._staged:
            return self._staged[link]
        return super().load(link, passphrase=passphrase, staged=staged)


def preflight(
    ws: Workspace,
    inventory: Inventory,
    names: list[str],
    passphrase_env: str | None,
    passphrase_file: Path | None,
    *,
    passphrase: bytes | None = None,
) -> Keystore:
    """Everything deploy can check locally, once, before it contacts any host (a UserError,
    exit 2, with one message): host names, the keystore, build/ matching the inventory and the
    keystore (else "run vpnctl render"), the passphrase (never prompted for without a terminal)
    and every key file of the links deployed. A ``passphrase`` already read (`vpnctl rotate`
    deploys several times) is used instead of reading one again."""
    from vpnctl.commands.keygen import read_passphrase  # noqa: PLC0415
    from vpnctl.commands.render import rendered  # noqa: PLC0415

    known = [h.name for h in inventory.hosts]
    unknown = [name for name in dict.fromkeys(names) if name not in known]
    if unknown:
        raise UserError(
            f"{ws.inventory_path}: no host named {', '.join(unknown)}; "
            f"the hosts are: {', '.join(known)}"
        )
    if not names:
        raise UserError(f"name at least one host, or give --all (hosts: {', '.join(known)})")
    manifests = [load_manifest(ws.build_path, name) for name in names]  # "run vpnctl render"
    store = ws.keystore()
    store.check_directory()
    _, _, files = rendered(ws, persist=False)
    stale = changed_paths(files, ws.build_path)
    if stale:
        shown = ", ".join(f"{ws.build_path}/{p}" for p in stale[:3])
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise DeployError(
            f"{ws.build_path}/ does not match {ws.inventory_path} and {store.root}/ "
            f"({len(stale)} file(s) differ: {shown}{more}); run `vpnctl render` first"
        )
    links = sorted({name for manifest in manifests for name in _key_names(manifest)})
    rotating = [link for link in links if store.rotation_phase(link) is not None
                and store.has_key(link, staged=True)]  # fmt: skip
    if passphrase is None and (any(store.is_encrypted(link) for link in links) or any(
        store.key_path(link, staged=True).suffix == ".enc" for link in rotating
    )):  # fmt: skip
        passphrase = read_passphrase(passphrase_env, passphrase_file, prompt=True, confirm=False)
    keys = {link: store.load(link, passphrase=passphrase) for link in links}
    staged = {link: store.load(link, passphrase=passphrase, staged=True) for link in rotating}
    return _UnlockedKeystore(store.root, keys, staged)


def _key_names(manifest: dict) -> list[str]:
    """The keystore keys a host's manifest needs: a link's own (``key``, else its name), and
    for a hub one per client (``<hub>.<client>``)."""
    names = []
    for link, entry in manifest["links"].items():
        if entry.get("role") == "hub":
            names += [str(client["key"]) for client in entry.get("clients", {}).values()]
        else:
            names.append(str(entry.get("key", link)))
    return names


RESULTS = ("ok", "changed", "failed", "unreachable")


def _host_error(host: str, error: str) -> str:
    """An outcome's error without the host name and the word "unreachable" the recap shows."""
    return error.removeprefix(f"{host}: ").removeprefix("unreachable: ")


def recap(report: DeployReport, *, dry_run: bool) -> list[dict[str, Any]]:
    """One entry per host, as `ansible-playbook` ends: ``result`` is ok (nothing to do),
    changed (something was -- or with --dry-run would be -- changed), failed (an error or a
    rollback) or unreachable; ``detail`` says what, in a few words."""
    rows = []
    for name, outcome in report.outcomes.items():
        plan = outcome.plan
        detail: list[str] = []
        if outcome.error is not None:
            result = "unreachable" if outcome.unreachable else "failed"
            detail.append(_host_error(name, outcome.error))
        elif outcome.rolled_back:
            result = "failed"
        elif plan is None or plan.noop:
            result = "ok"
        else:
            result = "changed"
        if plan is not None and outcome.error is None and not plan.noop:
            if dry_run:
                detail.append(f"would (re)start {', '.join(plan.restarts) or 'nothing'}")
            else:
                detail += [f"{link} rolled back" for link in sorted(outcome.rolled_back)]
                detail += [f"{link} confirmed" for link in sorted(outcome.confirmed)]
                detail += [f"{link} not confirmed" for link in sorted(outcome.waiting)]
        if plan is not None and outcome.skipped:  # also when nothing else was left to do
            detail += [f"{link} {why}" for link, why in sorted(outcome.skipped.items())]
            if plan.removed:
                detail.append(f"{'would stop' if dry_run else 'stopped'} {', '.join(plan.removed)}")
        rows.append({"host": name, "result": result, "detail": clean_text("; ".join(detail))})
    return rows


def format_recap(rows: list[dict[str, Any]], *, dry_run: bool) -> str:
    """The recap table and its count line; never "no changes" when a host failed."""
    width = max([len(r["host"]) for r in rows] + [4])
    lines = ["", "RECAP" + (" (dry run: nothing was changed)" if dry_run else "")]
    for row in rows:
        lines.append(f"{row['host']:<{width}}  {row['result']:<11}  {row['detail']}".rstrip())
    counts = {result: sum(r["result"] == result for r in rows) for result in RESULTS}
    lines.append(f"{len(rows)} host(s): " + ", ".join(f"{counts[r]} {r}" for r in RESULTS))
    return "\n".join(lines) + "\n"


def _summary(report: DeployReport) -> None:
    for name, outcome in report.outcomes.items():
        for link, why in sorted(outcome.rolled_back.items()):
            _echo(f"{name}: {link} ROLLED BACK: {why}")
        for link, why in sorted(outcome.waiting.items()):
            _echo(f"{name}: {link} deployed, not confirmed: {why}")
    confirmed = sorted({link for o in report.outcomes.values() for link in o.confirmed})
    if confirmed:
        _echo(f"confirmed up at both ends: {', '.join(confirmed)}")
