"""What every ``vpnctl`` command shares: the :class:`Workspace` (the paths from the global
options), :func:`workspace` to get it in a command, and the exit codes.

It lives apart from :mod:`vpnctl.cli` so the commands (``vpnctl/commands/*.py``), which
:mod:`vpnctl.cli` imports to register them, import it at the top without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from vpnctl.inventory import (
    Inventory,
    allocate_hubs,
    allocate_tunnels,
    hub_networks,
    load_inventory,
)
from vpnctl.keystore import Keystore
from vpnctl.pool6 import allocate_ipv6

#: The options of the commands that unlock encrypted keys to ship them (deploy, rotate).
PassphraseEnv = Annotated[
    str | None,
    typer.Option("--passphrase-env", metavar="VAR", help="Passphrase of encrypted keys."),
]
PassphraseFile = Annotated[
    Path | None,
    typer.Option("--passphrase-file", metavar="FILE", help="Passphrase of encrypted keys."),
]

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Workspace",
    "beside",
    "workspace",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_INVENTORY = "inventory.yaml"
DEFAULT_KEYSTORE = "keystore"
DEFAULT_BUILD = "build"


@dataclass(frozen=True)
class Workspace:
    """The paths every command works with, from the global options."""

    inventory_path: Path
    keystore_path: Path
    build_path: Path

    def load_inventory(self) -> Inventory:
        """The validated inventory; tunnel addresses may still be unallocated."""
        return load_inventory(self.inventory_path)

    def keystore(self) -> Keystore:
        """The keystore (it may not exist yet)."""
        return Keystore(self.keystore_path)

    def allocated(self, inventory: Inventory, *, persist: bool) -> Inventory:
        """``inventory`` with every tunnel address set from the pool and the keystore's record.

        With ``persist``, new allocations are recorded in ``keystore/allocations.json`` so
        later runs keep them (commands that only look, like ``render --check``, pass False).
        """
        keystore = self.keystore()
        record = keystore.load_allocations()
        hub_record = keystore.load_hub_allocations()
        resolved, new_record = allocate_tunnels(
            inventory, record, str(keystore.allocations_path), hub_networks(inventory, hub_record)
        )
        resolved, new_hubs = allocate_hubs(resolved, hub_record)
        if persist and (new_record != record or new_hubs != hub_record):
            keystore.save_allocations(new_record, new_hubs)
        record6 = keystore.load_allocations6()
        resolved, new_record6 = allocate_ipv6(resolved, record6, str(keystore.allocations_path))
        if persist and new_record6 != record6:
            keystore.save_allocations6(new_record6)
        return resolved


def workspace(ctx: typer.Context) -> Workspace:
    """The :class:`Workspace` of the running command."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Workspace):  # a command invoked without the app callback
        return Workspace(Path(DEFAULT_INVENTORY), Path(DEFAULT_KEYSTORE), Path(DEFAULT_BUILD))
    return obj


def beside(inventory: Path, name: str) -> Path:
    """``name`` in the inventory's directory: keystore/ and build/ follow the inventory, so
    `vpnctl -i ../site/inventory.yaml keygen` never makes a new keystore where it is run."""
    return inventory.parent / name
