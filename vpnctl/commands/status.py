"""``vpnctl status [HOST…] [--json]``: every link from both ends, in parallel over ssh."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from vpnctl.fleetstatus import DEFAULT_JOBS, DEFAULT_TIMEOUT, collect, format_table

__all__ = ["main"]


def main(
    ctx: typer.Context,
    hosts: Annotated[
        list[str] | None, typer.Argument(help="Hosts to ask (default: all); peers are added.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document, for scripts.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a silent host is shown as unreachable.")
    ] = DEFAULT_TIMEOUT,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Hosts asked at once.")] = DEFAULT_JOBS,
) -> None:
    """Show each link's two ends: state and why, peer, uptime, keepalive RTT, bytes each way,
    key fingerprint and key age. Exit 1 when any link is not up at both ends."""
    from vpnctl.cli import EXIT_FAILED, workspace  # noqa: PLC0415 - vpnctl.cli imports us

    ws = workspace(ctx)
    inventory = ws.load_inventory()
    status = collect(inventory, ws.build_path, hosts or [], timeout=timeout, jobs=jobs)
    if as_json:
        typer.echo(json.dumps(status.to_json(), indent=2, sort_keys=True))
    else:
        typer.echo(format_table(status), nl=False)
    if not status.all_up:
        raise typer.Exit(EXIT_FAILED)
