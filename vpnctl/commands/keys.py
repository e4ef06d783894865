"""``vpnctl keys``: each link's key fingerprint and age, never the key."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from vpnctl.keystore import format_age
from vpnctl.workspace import EXIT_FAILED, workspace

__all__ = ["main"]


def main(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of a table.")
    ] = False,
) -> None:
    """List each link of the inventory (and each hub client, as <hub>.<client>) with its key's
    fingerprint, age and storage.

    The fingerprint is the same one `vpnd status` and the manifests show, so both ends of a
    link can be compared. A STAGED column shows a key waiting for `keygen --promote`.
    Exit code 1 when a link has no key yet.
    """
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    store = ws.keystore()
    if store.root.exists():
        store.check_directory()
    now = time.time()
    rows = []
    for name in inventory.key_names():  # hub clients' keys are <hub>.<client>
        info = store.info(name) if store.root.exists() else None
        staged = store.info(name, staged=True) if store.root.exists() else None
        rows.append(
            {
                "link": name,
                "fingerprint": info.fingerprint if info else None,
                "age_seconds": round(now - info.created) if info else None,
                "stored": ("encrypted" if info.encrypted else "plain") if info else None,
                "staged_fingerprint": staged.fingerprint if staged else None,
            }
        )
    if as_json:
        typer.echo(json.dumps({"keystore": str(store.root), "links": rows}, indent=2))
    else:
        table = [("LINK", "FINGERPRINT", "AGE", "STORED", "STAGED")]
        for row in rows:
            table.append(
                (
                    row["link"],
                    row["fingerprint"] or "(no key: run vpnctl keygen)",
                    format_age(row["age_seconds"]) if row["age_seconds"] is not None else "-",
                    row["stored"] or "-",
                    row["staged_fingerprint"] or "-",
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    if any(row["fingerprint"] is None for row in rows):
        raise typer.Exit(EXIT_FAILED)
