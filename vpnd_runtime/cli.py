"""``vpnd``: the runtime's command line (argparse only; the runtime stays stdlib-small).

Spellings (the seed's flags plus a few subcommands)::

    vpnd [-f CONF] [--daemon] [-v]        run the daemon for CONF (default /etc/vpnd.conf)
    vpnd --check -f CONF                  parse CONF and load its key; print a one-line summary
    vpnd --check --no-key -f CONF         the same without the key (a config rendered on the
                                          operator's machine, whose key is not there yet)
    vpnd -t -f CONF                       modem chat test (serial links)
    vpnd -m [PATH] [-f CONF]              make a key (PATH, else CONF's keyfile, else default)
    vpnd genkey PATH [--randomdev DEV]    make a key at PATH
    vpnd status -f CONF [--json]          show the running daemon's status record
    vpnd status --prometheus -f CONF... [--textfile PATH]
                                          the same as Prometheus metrics (node_exporter)

Exit codes: 0 success, 1 status "link not up" (from the status module), 2 usage, config or key
error. User errors print a message, never a traceback. Each action is a small function taking
parsed arguments and returning the exit code; the daemon, status and chat modules are imported
lazily so this module works without them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

from vpnd_runtime import __version__
from vpnd_runtime.config import (
    DEFAULT_CONFIG,
    DEFAULT_KEYFILE,
    DEFAULT_RANDOMDEV,
    Config,
    ConfigError,
    load_config,
)
from vpnd_runtime.keyfile import KeyFileError, fingerprint, generate_key, load_key, user_uid

if TYPE_CHECKING:
    import argparse

__all__ = ["check_config", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SOFTWARE = 70  # a runtime module this build lacks

_SUBCOMMANDS = ("genkey", "status")


def _top_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 - lazy: `vpnd -f CONF` itself is parsed by _parse_run

    parser = argparse.ArgumentParser(
        prog="vpnd",
        description="User-space encrypted point-to-point VPN daemon.",
        epilog="Subcommands: 'vpnd genkey PATH', 'vpnd status -f CONF [--json]'.",
    )
    parser.add_argument("-f", "--config", metavar="CONF", help=f"config file [{DEFAULT_CONFIG}]")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--check", action="store_true", help="check the config and key file, then exit"
    )
    action.add_argument(
        "-t", "--chat-test", action="store_true", help="run the modem chat script, then exit"
    )
    action.add_argument(
        "-m",
        "--make-key",
        nargs="?",
        const="",
        metavar="PATH",
        help="create a new key file (PATH, else the config's keyfile, else the default)",
    )
    parser.add_argument(
        "--no-key",
        action="store_true",
        help="with --check: do not load the key file (it may not exist where the config is)",
    )
    parser.add_argument("--randomdev", metavar="DEV", help="entropy source for -m")
    parser.add_argument("--daemon", action="store_true", help="detach and log to syslog")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"vpnd {__version__}")
    return parser


def _sub_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 - lazy: `vpnd -f CONF` itself is parsed by _parse_run

    parser = argparse.ArgumentParser(prog="vpnd")
    subs = parser.add_subparsers(dest="command", required=True)
    genkey = subs.add_parser("genkey", help="create a new key file (mode 0600, never overwrites)")
    genkey.add_argument("path", metavar="PATH")
    genkey.add_argument("--randomdev", metavar="DEV", default=DEFAULT_RANDOMDEV)
    status = subs.add_parser("status", help="show the daemon's status record")
    status.add_argument(
        "-f",
        "--config",
        metavar="CONF",
        action="append",
        help=f"config file [{DEFAULT_CONFIG}]; several with --prometheus",
    )
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument(
        "--prometheus",
        action="store_true",
        help="Prometheus text format (exit 0 whatever the state: it is in the metrics)",
    )
    status.add_argument(
        "--textfile",
        metavar="PATH",
        help="with --prometheus: write atomically to PATH (a node_exporter textfile, *.prom)",
    )
    for sub in (genkey, status):
        sub.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="vpnd: %(levelname)s %(name)s: %(message)s",
    )


def _make_key(path: str, randomdev: str) -> int:
    """Create a key file and report its fingerprint (never the key)."""
    key = generate_key(path, randomdev)
    print(f"{path}: new key, fingerprint {fingerprint(key)} (mode 0600)")
    return EXIT_OK


def cmd_genkey(args: argparse.Namespace) -> int:
    """``vpnd genkey PATH [--randomdev DEV]``."""
    return _make_key(args.path, args.randomdev)


def cmd_make_key(args: argparse.Namespace) -> int:
    """The seed's ``vpnd -m [PATH]``: PATH, else the config's keyfile/randomdev, else defaults."""
    path, randomdev = args.make_key, args.randomdev
    if not path and args.config:
        config = load_config(args.config)
        path, randomdev = config.keyfile, randomdev or config.randomdev
    return _make_key(path or DEFAULT_KEYFILE, randomdev or DEFAULT_RANDOMDEV)


def check_config(conf: str, *, key: bool = True) -> str:
    """Parse ``conf`` (and load its key file unless ``key`` is False); return the one-line
    summary ``vpnd --check`` prints. ConfigError/KeyFileError name the file and line.

    ``vpnctl render`` runs this with ``key=False`` on every config it renders, so the operator's
    machine checks a config exactly as ``vpnd --check --no-key`` does (a hub's peers directory,
    like the keys, is then read only where it exists)."""
    config = load_config(conf, peers_optional=not key)
    host = f"[{config.server_host}]" if ":" in config.server_host else config.server_host
    link = config.server_host if config.is_serial else f"{host}:{config.server_port}"
    keys = _load_keys(config) if key else {}
    if key:  # on the host: the accounts `user`/`group` name must exist (the drop is at start)
        from vpnd_runtime.privdrop import resolve  # noqa: PLC0415 - lazy, like the rest

        resolve(config)

    def keyinfo(path: str) -> str:
        return f"key {fingerprint(keys[path])}" if key else f"key {path} not checked (--no-key)"

    if config.is_hub:
        lines = [
            f"{conf}: OK (hub, {link}, {config.local}, {len(config.peers)} clients, "
            + (f"{len(set(keys.values()))} keys)" if key else "keys not checked (--no-key))")
        ]
        lines += [f"  {peer.name}: {peer.remote}, {keyinfo(peer.keyfile)}" for peer in config.peers]
        return "\n".join(lines)
    info = keyinfo(config.keyfile)
    if key:
        info = info.replace("key ", "key fingerprint ", 1)
    six = f", {config.local6} -> {config.remote6}" if config.local6 is not None else ""
    return (
        f"{conf}: OK (mode {config.mode}, {link}, {config.local} -> {config.remote}{six}, {info})"
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Parse the config and load its key file (not with --no-key); print one summary line."""
    from vpnd_runtime.privdrop import PrivDropError  # noqa: PLC0415 - lazy, like the rest

    try:
        print(check_config(args.config or DEFAULT_CONFIG, key=not args.no_key))
    except PrivDropError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _load_keys(config: Config) -> dict[str, bytes]:
    """Every key file the config uses (a hub's: one per peer file, shared ones once)."""
    paths = [p.keyfile for p in config.peers] if config.is_hub else [config.keyfile]
    owner = user_uid(config.user)
    return {path: load_key(path, owner) for path in dict.fromkeys(paths)}


