"""``vpnctl deploy HOST… | --all``: ship runtime, configs and keys; restart only what changed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpnctl.deploy import DEFAULT_JOBS, DEFAULT_WAIT, deploy
from vpnctl.inventory import UserError

__all__ = ["main"]


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
    passphrase_env: Annotated[
        str | None,
        typer.Option("--passphrase-env", metavar="VAR", help="Passphrase of encrypted keys."),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option("--passphrase-file", metavar="FILE", help="Passphrase of encrypted keys."),
    ] = None,
) -> None:
    """Deploy the rendered build (`vpnctl render`) to hosts over the system ssh client.

    Ships the runtime (a wheelhouse: hosts need no internet; skipped when the installed
    version matches), the configs and the keys (0600, on stdin only), then (re)starts only the
    links whose files changed. Each changed link must come up at both ends with the same key
    fingerprint within --wait seconds, else its previous files and daemon are restored.
    Exit 1 when a host failed or a link was rolled back.
    """
    from vpnctl.cli import EXIT_FAILED, workspace  # noqa: PLC0415 - vpnctl.cli imports us
    from vpnctl.commands.keygen import read_passphrase  # noqa: PLC0415

    ws = workspace(ctx)
    inventory = ws.load_inventory()
    if all_hosts and hosts:
        raise UserError("give host names or --all, not both")
    names = [h.name for h in inventory.hosts] if all_hosts else list(hosts or [])
    store = ws.keystore()
    store.check_directory()
    passphrase = None
    if any(store.is_encrypted(link.name) for link in inventory.links if store.has_key(link.name)):
        passphrase = read_passphrase(passphrase_env, passphrase_file, prompt=True, confirm=False)
    report = deploy(
        inventory,
        names,
        ws.build_path,
        store,
        dry_run=dry_run,
        wait=wait,
        jobs=jobs,
        passphrase=passphrase,
        echo=typer.echo,
    )
    if dry_run:
        typer.echo(report.diff or "no changes", nl=not report.diff)
    else:
        _summary(report)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def _summary(report: object) -> None:
    from vpnctl.deploy import DeployReport  # noqa: PLC0415

    assert isinstance(report, DeployReport)  # noqa: S101
    for name, outcome in report.outcomes.items():
        if outcome.error:
            typer.echo(f"{name}: FAILED: {outcome.error}")
        for link, why in sorted(outcome.rolled_back.items()):
            typer.echo(f"{name}: {link} ROLLED BACK: {why}")
        for link, why in sorted(outcome.waiting.items()):
            typer.echo(f"{name}: {link} deployed, not confirmed: {why}")
    confirmed = sorted({link for o in report.outcomes.values() for link in o.confirmed})
    if confirmed:
        typer.echo(f"confirmed up at both ends: {', '.join(confirmed)}")
