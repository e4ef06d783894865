"""``vpnctl``: the operator's typer app. Each command lives in ``vpnctl/commands/<name>.py``.

The app is deliberately small: global options (inventory, keystore and build paths) land in a
:class:`Workspace` on ``ctx.obj``; each command is a plain function registered flat with
:func:`register`, which turns any :class:`~vpnctl.inventory.UserError` into a message on
stderr and exit code 2, never a traceback.

Exit codes: 0 success; 1 the command ran and found a problem (``render --check`` mismatch,
``render --diff`` with changes); 2 a user error (bad inventory, missing key, bad option).

Adding a command: write ``vpnctl/commands/<name>.py`` with ``main(ctx: typer.Context, ...)``
(docstring = its help; ``workspace(ctx)`` gives the paths and the inventory), or with a typer
``app`` for a command group. ``deploy``, ``status`` and ``lab`` are picked up when present.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from vpnctl.inventory import (
    Inventory,
    UserError,
    allocate_hubs,
    allocate_tunnels,
    hub_networks,
    load_inventory,
)
from vpnctl.keystore import Keystore

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Workspace",
    "app",
    "main",
    "register",
    "workspace",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_INVENTORY = "inventory.yaml"
DEFAULT_KEYSTORE = "keystore"
DEFAULT_BUILD = "build"

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="vpnctl",
    help=(
        "Key, render, deploy and watch vpnd links described in an inventory.\n\n"
        "The usual flow, from the top of a checkout:\n\n"
        "  cp inventory.example.yaml inventory.yaml   # then edit hosts and links\n\n"
        "  vpnctl keygen            # one 256-bit key per link in keystore/\n\n"
        "  vpnctl render            # paired configs into build/<host>/\n\n"
        "  vpnctl render --check    # prove each pair mirrors\n\n"
        "Exit codes: 0 ok, 1 a check found a problem, 2 a user error (message on stderr)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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
        return resolved


def workspace(ctx: typer.Context) -> Workspace:
    """The :class:`Workspace` of the running command."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Workspace):  # a command invoked without the app callback
        return Workspace(Path(DEFAULT_INVENTORY), Path(DEFAULT_KEYSTORE), Path(DEFAULT_BUILD))
    return obj


def _user_errors(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UserError as error:
            typer.echo(f"vpnctl: {error}" if "\n" not in str(error) else str(error), err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("vpnctl: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def register(name: str, function: Callable[..., Any]) -> None:
    """Add ``function`` as the flat command ``vpnctl <name>``, with user-error handling."""
    app.command(name)(_user_errors(function))


@app.callback()
def _global_options(
    ctx: typer.Context,
    inventory: Annotated[
        Path,
        typer.Option(
            "-i",
            "--inventory",
            envvar="VPNCTL_INVENTORY",
            help="Inventory file (start from inventory.example.yaml).",
        ),
    ] = Path(DEFAULT_INVENTORY),
    keystore: Annotated[
        Path,
        typer.Option(
            "--keystore",
            envvar="VPNCTL_KEYSTORE",
            help="Keystore directory: link keys (0600) and tunnel address allocations.",
        ),
    ] = Path(DEFAULT_KEYSTORE),
    build: Annotated[
        Path,
        typer.Option(
            "--build", envvar="VPNCTL_BUILD", help="Where `render` writes build/<host>/ trees."
        ),
    ] = Path(DEFAULT_BUILD),
) -> None:
    """Global options go before the command: `vpnctl -i lab.yaml render`."""
    ctx.obj = Workspace(inventory, keystore, build)


def _commands() -> None:
    from vpnctl.commands import keygen, keys, render  # noqa: PLC0415 - commands import us

    register("keygen", keygen.main)
    register("keys", keys.main)
    register("render", render.main)
    for name in ("deploy", "status", "lab"):  # added by later work; absent ones are skipped
        try:
            module = __import__(f"vpnctl.commands.{name}", fromlist=["main"])
        except ModuleNotFoundError as exc:
            if exc.name != f"vpnctl.commands.{name}":
                raise
            continue
        if hasattr(module, "main"):
            register(name, module.main)
        else:  # a command group (`vpnctl lab up|down`) brings its own typer app
            app.add_typer(module.app, name=name)


_commands()


def main() -> None:
    """Console entry point (``vpnctl``)."""
    app(prog_name="vpnctl")