def cmd_status(args: argparse.Namespace) -> int:
    """``vpnd status -f CONF [--json]``: delegate to ``vpnd_runtime.status.print_status``,
    whose return value is the exit code (0 link up, 1 otherwise). With ``--prometheus`` every
    ``-f CONF`` given is exported (``--textfile PATH``: into a node_exporter textfile)."""
    paths = args.config or [DEFAULT_CONFIG]
    if args.textfile and not args.prometheus:
        raise ConfigError(args.textfile, None, "--textfile", "goes with --prometheus")
    if len(paths) > 1 and not args.prometheus:
        raise ConfigError(paths[1], None, "-f", "several configs only with --prometheus")
    configs = [load_config(path) for path in paths]
    from vpnd_runtime import status  # noqa: PLC0415 - lazy: optional module

    if args.prometheus:
        return int(status.print_prometheus(configs, args.textfile) or 0)
    return int(status.print_status(configs[0], args.json) or 0)


def cmd_chat_test(args: argparse.Namespace) -> int:
    """``vpnd -t -f CONF``: run the modem chat script once and report."""
    config = load_config(args.config or DEFAULT_CONFIG)
    if not config.is_serial or config.modemchat is None:
        raise ConfigError(
            config.source, None, "modemchat", "the chat test needs a serial link with modemchat"
        )
    from vpnd_runtime.io.chat import run_chat_test  # noqa: PLC0415 - lazy: optional module

    return int(run_chat_test(config) or 0)


