"""A hub's peer files: one ``<name>.peer`` per client in the ``peers`` directory -> PeerSpecs.

A peer file takes a few of the config's own directives (``remote``, ``remote6``, ``keyfile``,
``nextkey``, ``client``, ``route1..9``), lexed and checked by the same code as the config
(:mod:`.config`'s directive table), so a value means the same in both files and an error names
the peer file and its line in the same way. :func:`load_peers` reads the directory (each file
as trusted as the config itself) and checks the peers against each other and the hub.

:func:`.config.load_config` imports this module only for a hub (a config with ``peers``), so a
point-to-point vpnd never loads it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from vpnd_runtime.config import (
    _ANY,
    _DIRECTIVES,
    Config,
    ConfigError,
    Network,
    PeerSpec,
    Route,
    _apply,
    _lex,
    _same_destinations,
)
from vpnd_runtime.trusted import untrusted_reason

__all__ = ["PEER_SUFFIX", "load_peers", "parse_peer"]

PEER_SUFFIX = ".peer"
_PEER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PEER_DIRECTIVES = (
    "remote",
    "remote6",
    "keyfile",
    "nextkey",
    "client",
    *(f"route{i}" for i in range(1, 10)),
)
_PEER_WORDS = ("remote", "remote6", "keyfile", "nextkey", "client", "route1..9")


def parse_peer(
    text: str,
    path: str,
    name: str,
    *,
    default_keyfile: str,
    default_nextkey: str | None = None,
    base_dir: str | None = None,
) -> PeerSpec:
    """Parse one peer file (``remote``, ``keyfile``, ``client``, ``route1..9``) into a PeerSpec.

    Relative key paths are joined to ``base_dir``; a peer file without ``keyfile`` uses the
    hub's (``default_keyfile``): several clients may hold one key, as in the seed.
    """
    errors: list[ConfigError] = []
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    routes: list[tuple[int, Route]] = []

    def fail(line: int | None, directive: str | None, message: str) -> None:
        errors.append(ConfigError(path, line, directive, message))

    if not _PEER_NAME_RE.fullmatch(name):
        fail(None, None, f"peer name {name!r} must be letters, digits, '_', '.', '-' (≤ 64)")
    for number, keyword, args in _lex(text):
        if keyword not in _PEER_DIRECTIVES:
            import difflib  # noqa: PLC0415 - lazy: only a bad peer file needs the hint

            hints = difflib.get_close_matches(keyword.lower(), _PEER_DIRECTIVES, n=1, cutoff=0.6)
            where = "the hub's config" if keyword in _DIRECTIVES else None
            message = (
                f"not a peer file directive: it belongs in {where}"
                if where
                else "unknown peer file directive"
                + (f"; did you mean {hints[0]!r}?" if hints else "")
            )
            fail(
                number,
                keyword,
                message + f" (peer files take {', '.join(_PEER_WORDS)})",
            )
            continue
        _apply(
            _DIRECTIVES[keyword], number, args, lines=lines, values=values, routes=routes, fail=fail
        )
    if "remote" not in lines:
        fail(None, "remote", "missing required directive: remote <the client's tunnel address>")
    remote = values.get("remote")
    if "remote6" in values and remote is not None and remote.version == 6:
        fail(
            lines["remote6"],
            "remote6",
            f"remote is already IPv6 ({remote}); remote6 adds IPv6 beside an IPv4 remote",
        )
    own = {a.version: a for a in (values.get("remote6"), remote) if a is not None}
    for number, route in routes:
        if remote is not None and route.gateway is not None and route.gateway not in own.values():
            want = own.get(route.version)
            fail(
                number,
                f"route{route.index}",
                f"gateway {route.gateway} must be this client's address"
                + (f" {want}" if want is not None else f" (it has no IPv{route.version} one)"),
            )
    _same_destinations(routes, fail)
    keyfile, nextkey = values.get("keyfile"), values.get("nextkey")
    if base_dir is not None:
        keyfile = os.path.join(base_dir, keyfile) if keyfile is not None else None
        nextkey = os.path.join(base_dir, nextkey) if nextkey is not None else None
    if keyfile is None:  # the hub's key (shared, seed style), and its next key with it
        keyfile, nextkey = default_keyfile, nextkey or default_nextkey
    if errors:
        raise ConfigError.combine(errors)
    return PeerSpec(
        name=name,
        remote=values["remote"],
        remote6=values.get("remote6"),
        keyfile=keyfile,
        nextkey=nextkey,
        client_host=values.get("client_host", _ANY),
        client_port=values.get("client_port", 0),
        routes=tuple(route for _, route in sorted(routes, key=lambda nr: nr[1].index)),
        source=path,
    )


def load_peers(config: Config) -> tuple[PeerSpec, ...]:
    """Read every ``*.peer`` file of a hub's peers directory, sorted by name, and check them
    against each other and the hub (no shared address, no overlapping routes)."""
    directory = config.peers_dir
    assert directory is not None  # noqa: S101 — only called for hubs
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise ConfigError(
            config.source, None, "peers", f"cannot read directory {directory}: {exc.strerror}"
        ) from None
    errors: list[ConfigError] = []
    peers: list[PeerSpec] = []
    for entry in names:
        if not entry.endswith(PEER_SUFFIX) or entry.startswith("."):
            continue
        path = os.path.join(directory, entry)
        try:
            with open(path, "rb") as handle:
                # A peer file decides which keys open the hub: as trusted as the config itself.
                reason = untrusted_reason(os.fstat(handle.fileno()), path, "peer file")
                if reason is not None:
                    errors.append(ConfigError(path, None, None, reason))
                    continue
                text = handle.read().decode("utf-8")
            peers.append(
                parse_peer(
                    text,
                    path,
                    entry.removesuffix(PEER_SUFFIX),
                    default_keyfile=config.keyfile,
                    default_nextkey=config.nextkey,
                    base_dir=directory,
                )
            )
        except ConfigError as exc:
            errors.extend(exc.errors)
        except UnicodeDecodeError:
            errors.append(ConfigError(path, None, None, "not valid UTF-8 text"))
        except OSError as exc:
            errors.append(ConfigError(path, None, None, f"cannot read peer file: {exc.strerror}"))
    owners: dict[Network, PeerSpec] = {}
    for peer in peers:
        for name, mine in (("remote", peer.remote), ("remote6", peer.remote6)):
            if mine is not None and mine in config.local_addresses:
                errors.append(
                    ConfigError(peer.source, None, name, f"{mine} is the hub's own address")
                )
        if not config.carries_ipv6 and any(n.version == 6 for n in peer.networks):
            errors.append(
                ConfigError(
                    peer.source,
                    None,
                    "remote6" if peer.remote6 is not None else "remote",
                    "this client has IPv6 addresses or routes but the hub carries no IPv6: "
                    f"give the hub a local6 in {config.source}",
                )
            )
        for net in peer.networks:
            for other_net, other in owners.items():
                if other is not peer and net.overlaps(other_net):
                    host = net.num_addresses == 1
                    what = "address" if host and other_net.num_addresses == 1 else "network"
                    errors.append(
                        ConfigError(
                            peer.source,
                            None,
                            ("remote" if net.version == peer.remote.version else "remote6")
                            if host
                            else "route",
                            f"{what} {net} overlaps {other_net} of peer {other.name} "
                            f"({other.source})",
                        )
                    )
            owners[net] = peer
    if errors:  # in file order, file by file (combine would sort lines across files)
        first = errors[0]
        raise ConfigError(first.path, first.line, first.directive, first.message, errors)
    return tuple(peers)
