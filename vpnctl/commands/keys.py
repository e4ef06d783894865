"""``vpnctl keys``: each link's key fingerprint and age, never the key; warns about old keys."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from vpnctl.keystore import format_age
from vpnctl.rotation import parse_age
from vpnctl.workspace import EXIT_FAILED, workspace

__all__ = ["main"]


def main(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of a table.")
    ] = False,
    max_age: Annotated[
        str | None,
        typer.Option(
            "--max-age",
            metavar="AGE",
            help="Warn about keys older than AGE (90d, 12h, 30m, 45s, 2w) [default: the "
            "inventory's defaults.key_max_age, else no warning].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List each link of the inventory (and each hub client, as <hub>.<client>) with its key's
    fingerprint, age and storage.

    The fingerprint is the same one `vpnd status` and the manifests show, so both ends of a
    link can be compared. A STAGED column shows a key waiting for `keygen --promote` (or a
    `vpnctl rotate` under way). The age is the creation time vpnctl recorded in the key's
    metadata; a key without metadata (made by hand) shows its file's mtime, marked "(mtime)".

    Keys older than --max-age (or the inventory's defaults.key_max_age) are marked OLD and
    a warning per key goes to stderr; the exit code stays 0 for them (a warning, like a
    linter's, not a failure: `--json` has `too_old` for scripts that want to act). Exit code 1
    when a link has no key yet.
    """
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    limit = parse_age(max_age, "--max-age") if max_age is not None else inventory.key_max_age
    if max_age is not None:
        limit_text = f"--max-age {max_age}"
    else:
        line = inventory.lines.get("defaults.key_max_age")
        limit_text = f"defaults.key_max_age ({ws.inventory_path}:{line})"
    store = ws.keystore()
    if store.root.exists():
        store.check_directory()
    now = time.time()
    rows = []
    for name in inventory.key_names():  # hub clients' keys are <hub>.<client>
        info = store.info(name) if store.root.exists() else None
        staged = store.info(name, staged=True) if store.root.exists() else None
        age = round(now - info.created) if info else None
        rows.append(
            {
                "link": name,
                "fingerprint": info.fingerprint if info else None,
                "age_seconds": age,
                "age_from": info.created_from if info else None,
                "too_old": age is not None and limit is not None and age > limit,
                "stored": ("encrypted" if info.encrypted else "plain") if info else None,
                "staged_fingerprint": staged.fingerprint if staged else None,
            }
        )
    if as_json:
        doc = {"keystore": str(store.root), "max_age_seconds": limit, "links": rows}
        typer.echo(json.dumps(doc, indent=2))
    else:
        table = [("LINK", "FINGERPRINT", "AGE", "STORED", "STAGED")]
        for row in rows:
            age_cell = "-"
            if row["age_seconds"] is not None:
                age_cell = format_age(row["age_seconds"])
                age_cell += " (mtime)" if row["age_from"] == "mtime" else ""
                age_cell += " OLD" if row["too_old"] else ""
            table.append(
                (
                    row["link"],
                    row["fingerprint"] or "(no key: run vpnctl keygen)",
                    age_cell,
                    row["stored"] or "-",
                    row["staged_fingerprint"] or "-",
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    old = [row for row in rows if row["too_old"]]
    for row in old:
        typer.echo(
            f"warning: key {row['link']} is {format_age(row['age_seconds'])} old, older than "
            f"{format_age(limit or 0)} ({limit_text}); rotate it: vpnctl rotate {row['link']}",
            err=True,
        )
    if old:
        names = " ".join(str(row["link"]) for row in old)
        typer.echo(
            f"warning: {len(old)} key(s) older than {format_age(limit or 0)}; "
            f"`vpnctl rotate --all --max-age {max_age or _age_text(limit or 0)}` rotates "
            f"them all ({names})",
            err=True,
        )
    if any(row["fingerprint"] is None for row in rows):
        raise typer.Exit(EXIT_FAILED)


def _age_text(seconds: float) -> str:
    """An age as `--max-age` reads it: whole days, hours, minutes, else seconds."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
