"""``vpnctl``: the operator's typer app. Each command lives in ``vpnctl/commands/<name>.py``.

The app is deliberately small: global options (inventory, keystore and build paths) land in a
:class:`Workspace` on ``ctx.obj``; each command is a plain function registered flat with
:func:`register`, which turns any :class:`~vpnctl.inventory.UserError` into a message on
stderr and exit code 2, never a traceback.

Exit codes: 0 success; 1 the command ran and found a problem (``render --check`` mismatch,
``render --diff`` with changes); 2 a user error (bad inventory, missing key, bad option).

Adding a command: write ``vpnctl/commands/<name>.py`` with ``main(ctx: typer.Context, ...)``
(docstring = its help; ``workspace(ctx)`` from :mod:`vpnctl.workspace` gives the paths and the
inventory), or with a typer ``app`` for a command group. ``deploy``, ``status`` and ``lab`` are
picked up when present.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from vpnctl.inventory import UserError
from vpnctl.workspace import (  # the commands import these from vpnctl.workspace, not from here
    DEFAULT_BUILD,
    DEFAULT_INVENTORY,
    DEFAULT_KEYSTORE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Workspace,
    beside,
    workspace,
)

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

F = TypeVar("F", bound=Callable[..., Any])

GLOBAL_OPTIONS = ("-i", "--inventory", "--keystore", "--build")


def hoist_global_options(args: list[str], commands: Iterable[str]) -> list[str]:
    """``vpnctl render -i lab.yaml`` means ``vpnctl -i lab.yaml render``: global options
    given after the command (up to a ``--``) are moved in front of it, with their values."""
    names = set(commands)
    start, i = None, 0
    while i < len(args):  # the command: the first word that is not a global option's value
        if args[i] in GLOBAL_OPTIONS:
            i += 2
            continue
        if args[i] in names:
            start = i
            break
        i += 1
    if start is None:
        return args
    head, tail, moved = args[: start + 1], [], []
    rest = args[start + 1 :]
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            tail += rest[i:]
            break
        if word in GLOBAL_OPTIONS and i + 1 < len(rest):
            moved += rest[i : i + 2]
            i += 2
            continue
        if word.startswith(tuple(f"{o}=" for o in GLOBAL_OPTIONS if o.startswith("--"))):
            moved.append(word)
        else:
            tail.append(word)
        i += 1
    return moved + head + tail if moved else args


class _Group(TyperGroup):
    """The app's click group: accepts the global options after the command too."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        return super().parse_args(ctx, hoist_global_options(list(args), self.commands))


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
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=_Group,  # global options may also follow the command
)


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


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"vpnctl {package_version('vpnctl')}")
        raise typer.Exit(EXIT_OK)


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
        Path | None,
        typer.Option(
            "--keystore",
            envvar="VPNCTL_KEYSTORE",
            help="Keystore directory: link keys (0600) and tunnel address allocations "
            "[default: keystore/ beside the inventory].",
            show_default=False,
        ),
    ] = None,
    build: Annotated[
        Path | None,
        typer.Option(
            "--build",
            envvar="VPNCTL_BUILD",
            help="Where `render` writes build/<host>/ trees [default: build/ beside the "
            "inventory].",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Global options go before or after the command: `vpnctl -i lab.yaml render`."""
    ctx.obj = Workspace(
        inventory,
        keystore if keystore is not None else beside(inventory, DEFAULT_KEYSTORE),
        build if build is not None else beside(inventory, DEFAULT_BUILD),
    )


def _commands() -> None:
    from vpnctl.commands import keygen, keys, render  # noqa: PLC0415 - registered at import

    register("keygen", keygen.main)
    register("keys", keys.main)
    register("render", render.main)
    # added by later work; absent ones are skipped
    for name in ("deploy", "status", "lab", "rotate"):
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
