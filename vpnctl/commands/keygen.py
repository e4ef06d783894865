"""``vpnctl keygen``: one 256-bit key per link; stage and promote replacements."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from vpnctl.keystore import KeyInfo, KeystoreError
from vpnctl.workspace import workspace

__all__ = ["can_prompt", "main", "read_passphrase"]


def can_prompt() -> bool:
    """True when a person can be asked: standard input is a terminal. Without one vpnctl
    never prompts (a script would hang or get getpass's warning and "Aborted!")."""
    return sys.stdin is not None and sys.stdin.isatty()


def read_passphrase(
    env: str | None, file: Path | None, *, prompt: bool, confirm: bool
) -> bytes | None:
    """The passphrase from ``$env``, the first line of ``file``, or a prompt (None: no
    encryption). Never echoed, never taken from the command line itself."""
    if env is not None and file is not None:
        raise KeystoreError("give either --passphrase-env or --passphrase-file, not both")
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise KeystoreError(f"--passphrase-env {env}: the variable is unset or empty")
        return value.encode()
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise KeystoreError(f"{file}: cannot read passphrase file: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise KeystoreError(f"{file}: the passphrase file is empty")
        return lines[0].encode()
    if prompt:
        if not can_prompt():
            raise KeystoreError(
                "a passphrase is needed and there is no terminal to ask it on: "
                "give --passphrase-env VAR or --passphrase-file FILE"
            )
        value = typer.prompt(
            "Keystore passphrase", hide_input=True, confirmation_prompt=confirm, err=True
        )
        if not value:
            raise KeystoreError("an empty passphrase protects nothing")
        return str(value).encode()
    return None


def main(
    ctx: typer.Context,
    *,
    rotate: Annotated[
        str | None,
        typer.Option(
            "--rotate",
            metavar="LINK",
            help="Stage a new key for LINK beside the current one (which stays in use).",
        ),
    ] = None,
    promote: Annotated[
        str | None,
        typer.Option(
            "--promote",
            metavar="LINK",
            help="Make LINK's staged key current; the old key is kept as <link>.retired-<UTC>.",
        ),
    ] = None,
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="Encrypt new keys at rest (prompts for a passphrase).")
    ] = False,
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            "--passphrase-env", metavar="VAR", help="Encrypt with the passphrase in $VAR."
        ),
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            metavar="FILE",
            help="Encrypt with the passphrase on the first line of FILE.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document (docs/json.md) instead of lines.")
    ] = False,
) -> None:
    """Create a key for every link of the inventory that has none, and one per hub client
    (named <hub>.<client>).

    Keys live in the keystore directory (0700), one file per link (0600, created with
    O_EXCL). An existing key is never overwritten or regenerated: running keygen again
    changes nothing. Keygen also records the tunnel addresses handed out from the pool.

    Rotation: `--rotate LINK` stages a new key; `render` and `deploy` keep using the current
    one until `--promote LINK`. With --encrypt (or a passphrase option) new keys are stored
    encrypted (scrypt + ChaCha20-Poly1305); `keys` and `render` never need the passphrase.
    """
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    store = ws.keystore()
    if rotate is not None and promote is not None:
        raise KeystoreError("give either --rotate or --promote, not both")
    key_names = inventory.key_names()
    for option, link in (("--rotate", rotate), ("--promote", promote)):
        if link is not None and link not in key_names:
            names = ", ".join(key_names)
            raise KeystoreError(f"{option} {link}: no such link in {ws.inventory_path} ({names})")
    done: list[dict[str, object]] = []

    def report(action: str, info: KeyInfo, line: str) -> None:
        entry = {"link": info.link, "action": action, "fingerprint": info.fingerprint}
        done.append({**entry, "encrypted": info.encrypted})
        if not as_json:
            typer.echo(line)

    def finish() -> None:
        if as_json:
            doc = {"version": 1, "keystore": str(store.root), "keys": done}
            typer.echo(json.dumps(doc, indent=2, sort_keys=True))

    if promote is not None:
        info = store.promote(promote)
        line = f"promoted {promote}  {info.fingerprint}  (now current; re-render and deploy)"
        report("promoted", info, line)
        return finish()
    wants_encryption = encrypt or passphrase_env is not None or passphrase_file is not None
    store.create()
    if rotate is not None:
        current = store.info(rotate)
        staged_info = store.info(rotate, staged=True)
        if staged_info is not None:
            raise KeystoreError(
                f"{staged_info.path}: {rotate!r} already has a staged key "
                f"({staged_info.fingerprint}); make it current with `vpnctl keygen --promote "
                f"{rotate}`, or discard it with `rm {store.root}/{rotate}.next.*` and rotate again"
            )
        passphrase = read_passphrase(
            passphrase_env, passphrase_file, prompt=wants_encryption, confirm=True
        )
        info = store.generate(rotate, passphrase=passphrase, staged=True)
        beside = f" beside {current.fingerprint}" if current else ""
        report("staged", info, f"staged  {rotate}  {info.fingerprint}{beside}; "
               f"`vpnctl keygen --promote {rotate}` makes it current")  # fmt: skip
        return finish()
    missing = [name for name in key_names if not store.has_key(name)]
    passphrase = (
        read_passphrase(passphrase_env, passphrase_file, prompt=wants_encryption, confirm=True)
        if missing
        else None
    )
    width = max(len(name) for name in key_names)
    for name in key_names:  # links, then one key per hub client: <hub>.<client>
        if name in missing:
            info = store.generate(name, passphrase=passphrase)
            action = "created"
        else:
            info = store.info(name)
            action = "kept"
        assert info is not None  # noqa: S101 - has_key/generate guarantee a key
        note = "  (encrypted)" if info.encrypted else ""
        report(action, info, f"{action:<8}{name:<{width}}  {info.fingerprint}{note}")
    ws.allocated(inventory, persist=True)
    return finish()