def cmd_run(args: argparse.Namespace) -> int:
    """``vpnd -f CONF [--daemon] [-v]``: hand the config over to ``vpnd_runtime.process.run``,
    which reads the key files once, before detaching (a bad key file's error, naming its path,
    reaches the terminal and the exit code)."""
    config: Config = load_config(args.config or DEFAULT_CONFIG)
    from vpnd_runtime import process  # noqa: PLC0415 - lazy: written separately, heavy imports

    return int(process.run(config, daemonize=args.daemon, verbose=args.verbose) or 0)


#: What _top_parser gives `vpnd -f CONF`: every option at its default, the command "run".
_RUN_DEFAULTS = {
    "config": None,
    "check": False,
    "chat_test": False,
    "make_key": None,
    "no_key": False,
    "randomdev": None,
    "daemon": False,
    "verbose": False,
    "command": "run",
}


def _parse_run(argv: list[str]) -> SimpleNamespace | None:
    """The daemon's own command lines (``-f CONF``/``--config CONF``, ``--daemon``,
    ``-v``/``--verbose``, each word on its own) parsed to what argparse would give, else None.

    Why: argparse, with the gettext, locale and shutil it loads to build a parser, stays in a
    running daemon's memory for good (~1 MiB of RSS) for one parse at start. Every other
    spelling (help, a typo, an abbreviation, ``--config=CONF``) returns None and goes through
    argparse, which also words every usage error."""
    args = dict(_RUN_DEFAULTS)
    words = iter(argv)
    for word in words:
        if word in ("-f", "--config"):
            value = next(words, None)
            if value is None or value.startswith("-"):
                return None
            args["config"] = value
        elif word == "--daemon":
            args["daemon"] = True
        elif word in ("-v", "--verbose"):
            args["verbose"] = True
        else:
            return None
    return SimpleNamespace(**args)


def _parse(argv: list[str]) -> argparse.Namespace | SimpleNamespace:
    run = _parse_run(argv)
    if run is not None:
        return run
    first = next((i for i, word in enumerate(argv) if word not in ("-v", "--verbose")), None)
    if first is not None and argv[first] in _SUBCOMMANDS:  # `vpnd [-v] genkey ...`
        return _sub_parser().parse_args(argv[first:] + argv[:first])
    parser = _top_parser()
    args = parser.parse_args(argv)
    if args.no_key and not args.check:
        parser.error("--no-key goes with --check")
    if args.make_key is not None:
        args.command = "make-key"
    elif args.check:
        args.command = "check"
    elif args.chat_test:
        args.command = "chat-test"
    else:
        args.command = "run"
    return args


_COMMANDS = {
    "genkey": cmd_genkey,
    "make-key": cmd_make_key,
    "check": cmd_check,
    "status": cmd_status,
    "chat-test": cmd_chat_test,
    "run": cmd_run,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vpnd``; returns the process exit code."""
    try:
        args = _parse(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, KeyFileError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("vpnd_runtime"):
            raise
        print(f"vpnd: this build lacks {exc.name}", file=sys.stderr)
        return EXIT_SOFTWARE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
