"""``vpnctl render``: paired vpnd configs into build/<host>/, --check and --diff."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vpnctl.inventory import Inventory, UserError
from vpnctl.rendering import (
    RenderError,
    changed_paths,
    check_build,
    diff_build,
    render,
    write_build,
)
from vpnctl.rotation import session_keys
from vpnctl.workspace import EXIT_FAILED, workspace
from vpnd_runtime.cli import check_config
from vpnd_runtime.config import ConfigError

if TYPE_CHECKING:
    from vpnctl.workspace import Workspace

__all__ = ["main", "rendered", "vpnd_check"]


def rendered(ws: Workspace, *, persist: bool) -> tuple[Inventory, dict[str, str], dict[str, bytes]]:
    """What `vpnctl render` would write now: (allocated inventory, link -> the fingerprint of
    the key its session should use -- the current key computed from the key file, or during a
    `vpnctl rotate` the phase's session key --, build-relative path -> bytes). `deploy` compares
    it with build/ to refuse a stale build. With ``persist`` new tunnel allocations are
    recorded."""
    inventory = ws.load_inventory()
    store = ws.keystore()
    store.check_directory()
    missing = [name for name in inventory.key_names() if not store.has_key(name)]
    if missing:
        raise RenderError(
            f"{store.root}: no key for link(s) {', '.join(missing)}; run `vpnctl keygen` first"
        )
    fingerprints = {}
    for name in inventory.key_names():
        info = store.info(name)
        assert info is not None  # noqa: S101 - has_key() was checked above
        fingerprints[name] = info.fingerprint
    rotations = store.rotations(inventory.key_names())
    sessions = session_keys(fingerprints, rotations)
    inventory = ws.allocated(inventory, persist=persist)
    return inventory, sessions, render(inventory, fingerprints, rotations)


def vpnd_check(build: Path, files: Mapping[str, bytes]) -> list[str]:
    """Run ``vpnd --check --no-key`` (in-process: the same function) on every rendered config
    present under ``build``; one problem line per config it refuses."""
    problems = []
    for rel in sorted(files):
        path = build / rel
        if rel.split("/", 1)[-1].startswith("etc/vpnd/") and rel.endswith(".conf"):
            if not path.exists():
                continue  # check_build reports a missing file
            try:
                check_config(str(path), key=False)
            except ConfigError as exc:
                problems.append(f"vpnd --check --no-key: {exc}")
    return problems


def main(
    ctx: typer.Context,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Prove that the last render mirrors (addresses swapped, same port, transport, "
            "key, keepalive, compression) and is up to date; exit 1 if not.",
        ),
    ] = False,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff", help="Show what a render would change (unified diff); exit 1 if anything."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document (docs/json.md) instead of lines.")
    ] = False,
) -> None:
    """Render each link's server and client configs (and systemd units) into build/<host>/.

    Every rendered config passes vpnd's own parser; the output is byte-for-byte the same for
    the same inventory and keys. build/<host>/manifest.json lists each file with its sha256,
    the key path on the host and the key's fingerprint (keys themselves are never rendered:
    `deploy` copies them from the keystore). Tunnel addresses left out of the inventory are
    allocated from the pool and recorded in the keystore.
    """
    if check and diff:
        raise UserError("give either --check or --diff, not both")
    ws = workspace(ctx)
    inventory, fingerprints, files = rendered(ws, persist=not (check or diff))
    build = ws.build_path
    if diff:
        text = diff_build(files, build)
        if as_json:
            doc = {"version": 1, "build": str(build), "changed": changed_paths(files, build),
                   "diff": text}  # fmt: skip
            typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            typer.echo(text, nl=False)
        if text:
            raise typer.Exit(EXIT_FAILED)
        return
    if check:
        result = check_build(inventory, fingerprints, build, files)
        result.problems.extend(vpnd_check(build, files))
        if as_json:
            doc = {"version": 1, "build": str(build), "ok": result.ok,
                   "verified": result.verified, "problems": result.problems}  # fmt: skip
            typer.echo(json.dumps(doc, indent=2, sort_keys=True))
            if not result.ok:
                raise typer.Exit(EXIT_FAILED)
            return
        for line in result.verified:
            typer.echo(f"ok    {line}")
        for line in result.problems:
            typer.echo(f"FAIL  {line}")
        if not result.ok:
            typer.echo(f"{len(result.problems)} problem(s) in {build}/", err=True)
            raise typer.Exit(EXIT_FAILED)
        if inventory.hubs:
            clients = sum(len(hub.clients) for hub in inventory.hubs)
            typer.echo(
                f"all {len(inventory.links)} link(s) mirror and all {clients} hub client(s) pair "
                f"with their hub; {build}/ is up to date"
            )
            return
        typer.echo(f"all {len(result.verified)} link(s) mirror; {build}/ is up to date")
        return
    changes = write_build(files, build)
    problems = vpnd_check(build, files)
    if problems:  # cannot happen unless render and the runtime disagree: say so loudly
        raise RenderError("\n".join(problems))
    hosts = len(inventory.hosts)
    links = len(inventory.links)
    if as_json:
        doc = {"version": 1, "build": str(build), "hosts": hosts, "links": links,
               "changes": [{"action": c.action, "path": c.path} for c in changes]}  # fmt: skip
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for change in changes:
        typer.echo(f"{change.action:<8}{build}/{change.path}")
    summary = f"{len(changes)} file(s) changed" if changes else "no changes"
    if inventory.hubs:
        clients = sum(len(hub.clients) for hub in inventory.hubs)
        hubs = f" and {len(inventory.hubs)} hub(s) with {clients} client(s)"
        typer.echo(f"rendered {links} link(s){hubs} for {hosts} host(s) into {build}/: {summary}")
        return
    typer.echo(f"rendered {links} link(s) for {hosts} host(s) into {build}/: {summary}")
