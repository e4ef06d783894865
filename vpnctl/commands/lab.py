"""`vpnctl lab up|down`: build or remove a lab of namespaced test hosts with their own sshd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpnctl import nspawn
from vpnctl.lab import LabError, lab_down, lab_up

app = typer.Typer(help="Namespaced test hosts with sshd (needs root).", no_args_is_help=True)

DirOption = Annotated[Path, typer.Option("--dir", help="lab directory")]


@app.command("up")
def up(  # noqa: PLR0917 - typer passes every option by name
    clients: Annotated[int, typer.Option("--clients", "-n", help="number of client hosts")] = 2,
    directory: DirOption = Path("lab"),
    tag: Annotated[str, typer.Option(help="prefix of every namespace and link")] = "vlab",
    mgmt_net: Annotated[
        str | None, typer.Option("--mgmt-net", help="management /24 inside 198.18.0.0/15")
    ] = None,
    hub: Annotated[
        bool,
        typer.Option(
            "--hub/--links",
            help="join the clients to the server by one hub (one vpnd, one port) instead of "
            "one point-to-point link each (the default)",
        ),
    ] = False,
    wan: Annotated[
        str | None,
        typer.Option(
            "--wan",
            help="WAN emulator between clients and server, e.g. delay=10ms,loss=1%,"
            "up.rate=50mbit (up = clients -> server; see docs/architecture.md)",
        ),
    ] = None,
    stack: Annotated[
        str,
        typer.Option(
            help="ipv4 | dual | ipv6 for every host, or one per host, server first "
            "(dual,ipv6,ipv4): dual-stack and IPv6-only hosts"
        ),
    ] = "ipv4",
    systemd: Annotated[
        bool,
        typer.Option(
            "--systemd",
            help="boot every host as a systemd container (systemd-nspawn on a Debian rootfs "
            "built once per machine into /var/cache/vpnctl/rootfs): deploy installs units",
        ),
    ] = False,
    release: Annotated[
        str | None,
        typer.Option(
            "--release",
            help="with --systemd: the Debian release the hosts boot, for every host or one per "
            "host, server first (bullseye,bookworm): bullseye (Python 3.9), bookworm (3.11, "
            "the default), trixie (3.13); each release's rootfs is built once",
        ),
    ] = None,
) -> None:
    """Build a server and N clients; write inventory.yaml and ssh_config into the lab dir.

    The inventory joins them by one link per client (l1..lN), or with --hub by one hub
    `hub` on the server that serves all N clients."""
    try:
        state = lab_up(directory, clients=clients, tag=tag, mgmt_net=mgmt_net, hub=hub, wan=wan,
                       systemd=systemd, say=lambda line: typer.echo(line, err=True),
                       stack=stack, release=release)  # fmt: skip
    except LabError as exc:
        typer.echo(f"lab up: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"lab {state.tag} up in {state.directory} (management {state.mgmt_net})")
    for host in state.hosts:
        typer.echo(
            f"  {host.name:<10} ns {host.namespace:<16} ssh {host.ssh_ip:<15} wan "
            + " ".join(a for a in (host.wan_ip, host.wan_ip6) if a)
        )
    if state.wan_spec:
        wan_stats = Path(state.directory) / "wan.json"
        how = f"pid {state.wan_pid}, counters {wan_stats}" if state.wan_pid else "netem qdiscs"
        typer.echo(f"wan:       {state.wan_spec} ({how})")
    if state.systemd:
        typer.echo("hosts:     systemd containers (systemd-nspawn -b); each runs its own sshd")
        releases = sorted({h.release for h in state.hosts if h.release})
        if releases != [nspawn.SUITE]:
            typer.echo("releases:  " + ", ".join(f"{h.name} {h.release}" for h in state.hosts))
    typer.echo(f"inventory: {Path(state.directory) / 'inventory.yaml'}")
    typer.echo(f"ssh:       ssh -F {Path(state.directory) / 'ssh_config'} {state.hosts[0].name}")


@app.command("down")
def down(directory: DirOption = Path("lab")) -> None:
    """Remove every namespace, link, process and file the lab created."""
    try:
        removed = lab_down(directory)
    except LabError as exc:
        typer.echo(f"lab down: {exc}", err=True)
        raise typer.Exit(1) from exc
    for item in removed:
        if item.startswith("wan emulator"):
            typer.echo(item)
    typer.echo(f"lab in {directory} removed ({len(removed)} items)")
