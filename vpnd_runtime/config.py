"""The vpnd directive file -> a frozen, validated :class:`Config`.

Theory of operation
-------------------
A vpnd config is one ``keyword value...`` per line (see docs/directives.md for the reference).
Parsing runs in three passes so that the operator sees *every* mistake in one go:

1. **Lexing.** Each physical line is cleaned (UTF-8 BOM, CR of CRLF, comments starting with
   ``#`` at the start of the line or after whitespace, surrounding blanks) and split on
   whitespace into a keyword and its arguments. Blank lines vanish.
2. **Per-directive parsing.** The keyword selects a :class:`_Directive` spec that checks the
   arity and turns the arguments into field values. Unknown keywords get a difflib hint,
   a second occurrence of the same keyword is a duplicate error naming the first line.
3. **Cross checks.** Rules that involve several directives (``mode`` required, ``local`` and
   ``remote`` differ, serial-only directives only with a serial ``server``, a client needs a
   concrete server address, ``keysize`` matches ``cipher``...) run on the collected values and
   point at the line of the directive that has to change.

Each failure becomes one :class:`ConfigError`; at the end, if any were collected, one
:class:`ConfigError` is raised whose ``errors`` lists them all in file order.

Parsing is pure: it never touches the filesystem except in :func:`load_config`, which reads
the file and resolves relative paths against the config file's directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Union

from vpnd_runtime.compat import KW_ONLY
from vpnd_runtime.trusted import untrusted_reason

__all__ = [
    "CIPHERS",
    "DEFAULT_CONFIG",
    "DEFAULT_KEYFILE",
    "DEFAULT_PORT",
    "DEFAULT_RANDOMDEV",
    "Config",
    "ConfigError",
    "PeerSpec",
    "Route",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG = "/etc/vpnd.conf"
DEFAULT_KEYFILE = "/etc/vpnd.key"
DEFAULT_RANDOMDEV = "/dev/random"
DEFAULT_PORT = 379
DEFAULT_PIDFILE_NAME = "vpnd.pid"
STATUS_DIR = "/run/vpnd"

#: Canonical cipher names -> session key size in bits.
CIPHERS: dict[str, int] = {
    "chacha20-poly1305": 256,
    "aes-256-gcm": 256,
    "aes-128-gcm": 128,
}
#: ``cipher aes-gcm`` is the family spelling: the size comes from ``keysize`` (default 256).
_CIPHER_FAMILY = "aes-gcm"

MTU_MIN, MTU_MAX = 576, 65535
#: IPv6 needs every link to carry 1280-byte packets (RFC 8200 §5).
IPV6_MTU_MIN = 1280
SENDBUF_MIN, SENDBUF_MAX = 1024, 1048576
IPOPTS_MAX = 15
IFNAMSIZ = 15  # usable characters of a Linux interface name
#: Serial line speeds the Linux termios layer knows (pyserial maps these to Bxxx constants).
SERIAL_SPEEDS = frozenset(
    {
        50,
        75,
        110,
        134,
        150,
        200,
        300,
        600,
        1200,
        1800,
        2400,
        4800,
        9600,
        19200,
        38400,
        57600,
        115200,
        230400,
        460800,
        500000,
        576000,
        921600,
        1000000,
        1152000,
        1500000,
        2000000,
        2500000,
        3000000,
        3500000,
        4000000,
    }
)

_TRUE_WORDS = frozenset({"yes", "on", "true", "1"})
_FALSE_WORDS = frozenset({"no", "off", "false", "0"})
_ANY = "0.0.0.0"
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
_ROUTE_RE = re.compile(r"route([0-9]+)")
#: A POSIX-ish account name (useradd's default rule, 32 characters at most) or a numeric id.
_ACCOUNT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}[A-Za-z0-9_.$-]?|[0-9]{1,10}")


# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """A config file problem, pointing at ``path:line`` and the directive to fix.

    One instance may carry several problems: ``errors`` lists every single-problem
    ``ConfigError`` found in the file (itself only, for a single problem), and ``str()`` joins
    them with newlines. ``path``, ``line`` and ``directive`` are those of the first problem.
    ``line`` is 1-based, or None for file-level problems (a missing required directive).
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        directive: str | None,
        message: str,
        errors: Sequence[ConfigError] | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.directive = directive
        self.message = message
        self.errors: list[ConfigError] = list(errors) if errors else [self]
        super().__init__(str(self))

    def _one(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.directive is None:
            return f"{where}: {self.message}"
        return f"{where}: {self.directive}: {self.message}"

    def __str__(self) -> str:
        return "\n".join(error._one() for error in self.errors)

    @classmethod
    def combine(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error carrying ``errors`` (line-numbered ones in file order, file-level last)."""
        ordered = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        first = ordered[0]
        if len(ordered) == 1:
            return first
        return cls(first.path, first.line, first.directive, first.message, ordered)


class _Bad(Exception):
    """Raised by directive parsers; turned into a ConfigError with the line attached."""


# --------------------------------------------------------------------------------------------
# The configuration


Address = Union[IPv4Address, IPv6Address]
Network = Union[IPv4Network, IPv6Network]


@dataclass(frozen=True)
class Route:
    """An extra route through the link.

    Two spellings: the seed's ``route<index> <dest> <netmask> <gateway>`` (IPv4), and the
    prefix form ``route<index> <prefix>/<len> [<gateway>]`` (either family; ``prefix_form``),
    e.g. ``route2 2001:db8:40::/48``. Without a gateway the route goes straight out of the TUN.
    ``netmask`` is then the prefix's mask as an address of its family.
    """

    index: int
    dest: Address
    netmask: Address
    gateway: Address | None
    prefix_form: bool = False

    @property
    def network(self) -> Network:
        """The destination as a network, e.g. ``198.19.5.0/24`` or ``2001:db8:40::/48``."""
        return ip_network((self.dest, bin(int(self.netmask)).count("1")))

    @property
    def version(self) -> int:
        """4 or 6: the family of the destination."""
        return self.dest.version

    def text(self) -> str:
        """The directive line that reads back to this route."""
        if not self.prefix_form:
            return f"route{self.index} {self.dest} {self.netmask} {self.gateway}"
        gateway = f" {self.gateway}" if self.gateway is not None else ""
        return f"route{self.index} {self.network}{gateway}"


@dataclass(frozen=True, **KW_ONLY)
class PeerSpec:
    """One client of a hub, from its peer file ``<peers dir>/<name>.peer``."""

    name: str
    remote: Address
    keyfile: str
    #: The client's IPv6 tunnel address beside an IPv4 `remote` (dual stack), from `remote6`.
    remote6: IPv6Address | None = None
    nextkey: str | None = None
    client_host: str = _ANY
    client_port: int = 0
    routes: tuple[Route, ...] = ()
    #: The peer file (for messages); not compared.
    source: str = field(default="<string>", compare=False)

    @property
    def networks(self) -> tuple[Network, ...]:
        """Everything this client may send from and is routed to: its addresses and routes."""
        own = [ip_network(self.remote)]
        if self.remote6 is not None:
            own.append(ip_network(self.remote6))
        return (*own, *(r.network for r in self.routes))


@dataclass(frozen=True, **KW_ONLY)
class Config:
    """A validated vpnd configuration. Build it with :func:`parse_config` / :func:`load_config`.

    Field names and defaults are the contract of docs/architecture.md §Config. Constructing a
    Config directly skips validation; ``parse_config(cfg.to_text())`` validates.
    """

    mode: str
    #: This end's tunnel address (IPv4, or IPv6 for an IPv6-only tunnel).
    local: Address
    #: The far end's tunnel address; None only for a hub, whose clients' are in `peers`.
    remote: Address | None
    server_host: str = _ANY
    server_port: int = DEFAULT_PORT  # 0 for a serial device (no port)
    client_host: str = _ANY
    client_port: int = 0
    mtu: int = 1400
    keyfile: str = DEFAULT_KEYFILE
    pidfile: str | None = None
    randomdev: str = DEFAULT_RANDOMDEV
    keepalive: float = 10.0
    noanswer: int = 3
    autoroute: bool = False
    routes: tuple[Route, ...] = ()
    linkup: str | None = None
    linkdown: str | None = None
    slipup: str | None = None
    slipdown: str | None = None
    speed: int = 115200
    localline: bool = False
    nortscts: bool = False
    xfilter: bool = False
    modemchat: str | None = None
    ipopts: int = 0
    sendbuf: int = 65536
    compress: bool = False
    compress_level: int = 1
    keyttl: float = 120.0
    keysize: int = 256
    maxdelay: float | None = None
    cipher: str = "chacha20-poly1305"
    interface: str = "vpnd0"
    statusfile: str = f"{STATUS_DIR}/vpnd.status.json"
    #: A second key also accepted from the far end (hitless rotation: see docs/directives.md).
    nextkey: str | None = None
    #: A hub: the directory of its clients' peer files (`peers`), and those clients.
    peers_dir: str | None = None
    peers: tuple[PeerSpec, ...] = ()
    #: A hub forwards packets from one client to another (via the host's IP forwarding).
    clienttoclient: bool = True
    #: IPv6 tunnel addresses beside IPv4 `local`/`remote` (a dual-stack link): `local6`/`remote6`.
    local6: IPv6Address | None = None
    remote6: IPv6Address | None = None
    #: The carrier of a network link: "tcp" (the seed's, the default) or "udp" (datagrams).
    transport: str = "tcp"
    #: Account to run as after start-up (see vpnd_runtime/privdrop.py); None: stay as started.
    user: str | None = None
    group: str | None = None
    #: Where this config was read from (for messages and the status record); not compared.
    source: str = field(default="<string>", compare=False)

    @property
    def is_hub(self) -> bool:
        """True for a server that serves many clients (`peers`)."""
        return self.peers_dir is not None

    @property
    def local_addresses(self) -> tuple[Address, ...]:
        """This end's tunnel addresses: `local`, then `local6` when given."""
        return (self.local,) if self.local6 is None else (self.local, self.local6)

    @property
    def remote_addresses(self) -> tuple[Address, ...]:
        """The far end's tunnel addresses (empty for a hub)."""
        found = (self.remote, self.remote6)
        return tuple(a for a in found if a is not None)

    @property
    def carries_ipv6(self) -> bool:
        """True when the tunnel carries IPv6 (an IPv6 `local` or a `local6`)."""
        return self.local.version == 6 or self.local6 is not None

    @property
    def is_serial(self) -> bool:
        """True when the link runs over a serial device (``server /dev/ttyS0``)."""
        return self.server_host.startswith("/")

    def to_text(self) -> str:
        """Canonical directive text that re-parses (with the same path) to an equal Config.

        Required directives, ``statusfile`` (its default depends on the config's file name)
        and every value that differs from its default are written, in a fixed order.
        """
        lines = [f"mode {self.mode}"]
        if self.is_serial:
            lines.append(f"server {self.server_host}")
        else:
            lines.append(f"server {_host_text(self.server_host)} {self.server_port}")
            if (self.client_host, self.client_port) != (_ANY, 0):
                lines.append(f"client {_host_text(self.client_host)} {self.client_port}")
        lines.append(f"local {self.local}")
        if self.remote is not None:
            lines.append(f"remote {self.remote}")
        if self.local6 is not None:
            lines.append(f"local6 {self.local6}")
        if self.remote6 is not None:
            lines.append(f"remote6 {self.remote6}")
        if self.peers_dir is not None:
            lines.append(f"peers {self.peers_dir}")
            if not self.clienttoclient:
                lines.append("clienttoclient no")
        defaults = {f.name: f.default for f in fields(Config)}
        for name in _TEXT_ORDER:
            value = getattr(self, name)
            if name == "routes":
                lines += [r.text() for r in value]
            elif name == "compress":
                if self.compress:
                    lines.append(f"compress {self.compress_level}")
            elif name == "statusfile" or value != defaults[name]:
                if isinstance(value, bool):
                    lines.append(name)
                elif isinstance(value, float):
                    lines.append(f"{name} {_float_text(value)}")
                else:
                    lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"


_TEXT_ORDER = (
    "interface",
    "mtu",
    "keyfile",
    "nextkey",
    "randomdev",
    "pidfile",
    "statusfile",
    "user",
    "group",
    "keepalive",
    "noanswer",
    "maxdelay",
    "keyttl",
    "cipher",
    "keysize",
    "compress",
    "sendbuf",
    "ipopts",
    "autoroute",
    "routes",
    "linkup",
    "linkdown",
    "slipup",
    "slipdown",
    "speed",
    "localline",
    "nortscts",
    "xfilter",
    "modemchat",
    "transport",
)


def _host_text(host: str) -> str:
    return "0" if host == _ANY else host


def _float_text(value: float) -> str:
    """Plain decimal notation (never an exponent) that reads back to the same float."""
    from decimal import Decimal  # noqa: PLC0415 - lazy: the daemon never renders a config

    text = format(Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") else text


# --------------------------------------------------------------------------------------------
# Value parsers: each returns the value or raises _Bad with a message for the operator.


def _int(text: str, what: str, low: int, high: int) -> int:
    if not _INT_RE.fullmatch(text):
        raise _Bad(f"{what} must be a whole number, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise _Bad(f"{what} must be {low}..{high}, got {value}")
    return value


def _seconds(text: str, what: str) -> float:
    if not _FLOAT_RE.fullmatch(text):
        raise _Bad(f"{what} must be a number of seconds like 10 or 0.5, got {text!r}")
    value = float(text)
    if value <= 0:
        raise _Bad(f"{what} must be greater than 0 seconds, got {text}")
    return value


def _ipv4(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise _Bad(f"{what} must be a dotted IPv4 address like 198.18.1.1, got {text!r}") from None


def _ip(text: str, what: str) -> Address:
    try:
        return ip_address(text)
    except ValueError:
        raise _Bad(
            f"{what} must be a dotted IPv4 address like 198.18.1.1 "
            f"or an IPv6 address like 2001:db8::1, got {text!r}"
        ) from None


def _host(text: str, what: str) -> str:
    """An IPv4 or IPv6 literal (``[2001:db8::1]`` too), with ``0`` meaning any (0.0.0.0)."""
    if text == "0":
        return _ANY
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    address = _ip(text, what)
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _tunnel_address(text: str, what: str, version: int | None = None) -> Address:
    """A unicast address of `version` (4, 6, or None for either)."""
    address: Address
    if version == 4:
        address = _ipv4(text, what)
    elif version == 6:
        try:
            address = IPv6Address(text)
        except ValueError:
            raise _Bad(f"{what} must be an IPv6 address like fd00:5::1, got {text!r}") from None
    else:
        address = _ip(text, what)
    if (
        address.is_unspecified
        or address.is_multicast
        or address == IPv4Address("255.255.255.255")
        or (address.version == 6 and address.ipv4_mapped is not None)
    ):
        raise _Bad(f"{what} must be a unicast address, got {address}")
    return address


def _netmask(text: str) -> IPv4Address:
    mask = _ipv4(text, "netmask")
    inverted = ~int(mask) & 0xFFFFFFFF
    if inverted & (inverted + 1):
        raise _Bad(f"netmask {mask} is not contiguous (ones then zeros, like 255.255.255.0)")
    return mask


def _path(text: str, what: str) -> str:
    if "\0" in text:
        raise _Bad(f"{what} contains a NUL byte")
    return text


def _flag(args: list[str], what: str) -> bool:
    if not args:
        return True
    word = args[0].lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _Bad(f"{what} takes no value (or yes/no, on/off, true/false, 1/0), got {args[0]!r}")


# --------------------------------------------------------------------------------------------
# Directive specs


@dataclass(frozen=True)
class _Directive:
    """One directive's name, usage line, arity and value parser."""

    name: str
    usage: str
    min_args: int
    max_args: int
    parse: Callable[[list[str]], dict[str, Any]]
    serial_only: bool = False


def _mode(args: list[str]) -> dict[str, Any]:
    if args[0] not in ("client", "server"):
        raise _Bad(f"must be 'client' or 'server', got {args[0]!r}")
    return {"mode": args[0]}


def _server(args: list[str]) -> dict[str, Any]:
    first = args[0]
    if first.startswith("/"):
        if len(args) > 1:
            raise _Bad(f"a serial device takes no port: write 'server {first}'")
        return {"server_host": _path(first, "device"), "server_port": 0}
    if len(args) == 1:
        if _INT_RE.fullmatch(first):  # the seed's `server 24741`: port only, listen on any
            if int(first) == 0:
                raise _Bad(
                    "server port must be 1..65535, got 0 (a single argument is the port; "
                    f"write 'server 0 {DEFAULT_PORT}' to mean any address)"
                )
            return {"server_host": _ANY, "server_port": _int(first, "server port", 1, 65535)}
        return {"server_host": _host(first, "server address"), "server_port": DEFAULT_PORT}
    return {
        "server_host": _host(first, "server address"),
        "server_port": _int(args[1], "server port", 1, 65535),
    }


def _client(args: list[str]) -> dict[str, Any]:
    host = _host(args[0], "client address")
    port = _int(args[1], "client port", 0, 65535) if len(args) > 1 else 0
    return {"client_host": host, "client_port": port}


def _value(name: str, convert: Callable[[str], Any]) -> Callable[[list[str]], dict[str, Any]]:
    return lambda args: {name: convert(args[0])}


def _flag_directive(name: str) -> Callable[[list[str]], dict[str, Any]]:
    return lambda args: {name: _flag(args, name)}


def _compress(args: list[str]) -> dict[str, Any]:
    if not args:
        return {"compress": True, "compress_level": 1}
    word = args[0].lower()
    if word in ("yes", "on", "true"):
        return {"compress": True, "compress_level": 1}
    if word in ("no", "off", "false", "0"):
        return {"compress": False, "compress_level": 1}
    if not _INT_RE.fullmatch(word):
        raise _Bad(f"takes an optional level 1..9 (or on/off), got {args[0]!r}")
    return {"compress": True, "compress_level": _int(word, "compress level", 1, 9)}


TRANSPORTS = ("tcp", "udp")


def _transport(args: list[str]) -> dict[str, Any]:
    if args[0] not in TRANSPORTS:
        raise _Bad(f"unknown transport {args[0]!r}; choose tcp or udp")
    return {"transport": args[0]}


def _cipher(args: list[str]) -> dict[str, Any]:
    name = args[0]
    if name not in CIPHERS and name != _CIPHER_FAMILY:
        choices = ", ".join([*CIPHERS, _CIPHER_FAMILY])
        raise _Bad(f"unknown cipher {name!r}; choose one of {choices}")
    return {"cipher": name}


def _keysize(args: list[str]) -> dict[str, Any]:
    if not _INT_RE.fullmatch(args[0]) or int(args[0]) not in (128, 256):
        raise _Bad(f"must be 128 or 256 (bits), got {args[0]!r}")
    return {"keysize": int(args[0])}


def _speed(args: list[str]) -> dict[str, Any]:
    value = _int(args[0], "speed", 1, 4000000)
    if value not in SERIAL_SPEEDS:
        near = min(SERIAL_SPEEDS, key=lambda s: abs(s - value))
        raise _Bad(f"{value} is not a serial line speed (nearest: {near})")
    return {"speed": value}


def _interface(args: list[str]) -> dict[str, Any]:
    name = args[0]
    if len(name) > IFNAMSIZ or name in (".", "..") or "/" in name or ":" in name:
        raise _Bad(f"interface name must be 1..{IFNAMSIZ} characters without '/' or ':'")
    return {"interface": name}


def _prefix_route(index: int, args: list[str]) -> Route:
    """``route<index> <prefix>/<len> [<gateway>]``, either family."""
    try:
        network = ip_network(args[0])
    except ValueError:
        try:
            loose = ip_network(args[0], strict=False)
        except ValueError:
            raise _Bad(
                f"destination must be a prefix like 2001:db8:40::/48 or 198.18.40.0/24, "
                f"got {args[0]!r}"
            ) from None
        raise _Bad(f"destination {args[0]} has host bits set (did you mean {loose}?)") from None
    gateway = None
    if len(args) > 1:
        gateway = _tunnel_address(args[1], "gateway", network.version)
    return Route(index, network.network_address, network.netmask, gateway, prefix_form=True)


def _account(name: str) -> Callable[[list[str]], dict[str, Any]]:
    def parse(args: list[str]) -> dict[str, Any]:
        value = args[0]
        if not _ACCOUNT_RE.fullmatch(value):
            raise _Bad(f"must be an account name or a numeric id, got {value!r}")
        if value in ("root", "0"):
            what = "root" if name == "user" else "root's group"
            raise _Bad(
                f"{value!r} is {what}: vpnd starts as root anyway; omit '{name}' to keep "
                "running as root, or name an unprivileged account"
            )
        return {name: value}

    return parse


def _route(index: int) -> Callable[[list[str]], dict[str, Any]]:
    def parse(args: list[str]) -> dict[str, Any]:
        if len(args) < 3:
            if "/" not in args[0]:
                raise _Bad(
                    f"usage: route{index} <dest> <netmask> <gateway> (IPv4) "
                    f"or route{index} <prefix>/<len> [<gateway>]"
                )
            return {"route": _prefix_route(index, args)}
        dest = _ipv4(args[0], "destination")
        mask = _netmask(args[1])
        gateway = _tunnel_address(args[2], "gateway", 4)
        if int(dest) & ~int(mask) & 0xFFFFFFFF:
            network = IPv4Address(int(dest) & int(mask))
            raise _Bad(
                f"destination {dest} has host bits outside netmask {mask} (did you mean {network}?)"
            )
        return {"route": Route(index, dest, mask, gateway)}

    return parse


_DIRECTIVES: dict[str, _Directive] = {
    d.name: d
    for d in [
        _Directive("mode", "mode client|server", 1, 1, _mode),
        _Directive("server", "server [<ip>|0] <port> | server <ip> | server /dev/<tty>", 1, 2,
                   _server),
        _Directive("client", "client <ip>|0 [<port>]", 1, 2, _client),
        _Directive("local", "local <ip>", 1, 1,
                   _value("local", lambda t: _tunnel_address(t, "local address"))),
        _Directive("remote", "remote <ip>", 1, 1,
                   _value("remote", lambda t: _tunnel_address(t, "remote address"))),
        _Directive("local6", "local6 <ipv6>", 1, 1,
                   _value("local6", lambda t: _tunnel_address(t, "local6 address", 6))),
        _Directive("remote6", "remote6 <ipv6>", 1, 1,
                   _value("remote6", lambda t: _tunnel_address(t, "remote6 address", 6))),
        _Directive("mtu", "mtu <bytes>", 1, 1,
                   _value("mtu", lambda t: _int(t, "mtu", MTU_MIN, MTU_MAX))),
        _Directive("keyfile", "keyfile <path>", 1, 1,
                   _value("keyfile", lambda t: _path(t, "keyfile"))),
        _Directive("nextkey", "nextkey <path>", 1, 1,
                   _value("nextkey", lambda t: _path(t, "nextkey"))),
        _Directive("pidfile", "pidfile <path>|<dir>/", 1, 1,
                   _value("pidfile", lambda t: _path(t, "pidfile"))),
        _Directive("randomdev", "randomdev <path>", 1, 1,
                   _value("randomdev", lambda t: _path(t, "randomdev"))),
        _Directive("statusfile", "statusfile <path>", 1, 1,
                   _value("statusfile", lambda t: _path(t, "statusfile"))),
        _Directive("keepalive", "keepalive <seconds>", 1, 1,
                   _value("keepalive", lambda t: _seconds(t, "keepalive"))),
        _Directive("noanswer", "noanswer <count>", 1, 1,
                   _value("noanswer", lambda t: _int(t, "noanswer", 1, 1_000_000))),
        _Directive("keyttl", "keyttl <seconds>", 1, 1,
                   _value("keyttl", lambda t: _seconds(t, "keyttl"))),
        _Directive("maxdelay", "maxdelay <seconds>", 1, 1,
                   _value("maxdelay", lambda t: _seconds(t, "maxdelay"))),
        _Directive("keysize", "keysize 128|256", 1, 1, _keysize),
        _Directive("cipher", "cipher chacha20-poly1305|aes-256-gcm|aes-128-gcm|aes-gcm", 1, 1,
                   _cipher),
        _Directive("compress", "compress [<level 1..9>|on|off]", 0, 1, _compress),
        _Directive("sendbuf", "sendbuf <bytes>", 1, 1,
                   _value("sendbuf", lambda t: _int(t, "sendbuf", SENDBUF_MIN, SENDBUF_MAX))),
        _Directive("ipopts", "ipopts <0..15>", 1, 1,
                   _value("ipopts", lambda t: _int(t, "ipopts", 0, IPOPTS_MAX))),
        _Directive("interface", "interface <name>", 1, 1, _interface),
        _Directive("peers", "peers <directory>", 1, 1,
                   _value("peers_dir", lambda t: _path(t, "peers"))),
        _Directive("clienttoclient", "clienttoclient yes|no", 0, 1,
                   _flag_directive("clienttoclient")),
        _Directive("user", "user <name>|<uid>", 1, 1, _account("user")),
        _Directive("group", "group <name>|<gid>", 1, 1, _account("group")),
        _Directive("autoroute", "autoroute", 0, 1, _flag_directive("autoroute")),
        _Directive("transport", "transport tcp|udp", 1, 1, _transport),
        *[
            _Directive(hook, f"{hook} <script>", 1, 1,
                       _value(hook, lambda t, hook=hook: _path(t, hook)))
            for hook in ("linkup", "linkdown", "slipup", "slipdown")
        ],
        _Directive("speed", "speed <bps>", 1, 1, _speed, serial_only=True),
        _Directive("localline", "localline", 0, 1, _flag_directive("localline"),
                   serial_only=True),
        _Directive("nortscts", "nortscts", 0, 1, _flag_directive("nortscts"), serial_only=True),
        _Directive("xfilter", "xfilter", 0, 1, _flag_directive("xfilter"), serial_only=True),
        _Directive("modemchat", "modemchat <file>", 1, 1,
                   _value("modemchat", lambda t: _path(t, "modemchat")), serial_only=True),
        *[
            _Directive(f"route{i}", f"route{i} <dest> <netmask> <gateway> | "
                       f"route{i} <prefix>/<len> [<gateway>]", 1, 3, _route(i))
            for i in range(1, 10)
        ],
    ]
}  # fmt: skip

#: Directives whose values are filesystem paths (resolved against the config's directory).
_PATH_FIELDS = (
    "keyfile",
    "nextkey",
    "pidfile",
    "randomdev",
    "statusfile",
    "linkup",
    "linkdown",
    "slipup",
    "slipdown",
    "modemchat",
    "peers_dir",
)


# --------------------------------------------------------------------------------------------
# Parsing


def _lex(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, keyword, args) for every non-blank, non-comment line."""
    if text.startswith("\ufeff"):
        text = text[1:]
    result = []
    # split("\n") rather than splitlines(): form feeds etc. must not shift line numbers.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        cut = re.search(r"(^|\s)#", line)
        if cut:
            line = line[: cut.start()]
        words = line.split()
        if words:
            result.append((number, words[0], words[1:]))
    return result


def _unknown_message(keyword: str) -> str:
    match = _ROUTE_RE.fullmatch(keyword)
    if match:
        return f"route index {match.group(1)} is out of range: extra routes are route1..route9"
    if keyword.lower() in _DIRECTIVES:
        return f"unknown directive; directives are lowercase: did you mean {keyword.lower()!r}?"
    import difflib  # noqa: PLC0415 - lazy: only a bad config needs the hint

    hints = difflib.get_close_matches(keyword.lower(), list(_DIRECTIVES), n=1, cutoff=0.6)
    if hints:
        return f"unknown directive; did you mean {hints[0]!r}?"
    return "unknown directive (see docs/directives.md)"


def _default_statusfile(path: str) -> str:
    stem = _stem(path) if not path.startswith("<") else ""
    return f"{STATUS_DIR}/{stem or 'vpnd'}.status.json"


def _stem(path: str) -> str:
    """`pathlib.PurePosixPath(path).stem`, without importing pathlib on every host (~0.3 MiB)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    name = parts[-1] if parts else ""
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _apply(
    spec: _Directive,
    number: int,
    args: list[str],
    *,
    lines: dict[str, int],
    values: dict[str, Any],
    routes: list[tuple[int, Route]],
    fail: Callable[[int | None, str | None, str], None],
) -> None:
    """One directive line of a config or peer file: refused once given already, with the wrong
    arity or a bad value (via `fail`); else its values go into `values`, a route into `routes`."""
    keyword = spec.name
    if keyword in lines:
        fail(number, keyword, f"duplicate directive (first given on line {lines[keyword]})")
        return
    lines[keyword] = number
    if not spec.min_args <= len(args) <= spec.max_args:
        fail(number, keyword, f"wrong number of arguments ({len(args)}); usage: {spec.usage}")
        return
    try:
        parsed = spec.parse(args)
    except _Bad as bad:
        fail(number, keyword, str(bad))
        return
    if "route" in parsed:
        routes.append((number, parsed.pop("route")))
    values.update(parsed)


def parse_config(text: str, path: str = "<string>", *, base_dir: str | None = None) -> Config:
    """Parse vpnd directive ``text`` (read from ``path``, used in messages) into a Config.

    Relative paths in path-valued directives are joined to ``base_dir`` when it is given
    (``load_config`` passes the config file's directory) and kept as written otherwise.
    Raises one :class:`ConfigError` listing every problem found.
    """
    errors: list[ConfigError] = []
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}  # directive -> line it was given on
    routes: list[tuple[int, Route]] = []

    def fail(line: int | None, directive: str | None, message: str) -> None:
        errors.append(ConfigError(path, line, directive, message))

    for number, keyword, args in _lex(text):
        spec = _DIRECTIVES.get(keyword)
        if spec is None:
            fail(number, keyword, _unknown_message(keyword))
            continue
        _apply(spec, number, args, lines=lines, values=values, routes=routes, fail=fail)

    # ---- cross checks -------------------------------------------------------------------
    mode = values.get("mode")
    if "mode" not in lines:
        fail(None, "mode", "missing required directive: mode client|server")
    hub = "peers" in lines
    for name in ("local", "remote"):
        if name not in lines and not (hub and name == "remote"):
            fail(None, name, f"missing required directive: {name} <ip>")
    if "local" in values and values.get("remote") == values["local"]:
        fail(lines["remote"], "remote", f"must differ from local ({values['local']})")
    if hub:
        if mode == "client":
            fail(lines["peers"], "peers", "only a server serves many clients (mode server)")
        if "remote" in lines:
            fail(
                lines["remote"],
                "remote",
                "a hub has no single remote: each client's address is 'remote' in its peer file",
            )
        for number, route in routes:
            fail(
                number,
                f"route{route.index}",
                "a hub's routes belong to its clients: put the network behind a client in "
                "that client's peer file",
            )
        routes = []
    elif "clienttoclient" in lines:
        fail(lines["clienttoclient"], "clienttoclient", "applies only to a hub (with 'peers')")
    values.setdefault("remote", None)
    _check_families(values, lines, routes, hub, fail)

    serial = str(values.get("server_host", "")).startswith("/")
    if mode == "client":
        if "server" not in lines:
            fail(None, "server", "missing required directive for a client: server <ip> <port>")
        elif values.get("server_host") == _ANY:
            fail(
                lines["server"],
                "server",
                "a client needs the server's address to connect to, not 0 (any)",
            )
    for name, number in lines.items():
        if _DIRECTIVES[name].serial_only and not serial:
            fail(number, name, "applies only to serial links ('server /dev/<tty>')")
    if serial:
        if hub:
            fail(lines["peers"], "peers", "a serial line has one peer: a hub needs TCP")
        if (values.get("client_host", _ANY), values.get("client_port", 0)) != (_ANY, 0):
            fail(
                lines["client"],
                "client",
                "a serial link has no client address: remove it (or write 'client 0')",
            )
        if "ipopts" in lines:
            fail(lines["ipopts"], "ipopts", "applies only to TCP links (it sets the socket TOS)")
        if "transport" in lines:
            fail(
                lines["transport"],
                "transport",
                "applies only to network links: a serial line is its own carrier",
            )
    if values.get("transport") == "udp" and "sendbuf" in lines:
        fail(
            lines["sendbuf"],
            "sendbuf",
            "applies to TCP and serial links: over UDP each datagram carries at most one "
            "MTU's worth of packets (see mtu)",
        )

    if "group" in lines and "user" not in lines:
        fail(lines["group"], "group", "needs a 'user' (the account vpnd switches to)")

    cipher = values.get("cipher", "chacha20-poly1305")
    if cipher == _CIPHER_FAMILY:
        cipher = f"aes-{values.get('keysize', 256)}-gcm"
        values["cipher"] = cipher
    cipher_ok = "cipher" not in lines or "cipher" in values
    if cipher_ok and "keysize" in values and values["keysize"] != CIPHERS[cipher]:
        hint = (
            "use 'cipher aes-128-gcm' (or 'cipher aes-gcm') for 128-bit keys"
            if values["keysize"] == 128
            else f"{cipher} uses {CIPHERS[cipher]}-bit keys"
        )
        fail(
            lines["keysize"],
            "keysize",
            f"{values['keysize']} does not match cipher {cipher}: {hint}",
        )
    values["keysize"] = CIPHERS[cipher]

    seen: dict[Network, int] = {}
    for number, route in routes:
        if route.network in seen:
            fail(
                number,
                f"route{route.index}",
                f"same destination {route.network} as route{seen[route.network]}",
            )
        seen.setdefault(route.network, route.index)
    values["routes"] = tuple(route for _, route in sorted(routes, key=lambda nr: nr[1].index))

    pidfile = values.get("pidfile")
    if pidfile is not None and pidfile.endswith("/"):
        values["pidfile"] = pidfile + DEFAULT_PIDFILE_NAME  # the seed's `pidfile /var/run/`
    values.setdefault("statusfile", _default_statusfile(path))
    if base_dir is not None:
        for name in _PATH_FIELDS:
            if values.get(name) is not None:
                values[name] = os.path.join(base_dir, values[name])

    if errors:
        raise ConfigError.combine(errors)
    return Config(**values, source=path)


def _check_families(
    values: dict[str, Any],
    lines: dict[str, int],
    routes: list[tuple[int, Route]],
    hub: bool,
    fail: Callable[[int | None, str | None, str], None],
) -> None:
    """The rules of a link's two address families (docs/directives.md, "IPv6").

    `local`/`remote` are the tunnel's first family (either); `local6`/`remote6` add IPv6 beside
    IPv4 ones. Both ends of a family go together, and every route needs its family carried.
    """
    local, remote = values.get("local"), values.get("remote")
    local6, remote6 = values.get("local6"), values.get("remote6")
    if local is not None and remote is not None and local.version != remote.version:
        fail(
            lines["remote"],
            "remote",
            f"{remote} is IPv{remote.version} but local {local} is IPv{local.version}: "
            "local and remote are one family (give IPv6 beside IPv4 as local6/remote6)",
        )
    for name, first in (("local6", local), ("remote6", remote)):
        if name in values and first is not None and first.version == 6:
            base = name[:-1]
            fail(
                lines[name],
                name,
                f"{base} is already IPv6 ({first}); {name} adds IPv6 beside an IPv4 {base}",
            )
    if hub and "remote6" in lines:
        fail(
            lines["remote6"],
            "remote6",
            "a hub has no single remote: each client's IPv6 address is 'remote6' in its peer file",
        )
    elif (
        not hub
        and ("local6" in lines) != ("remote6" in lines)
        and all(name in values for name in ("local6", "remote6") if name in lines)
    ):
        given, missing = ("local6", "remote6") if "local6" in lines else ("remote6", "local6")
        fail(lines[given], given, f"an IPv6 tunnel needs both ends: add {missing} <ipv6>")
    if local6 is not None and local6 == remote6:
        fail(lines["remote6"], "remote6", f"must differ from local6 ({local6})")
    carries = {a.version for a in (local, local6) if a is not None}
    if 6 in carries and values.get("mtu", 1400) < IPV6_MTU_MIN:
        fail(
            lines.get("mtu"),
            "mtu",
            f"{values['mtu']} is below {IPV6_MTU_MIN}, the least a link carrying IPv6 may have",
        )
    if local is None:
        return
    for number, route in routes:
        if route.version not in carries:
            spelled = "local6/remote6" if route.version == 6 else "an IPv4 local/remote"
            fail(
                number,
                f"route{route.index}",
                f"{route.network} is IPv{route.version} but the tunnel carries no "
                f"IPv{route.version}: give it {spelled}",
            )


def load_config(path: str | os.PathLike[str], *, peers_optional: bool = False) -> Config:
    """Read and parse the config file at ``path``; relative paths inside are resolved
    against the file's directory (so a config and its key can travel together)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
            reason = untrusted_reason(os.fstat(handle.fileno()), name, "config file")
    except OSError as exc:
        raise ConfigError(name, None, None, f"cannot read config: {exc.strerror}") from None
    if reason is not None:
        raise ConfigError(name, None, None, reason)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(name, line, None, "not valid UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(name))
    config = parse_config(text, name, base_dir=base)
    errors = _file_checks(config, text, name)
    if errors:
        raise ConfigError.combine(errors)
    # `vpnd --check --no-key` on the operator's machine: the peers directory, like the keys, is
    # only on the host (vpnctl checks the rendered peer files themselves).
    skip = peers_optional and config.peers_dir is not None and not os.path.isdir(config.peers_dir)
    if config.peers_dir is not None and not skip:
        config = replace(config, peers=load_peers(config))
    return config


def _file_checks(config: Config, text: str, path: str) -> list[ConfigError]:
    """Checks on the files a config names (run by :func:`load_config` only; parsing is pure):
    the hook scripts and modemchat file, which run with the daemon's rights, must be writable by
    no one but root or the current user (:mod:`.trusted`). Files that do not exist yet are left
    to the runtime, which reports them when used. (``randomdev`` is checked by the daemon when
    it opens it: ``vpnd -m`` may still read a key from a file.)"""
    lines = {keyword: number for number, keyword, _ in _lex(text)}
    errors: list[ConfigError] = []
    for name in ("linkup", "linkdown", "slipup", "slipdown", "modemchat"):
        value = getattr(config, name)
        if value is None or name not in lines:
            continue
        try:
            info = os.stat(value)
        except OSError:
            continue
        what = "modemchat file" if name == "modemchat" else f"{name} script"
        reason = untrusted_reason(info, value, what)
        if reason is not None:
            errors.append(ConfigError(path, lines[name], name, reason))
    return errors


# --------------------------------------------------------------------------------------------
# A hub's peer files

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
                message + " (peer files take remote, remote6, keyfile, nextkey, client, route1..9)",
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
    seen: dict[Network, int] = {}
    for number, route in routes:
        if remote is not None and route.gateway is not None and route.gateway not in own.values():
            want = own.get(route.version)
            fail(
                number,
                f"route{route.index}",
                f"gateway {route.gateway} must be this client's address"
                + (f" {want}" if want is not None else f" (it has no IPv{route.version} one)"),
            )
        if route.network in seen:
            fail(
                number,
                f"route{route.index}",
                f"same destination {route.network} as route{seen[route.network]}",
            )
        seen.setdefault(route.network, route.index)
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
