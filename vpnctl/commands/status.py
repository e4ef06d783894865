"""``vpnctl status [HOST…] [--json|--prometheus] [--wide]``: every link from both ends, in
parallel over ssh."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import IO, Annotated

import typer

from vpnctl.fleetstatus import (
    DEFAULT_JOBS,
    DEFAULT_TIMEOUT,
    FleetStatus,
    collect,
    format_table,
)
from vpnctl.inventory import UserError
from vpnctl.workspace import EXIT_FAILED, workspace

__all__ = ["main", "table_width", "use_color"]


def use_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def table_width(stream: IO[str], *, wide: bool) -> int | None:
    """The width the table must fit: $COLUMNS, else the terminal's; None (no limit) with
    --wide or when the output is not a terminal (a pipe or a file gets every column)."""
    if wide:
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if stream.isatty():
        return shutil.get_terminal_size().columns
    return None


class _Live:
    """On a terminal, the table as it is so far, redrawn in place each time a host answers
    (hosts not yet answered show ``asking``), so nothing waits silently for the slowest host;
    erased before the final table is printed. Anywhere else it does nothing."""

    def __init__(self, *, enabled: bool, width: int | None, color: bool) -> None:
        self.enabled = enabled
        self.width = width
        self.color = color
        self.lines = 0

    def __call__(self, partial: FleetStatus) -> None:
        if not self.enabled:
            return
        text = format_table(partial, width=self.width, color=self.color)
        self.clear()
        sys.stdout.write(text)
        sys.stdout.flush()
        self.lines = text.count("\n")

    def clear(self) -> None:
        if self.enabled and self.lines:
            sys.stdout.write(f"\x1b[{self.lines}F\x1b[J")  # up to the first line, erase below
            sys.stdout.flush()
            self.lines = 0


def main(  # noqa: PLR0917 - typer maps each option to a parameter
    ctx: typer.Context,
    hosts: Annotated[
        list[str] | None, typer.Argument(help="Hosts to ask (default: all); peers are added.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document, for scripts.")
    ] = False,
    prometheus: Annotated[
        bool,
        typer.Option(
            "--prometheus",
            help="Every end's figures in the Prometheus text format (exit 0: the state is in "
            "the metrics).",
        ),
    ] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column, whatever the terminal's width.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a silent host is shown as unreachable.")
    ] = DEFAULT_TIMEOUT,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Hosts asked at once.")] = DEFAULT_JOBS,
) -> None:
    """Show each link's two ends: state, peer, uptime, keepalive RTT, bytes each way, key
    fingerprint and key age; below the table, why each link is down, said once.

    The table fits the terminal (least telling columns dropped first; --wide shows all),
    colours UP/DOWN on a terminal unless NO_COLOR is set; on a terminal the table is drawn as
    hosts answer. Exit 1 when any link is not up at both ends."""

    if as_json and prometheus:
        raise UserError("give either --json or --prometheus, not both")
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    out = sys.stdout
    width, color = table_width(out, wide=wide), use_color(out)
    live = _Live(enabled=out.isatty() and not (as_json or prometheus), width=width, color=color)
    try:
        status = collect(
            inventory, ws.build_path, hosts or [], timeout=timeout, jobs=jobs, on_answer=live
        )
    finally:
        live.clear()
    if prometheus:
        typer.echo(status.prometheus(), nl=False)
        return
    if as_json:
        typer.echo(json.dumps(status.to_json(), indent=2, sort_keys=True))
    else:
        typer.echo(format_table(status, width=width, color=color), nl=False)
    if not status.all_up:
        raise typer.Exit(EXIT_FAILED)
