"""The operator's inventory (``inventory.yaml``): hosts, links, defaults -> a validated model.

Theory of operation
-------------------
The YAML text is *composed* (``yaml.compose``) rather than loaded, so every node keeps its
start mark and every problem can be reported as ``file:line path: message``, for example
``inventory.yaml:41 links[2].tunnel.client: 198.19.0.1 is already used by links[0]``.

Loading runs in stages, each collecting every problem it finds before giving up:

1. **Shape.** A small hand-written reader walks the node tree: unknown keys (with a difflib
   hint), wrong types, out-of-range values and duplicate YAML keys. Values resolve as
   link setting > ``defaults`` > built-in default; host settings (ssh, prefix, systemd) as
   host > ``defaults`` > built-in default.
2. **Cross checks.** Duplicate names and underlay addresses, links naming missing hosts,
   two TCP links on one server port (or two serial links on one device), colliding explicit
   tunnel addresses, overlapping routes on a host, routes that would swallow the carrier,
   interface names that clash on a host.
3. **Pool allocation** (:func:`allocate_tunnels`, called by the commands with the keystore's
   record). Links without ``tunnel:`` get a /30 block of ``defaults.tunnel_pool``: server
   = block + 1, client = block + 2. The home block is SHA-256(link name) modulo the number
   of blocks, probing upwards past blocks that hold a used address or overlap a route.
   Allocations are recorded in ``keystore/allocations.json`` and reused on every later run,
   so adding a link never moves another link's addresses, and the same inventory with the
   same record always yields the same addresses.

**Hubs** (``hubs:``): one server host for many client hosts (HUB-SPEC: one daemon, one port,
one peers directory). Each hub is checked like a link (host names, port, interface, routes on
every host that installs them) plus: a client listed twice, a client that is the hub's own
server, two clients with one address, overlapping routes behind two clients. Allocation
(:func:`allocate_hubs`, after the links) gives a hub without ``network:`` a /24 of the pool (home
block SHA-256(hub name), probing past used blocks; links' /30s avoid recorded hub networks) and
each client the next free address; both are recorded under ``"hubs"`` in ``allocations.json``.

Every accepted scalar records its line under its dotted path in ``Inventory.lines``; later
stages (allocation, rendering) use :meth:`Inventory.problem` to point at the right line.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from vpnd_runtime.config import (
    CIPHERS,
    IFNAMSIZ,
    IPOPTS_MAX,
    MTU_MAX,
    MTU_MIN,
    SENDBUF_MAX,
    SENDBUF_MIN,
    SERIAL_SPEEDS,
)

__all__ = [
    "DEFAULT_POOL",
    "HOOKS",
    "ROLES",
    "Host",
    "Hub",
    "HubClient",
    "Inventory",
    "InventoryError",
    "Link",
    "Problem",
    "Side",
    "Ssh",
    "Tunables",
    "UserError",
    "allocate_hubs",
    "allocate_tunnels",
    "hub_key_name",
    "load_inventory",
    "parse_inventory",
]

DEFAULT_POOL = IPv4Network("198.19.0.0/16")
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
#: IPv6 needs links of at least this MTU; a link below it stays IPv4-only unless told otherwise.
IPV6_MTU_MIN = 1280
DEFAULT_PORT = 379
HOOKS = ("linkup", "linkdown", "slipup", "slipdown")
ROLES = ("server", "client")
MAX_ROUTES = 9  # route1..route9 in the vpnd directive file
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SSH_HOST_RE = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
)
_PREFIX_RE = re.compile(r"/[A-Za-z0-9_./-]*")
_SSH_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: The account vpnd runs as (deploy creates it): a plain system user name, no numeric ids.
_DAEMON_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
DEFAULT_DAEMON_USER = "vpnd"
_SSH_JUMP_ONE = (
    r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?"
    r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_SSH_JUMP_RE = re.compile(rf"{_SSH_JUMP_ONE}(?:,{_SSH_JUMP_ONE})*")


class UserError(Exception):
    """A problem the operator can fix (bad input, missing key...).

    The vpnctl CLI prints ``str(error)`` to stderr and exits with code 2, never a traceback.
    Every vpnctl library error meant for the operator derives from this class.
    """


@dataclass(frozen=True)
class Problem:
    """One inventory problem: where it is (file, line, dotted path) and what is wrong."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class InventoryError(UserError):
    """The inventory is invalid; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.field))
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Ssh:
    """How ``deploy``/``status`` reach a host: ``ssh -p port -i identity user@host``."""

    host: str
    port: int = 22
    user: str = "root"
    identity: str | None = None
    options: tuple[str, ...] = ()
    proxyjump: str | None = None
    # "sudo": every remote command runs through ``sudo -n`` (the host's ``become:``), so the
    # ssh user need not be root; None: commands run as the ssh user (root)
    become: str | None = None


@dataclass(frozen=True)
class Host:
    """A machine that runs vpnd daemons.

    ``address`` is its underlay (WAN) address, the one clients dial. ``prefix`` is the
    directory under which /etc/vpnd, /run/vpnd... live on that host ("/" on a real host, a
    per-host directory in the lab). ``systemd`` is True, False or None (auto: deploy probes).
    ``daemon_user``/``daemon_group`` are the account vpnd runs as after start-up (rendered as the
    config's ``user``/``group`` and the unit's ``User=``/``Group=``; deploy creates it);
    ``root`` keeps the daemon root (no drop). The group defaults to the user's name.
    """

    name: str
    address: Address
    ssh: Ssh
    prefix: str = "/"
    systemd: bool | None = None
    index: int = 0
    #: A dual-stack host's IPv6 underlay address beside an IPv4 ``address`` (the lab gives the
    #: host both; clients dial ``address``).
    address6: IPv6Address | None = None

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Every underlay address of the host: ``address``, then ``address6``."""
        return (self.address,) if self.address6 is None else (self.address, self.address6)

    daemon_user: str = DEFAULT_DAEMON_USER
    daemon_group: str | None = None

    @property
    def run_as(self) -> tuple[str, str] | None:
        """(user, group) vpnd runs as on this host, or None when it stays root."""
        if self.daemon_user == "root":
            return None
        return self.daemon_user, self.daemon_group or self.daemon_user

    def path(self, *parts: str) -> str:
        """An absolute path on the host, below its prefix: ``path("etc/vpnd", "l.conf")``."""
        return posixpath.join(self.prefix, *parts)


@dataclass(frozen=True)
class Tunables:
    """Link settings that ``defaults`` may set and each link may override."""

    transport: str = "tcp"
    port: int = DEFAULT_PORT
    keepalive: float = 10.0
    noanswer: int = 3
    compress: int = 0  # 0 = off, 1..9 = zlib level
    cipher: str = "chacha20-poly1305"
    keyttl: float = 120.0
    mtu: int = 1400
    maxdelay: float | None = None
    ipopts: int = 0
    sendbuf: int = 65536
    speed: int = 115200
    localline: bool = False
    nortscts: bool = False
    xfilter: bool = False
    #: The link carries IPv6 beside IPv4 (a pool IPv6 pair, IPv6 routes); ``ipv6: false``
    #: opts out. None = the default: on, except on links whose MTU is below 1280.
    ipv6: bool | None = None


@dataclass(frozen=True)
class Side:
    """One end of a link: the host, its tunnel address and what lives behind it.

    ``routes`` are the networks *behind this side*; they become route1..9 directives in the
    *other* side's config, via this side's tunnel address.
    """

    host: str
    tunnel: Address | None
    routes: tuple[Network, ...] = ()
    hooks: tuple[tuple[str, str], ...] = ()
    device: str | None = None
    modemchat: str | None = None
    #: The IPv6 tunnel address beside an IPv4 ``tunnel`` (``tunnel6:`` or the IPv6 pool).
    tunnel6: IPv6Address | None = None


@dataclass(frozen=True)
class Link:
    """A point-to-point tunnel between a server host and a client host."""

    name: str
    server: Side
    client: Side
    interface: str
    tunables: Tunables
    index: int = 0

    def side(self, role: str) -> Side:
        """The ``"server"`` or ``"client"`` side."""
        return self.server if role == "server" else self.client

    @property
    def transport(self) -> str:
        """``tcp`` or ``serial``."""
        return self.tunables.transport

    @property
    def dual_stack(self) -> bool:
        """True when the link gets an IPv6 pair beside its IPv4 one (docs: "IPv6")."""
        if self.server.tunnel is not None and self.server.tunnel.version == 6:
            return False  # an IPv6-only tunnel has nothing to add
        wanted = self.tunables.ipv6
        if wanted is None:
            return self.tunables.mtu >= IPV6_MTU_MIN
        return wanted


@dataclass(frozen=True)
class HubClient:
    """One client of a hub: a host (its name is the client's name in the hub's peers
    directory), its tunnel address inside the hub's network and the networks behind it."""

    host: str
    tunnel: IPv4Address | None
    routes: tuple[Network, ...] = ()
    index: int = 0
    #: The client's IPv6 address in the hub's IPv6 network (a dual-stack hub; from the pool).
    tunnel6: IPv6Address | None = None

    @property
    def name(self) -> str:
        """The client's name: ``<name>.peer`` on the hub, ``<hub>.<name>`` in the keystore."""
        return self.host


@dataclass(frozen=True)
class Hub:
    """One vpnd server (one daemon, one port, one TUN) for many clients (HUB-SPEC.md).

    ``network`` is the hub's client network (the hub is its first address, clients get the
    following ones); None until :func:`allocate_hubs` takes a block from the pool. ``routes``
    are the networks behind the hub, routed to it by every client.
    """

    name: str
    server: str
    clients: tuple[HubClient, ...]
    interface: str
    tunables: Tunables
    network: IPv4Network | None = None
    routes: tuple[Network, ...] = ()
    hooks: tuple[tuple[str, str], ...] = ()  # run on the hub, per client
    client_hooks: tuple[tuple[str, str], ...] = ()  # run on every client
    clienttoclient: bool = True
    index: int = 0
    #: The hub's IPv6 client network (a /112 of the IPv6 pool) when the hub is dual-stack.
    network6: IPv6Network | None = None

    @property
    def tunnel(self) -> IPv4Address | None:
        """The hub's own tunnel address: the first address of its network."""
        return None if self.network is None else self.network.network_address + 1

    @property
    def tunnel6(self) -> IPv6Address | None:
        """The hub's own IPv6 tunnel address: the first address of its IPv6 network."""
        return None if self.network6 is None else self.network6.network_address + 1

    @property
    def dual_stack(self) -> bool:
        """True when the hub carries IPv6 beside IPv4 (on unless ``ipv6: false`` or MTU < 1280)."""
        wanted = self.tunables.ipv6
        return self.tunables.mtu >= IPV6_MTU_MIN if wanted is None else wanted

    def client(self, name: str) -> HubClient:
        """The client called ``name`` (KeyError when there is none)."""
        for client in self.clients:
            if client.name == name:
                return client
        raise KeyError(name)


def hub_key_name(hub: str, client: str) -> str:
    """The keystore name of the key a hub shares with one client: ``<hub>.<client>``.

    Link and host names never contain a dot, so this never collides with a link's key."""
    return f"{hub}.{client}"


@dataclass(frozen=True)
class Inventory:
    """A validated inventory. ``lines`` maps dotted field paths to their source lines."""

    file: str
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    pool: IPv4Network = DEFAULT_POOL
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    hubs: tuple[Hub, ...] = ()
    #: ``defaults.tunnel_pool6`` (a /64 or wider); None = a ULA /64 derived for this inventory.
    pool6: IPv6Network | None = None
    #: ``defaults.key_max_age`` in seconds: `vpnctl keys` warns about older keys (None: never).
    key_max_age: float | None = None

    def hub(self, name: str) -> Hub:
        """The hub called ``name`` (KeyError when there is none)."""
        for hub in self.hubs:
            if hub.name == name:
                return hub
        raise KeyError(name)

    def key_names(self) -> list[str]:
        """Every key the inventory needs: one per link, one per hub client (in file order)."""
        names = [link.name for link in self.links]
        for hub in self.hubs:
            names += [hub_key_name(hub.name, c.name) for c in hub.clients]
        return names

    def host(self, name: str) -> Host:
        """The host called ``name`` (KeyError when there is none)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def link(self, name: str) -> Link:
        """The link called ``name`` (KeyError when there is none)."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    def line_of(self, path: str) -> int | None:
        """The source line of ``path``, or of its nearest recorded parent."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None

    def problem(self, path: str, message: str) -> Problem:
        """A :class:`Problem` located at ``path`` (its line looked up in ``lines``)."""
        return Problem(self.file, self.line_of(path), path, message)


# --------------------------------------------------------------------------------------------
# Stage 1: the shape reader

_MISSING = object()


def _read_age(r: _Reader, node: yaml.Node, path: str) -> float | None:
    """An age like ``90d`` (vpnctl/rotation.py's parse_age), its problem at the node's line."""
    from vpnctl.rotation import parse_age  # noqa: PLC0415 - vpnctl.rotation imports this module

    value = r.scalar(node, path)
    if value is _MISSING:
        return None
    try:
        return parse_age(str(value), path)
    except UserError as exc:
        r.fail(node, path, str(exc).removeprefix(f"{path}: "))
        return None


class _Reader:
    """Typed accessors over composed YAML nodes that record lines and collect problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        self._constructor = SafeConstructor()

    def fail(self, node: yaml.Node | int | None, path: str, message: str) -> None:
        line = node if isinstance(node, int) or node is None else node.start_mark.line + 1
        self.problems.append(Problem(self.file, line, path, message))

    def scalar(self, node: yaml.Node, path: str) -> Any:
        """The Python value of a scalar node, or _MISSING (problem recorded) otherwise."""
        self.lines[path] = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
            self.fail(node, path, f"expected a single value, got {kind}")
            return _MISSING
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            self.fail(node, path, f"cannot read value: {exc.problem}")
            return _MISSING

    def mapping(
        self, node: yaml.Node, path: str, allowed: Iterable[str]
    ) -> dict[str, yaml.Node] | None:
        """Key -> value node of a mapping; unknown and duplicate keys are problems."""
        self.lines[path] = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, path, f"expected a mapping (key: value), got {_kind(node)}")
            return None
        own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
        try:
            self._constructor.flatten_mapping(node)  # YAML merge keys (<<: *common)
        except ConstructorError as exc:
            self.fail(node, path, f"cannot merge: {exc.problem}")
            return None
        merged = len(node.value) - own  # flatten_mapping puts merged pairs first
        allowed = list(allowed)
        result: dict[str, yaml.Node] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.fail(key_node, path or "(top)", "keys must be plain words")
            elif index < merged and key in allowed:
                result[key] = value_node  # merged values may be overridden by the mapping's own
            elif key in result and index - 1 >= merged and _own_key(node, merged, index, key):
                first = result[key].start_mark.line + 1
                self.fail(key_node, sub, f"duplicate key (first given on line {first})")
            elif key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                known = (
                    f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(allowed)}"
                )
                self.fail(key_node, sub, f"unknown key; {known}")
            else:
                result[key] = value_node
        return result

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | None:
        """The items of a list node."""
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, f"expected a list, got {_kind(node)}")
            return None
        return list(node.value)

    # ---- typed scalars --------------------------------------------------------------------
    def text(self, node: yaml.Node, path: str, *, spaces: bool = False) -> str | None:
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or value == "":
            self.fail(node, path, f"expected a non-empty string, got {_show(value)}")
            return None
        if not spaces and (any(c.isspace() for c in value) or "\0" in value):
            self.fail(node, path, f"must not contain spaces: {value!r}")
            return None
        return value

    def name(self, node: yaml.Node, path: str) -> str | None:
        value = self.text(node, path)
        if value is not None and not _NAME_RE.fullmatch(value):
            self.fail(
                node,
                path,
                f"{value!r} is not a valid name: use 1..63 of a-z 0-9 _ - (starting with a letter "
                "or digit); names become file and unit names",
            )
            return None
        return value

    def integer(self, node: yaml.Node, path: str, low: int, high: int) -> int | None:
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, path, f"expected a whole number, got {_show(value)}")
            return None
        if not low <= value <= high:
            self.fail(node, path, f"must be between {low} and {high}, got {value}")
            return None
        return value

    def seconds(self, node: yaml.Node, path: str) -> float | None:
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(node, path, f"expected a number of seconds, got {_show(value)}")
            return None
        if not 0 < value < 1e9:
            self.fail(node, path, f"must be a positive number of seconds, got {value}")
            return None
        return float(value)

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        if not isinstance(value, bool):
            self.fail(node, path, f"expected true or false, got {_show(value)}")
            return None
        return value

    def choice(self, node: yaml.Node, path: str, choices: Iterable[str]) -> str | None:
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        choices = list(choices)
        if value not in choices:
            self.fail(node, path, f"must be one of {', '.join(choices)}; got {_show(value)}")
            return None
        return str(value)

    def address(self, node: yaml.Node, path: str, version: int | None = None) -> Address | None:
        """An address of IP `version` (4, 6 or None: either family)."""
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        try:
            address = ip_address(str(value)) if isinstance(value, str) else None
        except ValueError:
            address = None
        if address is None or (version is not None and address.version != version):
            like = {4: "an IPv4 address like 198.18.1.1", 6: "an IPv6 address like 2001:db8::1"}
            want = like.get(version or 0, "an IP address like 198.18.1.1 or 2001:db8::1")
            self.fail(node, path, f"expected {want}, got {_show(value)}"
                      + _family_hint(value, want.rsplit(" like", 1)[0], version))  # fmt: skip
            return None
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            self.fail(node, path, f"{address} is not a usable unicast address")
            return None
        if address.version == 6 and address.ipv4_mapped is not None:
            self.fail(node, path, f"{address} is an IPv4 address in IPv6 clothing: write "
                                  f"{address.ipv4_mapped}")  # fmt: skip
            return None
        return address

    def network(self, node: yaml.Node, path: str, version: int | None = 4) -> Network | None:
        """A network of IP `version` (4, 6 or None: either family)."""
        value = self.scalar(node, path)
        if value is _MISSING:
            return None
        like = {
            4: "a network like 198.18.10.0/24",
            6: "a network like fd00:5::/64",
            None: "a network like 198.18.10.0/24 or 2001:db8:10::/48",
        }[version]
        if not isinstance(value, str):
            self.fail(node, path, f"expected {like}, got {_show(value)}")
            return None
        try:
            found = ip_network(value)
            if version is not None and found.version != version:
                raise ValueError(f"IPv{found.version}")
            if found.version == 6 and found.subnet_of(_MAPPED):  # type: ignore[arg-type]
                self.fail(node, path, f"{found} is IPv4 space in IPv6 clothing (::ffff:0:0/96): "
                                      "write the IPv4 network")  # fmt: skip
                return None
            return found
        except ValueError as exc:
            try:
                loose = ip_network(value, strict=False)
                if version is not None and loose.version != version:
                    raise ValueError(f"IPv{loose.version}")
            except ValueError:
                what = f"an IPv{version} network" if version else "a network"
                hint = _family_hint(value, what, version) or _netmask_hint(value)
                self.fail(node, path, f"expected {like}, got "
                          f"{_show(value)}" + (hint or f": {exc}"))  # fmt: skip
                return None
            self.fail(node, path, f"{value} has host bits set; did you mean {loose}?")
            return None

    def path_value(self, node: yaml.Node, path: str) -> str | None:
        value = self.text(node, path)
        if value is not None and not value.startswith("/"):
            self.fail(node, path, f"must be an absolute path (starting with /), got {value!r}")
            return None
        return value


_MAPPED = IPv6Network("::ffff:0:0/96")


def _family_hint(value: object, takes: str, version: int | None = 4) -> str:
    """``"; this field takes an IPv4 address, 2001:db8::1 is IPv6"`` when ``value`` is an
    address or network of the other family than `version`, else ""."""
    if version is None:
        return ""
    text = str(value)
    for parse in (ip_address, ip_network):
        try:
            found = parse(text) if parse is ip_address else parse(text, strict=False)
        except ValueError:
            continue
        if found.version != version:
            return f"; this field takes {takes}, {text} is IPv{found.version}"
    return ""


def _netmask_hint(value: str) -> str:
    """``"; write 198.18.30.0/24"`` for ``198.18.30.0 255.255.255.0`` (address and netmask,
    as in ifconfig or a Cisco config), else ""."""
    words = value.split()
    if len(words) == 2:
        with contextlib.suppress(ValueError):
            return f"; write {IPv4Network('/'.join(words), strict=False)}"
    return ""


def _yaml_snippet(text: str, mark: yaml.Mark | None) -> str:
    """The offending line with a caret under the column, and a hint when it holds a tab."""
    if mark is None:
        return ""
    lines = text.splitlines()
    if not 0 <= mark.line < len(lines):
        return ""
    line = lines[mark.line]
    shown = line.replace("\t", " ")
    out = f"\n  {shown}\n  {' ' * min(mark.column, len(shown))}^"
    if "\t" in line:
        out += "\n  hint: this line holds a tab; YAML indents with spaces only"
    return out


def _own_key(node: yaml.MappingNode, merged: int, index: int, key: str) -> bool:
    """True when ``key`` already appeared among the mapping's own pairs before ``index``."""
    return any(
        isinstance(k, yaml.ScalarNode) and k.value == key for k, _ in node.value[merged:index]
    )


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}" if node.value != "" else "nothing"


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# ---- tunables: one table drives defaults and per-link overrides ------------------------------

_SERIAL_ONLY = ("speed", "localline", "nortscts", "xfilter")
_TCP_ONLY = ("port", "ipopts")


def _read_compress(r: _Reader, node: yaml.Node, path: str) -> int | None:
    value = r.scalar(node, path)
    if value is _MISSING:
        return None
    if value is False:
        return 0
    if value is True:
        return 1
    if isinstance(value, int) and 1 <= value <= 9:
        return value
    r.fail(node, path, f"expected false, true or a zlib level 1..9, got {_show(value)}")
    return None


def _read_speed(r: _Reader, node: yaml.Node, path: str) -> int | None:
    value = r.integer(node, path, 1, 4_000_000)
    if value is not None and value not in SERIAL_SPEEDS:
        near = min(SERIAL_SPEEDS, key=lambda s: abs(s - value))
        r.fail(node, path, f"{value} is not a serial line speed (nearest: {near})")
        return None
    return value


_TUNABLE_READERS: dict[str, Callable[[_Reader, yaml.Node, str], Any]] = {
    "transport": lambda r, n, p: r.choice(n, p, ("tcp", "udp", "serial")),
    "port": lambda r, n, p: r.integer(n, p, 1, 65535),
    "keepalive": lambda r, n, p: r.seconds(n, p),
    "noanswer": lambda r, n, p: r.integer(n, p, 1, 1_000_000),
    "compress": _read_compress,
    "cipher": lambda r, n, p: r.choice(n, p, CIPHERS),
    "keyttl": lambda r, n, p: r.seconds(n, p),
    "mtu": lambda r, n, p: r.integer(n, p, MTU_MIN, MTU_MAX),
    "maxdelay": lambda r, n, p: r.seconds(n, p),
    "ipopts": lambda r, n, p: r.integer(n, p, 0, IPOPTS_MAX),
    "sendbuf": lambda r, n, p: r.integer(n, p, SENDBUF_MIN, SENDBUF_MAX),
    "speed": _read_speed,
    "localline": lambda r, n, p: r.boolean(n, p),
    "nortscts": lambda r, n, p: r.boolean(n, p),
    "xfilter": lambda r, n, p: r.boolean(n, p),
    "ipv6": lambda r, n, p: r.boolean(n, p),
}
_HOST_SETTINGS = ("ssh", "prefix", "systemd", "daemon_user", "daemon_group", "become")
_DEFAULTS_KEYS = (
    *_HOST_SETTINGS,
    "tunnel_pool",
    "tunnel_pool6",
    "key_max_age",
    *_TUNABLE_READERS,
)
_SSH_KEYS = ("host", "port", "user", "identity", "options", "proxyjump")
_HOST_KEYS = ("name", "address", "address6", *_HOST_SETTINGS)
_LINK_KEYS = (
    "name",
    "server",
    "client",
    "tunnel",
    "tunnel6",
    "routes",
    "hooks",
    "devices",
    "modemchat",
    "interface",
    *_TUNABLE_READERS,
)


_HUB_KEYS = (
    "name",
    "server",
    "clients",
    "network",
    "routes",
    "hooks",
    "interface",
    "clienttoclient",
    *(key for key in _TUNABLE_READERS if key not in _SERIAL_ONLY),
)
_HUB_CLIENT_KEYS = ("host", "tunnel", "routes")
MAX_HUB_CLIENTS = 4096


def _read_tunables(r: _Reader, fields: Mapping[str, yaml.Node], path: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, reader in _TUNABLE_READERS.items():
        if key in fields:
            value = reader(r, fields[key], f"{path}.{key}")
            if value is not None:
                values[key] = value
    return values


def _read_ssh(r: _Reader, node: yaml.Node, path: str) -> dict[str, Any]:
    fields = r.mapping(node, path, _SSH_KEYS)
    if fields is None:
        return {}
    out: dict[str, Any] = {}
    # host, user and jump host go on ssh's command line: a leading '-' would be read as an
    # option (``-oProxyCommand=...`` runs a command on the operator's machine), so only plain
    # host/user syntax is accepted.
    for key, pattern, what in (
        ("host", _SSH_HOST_RE, "a host name or address"),
        ("user", _SSH_USER_RE, "a user name (letters, digits, _ . -)"),
        ("proxyjump", _SSH_JUMP_RE, "[user@]host[:port][,...]"),
    ):
        if key not in fields:
            continue
        value = r.text(fields[key], f"{path}.{key}")
        if value is not None and not pattern.fullmatch(value):
            r.fail(fields[key], f"{path}.{key}", f"expected {what}, not starting with '-': "
                                                 f"{value!r}")  # fmt: skip
        elif value is not None:
            out[key] = value
    if "port" in fields:
        out["port"] = r.integer(fields["port"], f"{path}.port", 1, 65535)
    if "identity" in fields:
        out["identity"] = r.text(fields["identity"], f"{path}.identity", spaces=True)
    if "options" in fields:
        items = r.sequence(fields["options"], f"{path}.options")
        options = []
        for i, item in enumerate(items or []):
            option = r.text(item, f"{path}.options[{i}]", spaces=True)
            if option is not None and "=" not in option:
                r.fail(item, f"{path}.options[{i}]", f"expected Key=value, got {option!r}")
            elif option is not None:
                options.append(option)
        out["options"] = tuple(options)
    return {k: v for k, v in out.items() if v is not None}


def _read_host_settings(r: _Reader, fields: Mapping[str, yaml.Node], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "ssh" in fields:
        out["ssh"] = _read_ssh(r, fields["ssh"], f"{path}.ssh")
    if "prefix" in fields:
        prefix = r.path_value(fields["prefix"], f"{path}.prefix")
        if prefix is not None:
            normal = posixpath.normpath(prefix)
            if ".." in normal.split("/"):
                r.fail(fields["prefix"], f"{path}.prefix", f"must not contain '..': {prefix!r}")
            elif not _PREFIX_RE.fullmatch(prefix):
                # it ends up in systemd units and shell lines: no %, $, quotes or spaces
                r.fail(fields["prefix"], f"{path}.prefix",
                       f"use only letters, digits and _ . - / in a prefix: {prefix!r}")  # fmt: skip
            else:
                out["prefix"] = "/" + normal.lstrip("/")
    for key in ("daemon_user", "daemon_group"):
        if key in fields:
            value = r.text(fields[key], f"{path}.{key}")
            if value is not None and not _DAEMON_USER_RE.fullmatch(value):
                r.fail(fields[key], f"{path}.{key}", f"expected a system account name "
                       f"(a-z 0-9 _ -, starting with a letter or _), got {value!r}")  # fmt: skip
            elif value == "root" and key == "daemon_group":
                r.fail(fields[key], f"{path}.{key}", "root's group: name an unprivileged one")
            elif value is not None:
                out[key] = value
    if "become" in fields:  # Ansible's word: how a non-root ssh user gets root
        value = r.scalar(fields["become"], f"{path}.become")
        if value == "sudo" or value is True:
            out["become"] = "sudo"
        elif value == "none" or value is False:
            out["become"] = None
        elif value is not _MISSING:
            r.fail(fields["become"], f"{path}.become",
                   f"expected sudo or none, got {_show(value)}")  # fmt: skip
    if "systemd" in fields:
        value = r.scalar(fields["systemd"], f"{path}.systemd")
        if value == "auto":
            out["systemd"] = None
        elif isinstance(value, bool):
            out["systemd"] = value
        elif value is not _MISSING:
            r.fail(
                fields["systemd"],
                f"{path}.systemd",
                f"expected true, false or auto, got {_show(value)}",
            )
    return out


def _per_side(
    r: _Reader, node: yaml.Node, path: str, read: Callable[[yaml.Node, str], Any]
) -> dict[str, Any]:
    """A ``{server: ..., client: ...}`` mapping read with ``read``; missing sides are absent."""
    fields = r.mapping(node, path, ROLES)
    if fields is None:
        return {}
    out = {}
    for role in ROLES:
        if role in fields:
            value = read(fields[role], f"{path}.{role}")
            if value is not None:
                out[role] = value
    return out


def _read_routes(r: _Reader, node: yaml.Node, path: str) -> tuple[Network, ...] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    if len(items) > MAX_ROUTES:
        r.fail(
            items[MAX_ROUTES],
            f"{path}[{MAX_ROUTES}]",
            f"at most {MAX_ROUTES} routes per side (vpnd has route1..route9)",
        )
    nets = [r.network(item, f"{path}[{i}]", None) for i, item in enumerate(items[:MAX_ROUTES])]
    return tuple(n for n in nets if n is not None)


def _read_hooks(r: _Reader, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...] | None:
    fields = r.mapping(node, path, HOOKS)
    if fields is None:
        return None
    out = []
    for hook in HOOKS:
        if hook in fields:
            value = r.path_value(fields[hook], f"{path}.{hook}")
            if value is not None:
                out.append((hook, value))
    return tuple(out)


def _derived_interface(name: str) -> str:
    """The default TUN name of a link: ``vpn-`` + the link name, cut to 15 characters."""
    return ("vpn-" + name)[:IFNAMSIZ]


def _pool_block(network: IPv4Network) -> bool:
    return network.prefixlen <= 30


def parse_inventory(text: str, file: str = "inventory.yaml") -> Inventory:
    """Parse and validate inventory ``text`` (``file`` is used in messages).

    Tunnel addresses left out stay None; :func:`allocate_tunnels` fills them in.
    Raises :class:`InventoryError` listing every problem found.
    """
    r = _Reader(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        message = f"not valid YAML: {exc.problem}{_yaml_snippet(text, mark)}"
        raise InventoryError([Problem(file, line, "", message)]) from None
    except yaml.YAMLError as exc:
        raise InventoryError([Problem(file, None, "", f"not valid YAML: {exc}")]) from None
    if root is None:
        raise InventoryError(
            [
                Problem(
                    file,
                    1,
                    "",
                    "the inventory is empty: it needs hosts and links (see inventory.example.yaml)",
                )
            ]
        )
    top = r.mapping(root, "", ("version", "defaults", "hosts", "links", "hubs"))
    if top is None:
        raise InventoryError(r.problems)
    if "version" in top:
        r.integer(top["version"], "version", 1, 1)

    # ---- defaults -------------------------------------------------------------------------
    defaults_fields: Mapping[str, yaml.Node] = {}
    if "defaults" in top:
        defaults_fields = r.mapping(top["defaults"], "defaults", _DEFAULTS_KEYS) or {}
    default_host = _read_host_settings(r, defaults_fields, "defaults")
    default_tunables = _read_tunables(r, defaults_fields, "defaults")
    pool = DEFAULT_POOL
    if "tunnel_pool" in defaults_fields:
        got = r.network(defaults_fields["tunnel_pool"], "defaults.tunnel_pool")
        if got is not None and not _pool_block(got):
            r.fail(
                defaults_fields["tunnel_pool"],
                "defaults.tunnel_pool",
                f"{got} is too small: the pool hands out /30 blocks",
            )
        elif got is not None:
            pool = got
    pool6 = None
    if "tunnel_pool6" in defaults_fields:
        got6 = r.network(defaults_fields["tunnel_pool6"], "defaults.tunnel_pool6", 6)
        if got6 is not None and got6.prefixlen > 64:
            r.fail(
                defaults_fields["tunnel_pool6"],
                "defaults.tunnel_pool6",
                f"{got6} is too small: give a /64 (or wider) for the IPv6 pool",
            )
        elif got6 is not None:
            pool6 = got6
    key_max_age = None
    if "key_max_age" in defaults_fields:
        key_max_age = _read_age(r, defaults_fields["key_max_age"], "defaults.key_max_age")
    if "ssh" in default_host and "host" in default_host["ssh"]:
        r.fail(
            r.lines["defaults.ssh.host"],
            "defaults.ssh.host",
            "the ssh target is per host: set hosts[N].ssh.host instead",
        )

    # ---- hosts ----------------------------------------------------------------------------
    hosts: list[Host] = []
    for i, node in enumerate(_required_list(r, top, "hosts", root)):
        path = f"hosts[{i}]"
        fields = r.mapping(node, path, _HOST_KEYS)
        if fields is None:
            continue
        name = r.name(fields["name"], f"{path}.name") if "name" in fields else None
        address = r.address(fields["address"], f"{path}.address") if "address" in fields else None
        address6 = (
            r.address(fields["address6"], f"{path}.address6", 6) if "address6" in fields else None
        )
        if address6 is not None and address is not None and address.version == 6:
            r.fail(
                fields["address6"],
                f"{path}.address6",
                f"address is already IPv6 ({address}); address6 goes beside an IPv4 address",
            )
        for key in ("name", "address"):
            if key not in fields:
                r.fail(node, f"{path}.{key}", f"missing required key {key!r}")
        own = _read_host_settings(r, fields, path)
        if name is None or address is None:
            continue
        ssh_values = {**default_host.get("ssh", {}), **own.get("ssh", {})}
        ssh_values.setdefault("host", str(address))
        if "become" in own or "become" in default_host:
            ssh_values["become"] = own.get("become", default_host.get("become"))
        hosts.append(
            Host(
                name=name,
                address=address,
                ssh=Ssh(**ssh_values),
                prefix=own.get("prefix", default_host.get("prefix", "/")),
                systemd=own.get("systemd", default_host.get("systemd")),
                index=i,
                address6=address6,  # type: ignore[arg-type]
                daemon_user=own.get(
                    "daemon_user", default_host.get("daemon_user", DEFAULT_DAEMON_USER)
                ),
                daemon_group=own.get("daemon_group", default_host.get("daemon_group")),
            )
        )

    # ---- links ----------------------------------------------------------------------------
    links: list[Link] = []
    explicit: dict[int, dict[str, Any]] = {}
    if "hubs" in top and "links" not in top:
        link_nodes: list = []  # an inventory of hubs only
    elif "hubs" in top:
        link_nodes = r.sequence(top["links"], "links") or []
    else:
        link_nodes = _required_list(r, top, "links", root)
    for i, node in enumerate(link_nodes):
        path = f"links[{i}]"
        fields = r.mapping(node, path, _LINK_KEYS)
        if fields is None:
            continue
        ok = True
        for key in ("name", "server", "client"):
            if key not in fields:
                r.fail(node, f"{path}.{key}", f"missing required key {key!r}")
                ok = False
        name = r.name(fields["name"], f"{path}.name") if "name" in fields else None
        ends = {role: r.name(fields[role], f"{path}.{role}") for role in ROLES if role in fields}
        own_tunables = _read_tunables(r, fields, path)
        explicit[i] = own_tunables
        tunables = Tunables(**{**default_tunables, **own_tunables})
        tunnel = (
            _per_side(r, fields["tunnel"], f"{path}.tunnel", r.address)
            if "tunnel" in fields
            else {}
        )
        if (
            "tunnel" in fields
            and set(tunnel) != set(ROLES)
            and not _has_problem(r, f"{path}.tunnel")
        ):
            r.fail(
                fields["tunnel"],
                f"{path}.tunnel",
                "give both server and client addresses, or leave tunnel out to use the pool",
            )
        if tunnel.keys() == set(ROLES) and tunnel["server"].version != tunnel["client"].version:
            r.fail(
                r.lines.get(f"{path}.tunnel.client"),
                f"{path}.tunnel.client",
                f"{tunnel['client']} and the server's {tunnel['server']} are of different "
                "families: put the IPv6 pair under tunnel6",
            )
        tunnel6 = (
            _per_side(r, fields["tunnel6"], f"{path}.tunnel6", lambda n, p: r.address(n, p, 6))
            if "tunnel6" in fields
            else {}
        )
        if (
            "tunnel6" in fields
            and set(tunnel6) != set(ROLES)
            and not _has_problem(r, f"{path}.tunnel6")
        ):
            r.fail(
                fields["tunnel6"],
                f"{path}.tunnel6",
                "give both server and client IPv6 addresses, or leave tunnel6 out to use the pool",
            )
        routes = (
            _per_side(r, fields["routes"], f"{path}.routes", lambda n, p: _read_routes(r, n, p))
            if "routes" in fields
            else {}
        )
        hooks = (
            _per_side(r, fields["hooks"], f"{path}.hooks", lambda n, p: _read_hooks(r, n, p))
            if "hooks" in fields
            else {}
        )
        devices = (
            _per_side(r, fields["devices"], f"{path}.devices", r.path_value)
            if "devices" in fields
            else {}
        )
        modemchat = (
            _per_side(r, fields["modemchat"], f"{path}.modemchat", r.path_value)
            if "modemchat" in fields
            else {}
        )
        interface = None
        if "interface" in fields:
            interface = r.text(fields["interface"], f"{path}.interface")
            if interface is not None and (
                len(interface) > IFNAMSIZ or not _IFNAME_RE.fullmatch(interface)
            ):
                r.fail(
                    fields["interface"],
                    f"{path}.interface",
                    f"{interface!r} is not an interface name: 1..{IFNAMSIZ} of A-Z a-z 0-9 _ . -",
                )
                interface = None

        if tunables.transport == "serial":
            for role in ROLES:
                if role not in devices:
                    r.fail(
                        fields.get("devices", node),
                        f"{path}.devices.{role}",
                        f"a serial link needs the {role}'s serial device, e.g. /dev/ttyS0",
                    )
                    ok = False
            for key in _TCP_ONLY:
                if key in own_tunables:
                    r.fail(fields[key], f"{path}.{key}", "applies only to tcp links")
        else:
            for key in ("devices", "modemchat"):
                if key in fields:
                    r.fail(
                        fields[key],
                        f"{path}.{key}",
                        "applies only to serial links (set transport: serial)",
                    )
            for key in _SERIAL_ONLY:
                if key in own_tunables:
                    r.fail(
                        fields[key],
                        f"{path}.{key}",
                        "applies only to serial links (set transport: serial)",
                    )
        if not ok or name is None or None in ends.values() or len(ends) != 2:
            continue
        sides = {
            role: Side(
                host=ends[role],
                tunnel=tunnel.get(role),
                routes=routes.get(role, ()),
                hooks=hooks.get(role, ()),
                device=devices.get(role),
                modemchat=modemchat.get(role),
                tunnel6=tunnel6.get(role),  # type: ignore[arg-type]
            )
            for role in ROLES
        }
        links.append(
            Link(
                name=name,
                server=sides["server"],
                client=sides["client"],
                interface=interface or _derived_interface(name),
                tunables=tunables,
                index=i,
            )
        )
    hubs = _read_hubs(r, top["hubs"], default_tunables) if "hubs" in top else []
    if r.problems:
        raise InventoryError(r.problems)

    inventory = Inventory(
        file, tuple(hosts), tuple(links), pool, dict(r.lines), tuple(hubs), pool6=pool6,
        key_max_age=key_max_age,
    )  # fmt: skip
    problems = _cross_check(
        inventory,
        explicit_interface={
            link.index for link in links if f"links[{link.index}].interface" in r.lines
        },
    )
    if problems:
        raise InventoryError(problems)
    return inventory


def _read_hub_client(r: _Reader, node: yaml.Node, path: str) -> HubClient | None:
    """A client of a hub: a host name, or ``{host: NAME, tunnel: ADDRESS, routes: [...]}``."""
    if isinstance(node, yaml.ScalarNode):
        host = r.name(node, path)
        if host is None:
            return None
        r.lines[f"{path}.host"] = node.start_mark.line + 1
        return HubClient(host=host, tunnel=None)
    fields = r.mapping(node, path, _HUB_CLIENT_KEYS)
    if fields is None:
        return None
    if "host" not in fields:
        r.fail(node, f"{path}.host", "missing required key 'host' (the client's host name)")
        return None
    host = r.name(fields["host"], f"{path}.host")
    tunnel = r.address(fields["tunnel"], f"{path}.tunnel", 4) if "tunnel" in fields else None
    routes = _read_routes(r, fields["routes"], f"{path}.routes") if "routes" in fields else ()
    if host is None or ("tunnel" in fields and tunnel is None) or routes is None:
        return None
    return HubClient(host=host, tunnel=tunnel, routes=routes)


def _read_hubs(r: _Reader, node: yaml.Node, default_tunables: Mapping[str, Any]) -> list[Hub]:
    """The ``hubs:`` section: each a server host, its client hosts and hub-wide settings."""
    hubs: list[Hub] = []
    for i, item in enumerate(r.sequence(node, "hubs") or []):
        path = f"hubs[{i}]"
        fields = r.mapping(item, path, _HUB_KEYS)
        if fields is None:
            continue
        ok = True
        for key in ("name", "server", "clients"):
            if key not in fields:
                r.fail(item, f"{path}.{key}", f"missing required key {key!r}")
                ok = False
        name = r.name(fields["name"], f"{path}.name") if "name" in fields else None
        server = r.name(fields["server"], f"{path}.server") if "server" in fields else None
        own = _read_tunables(r, fields, path)
        base = {k: v for k, v in default_tunables.items() if k not in _SERIAL_ONLY}
        if base.get("transport", "tcp") != "tcp" and "transport" not in own:
            base["transport"] = "tcp"  # defaults.transport: serial applies to links only
        tunables = Tunables(**{**base, **own})
        if tunables.transport != "tcp":
            r.fail(
                fields["transport"],
                f"{path}.transport",
                "a hub serves its clients over tcp; serial is for point-to-point links",
            )
            ok = False
        network = None
        if "network" in fields:
            network = r.network(fields["network"], f"{path}.network")
            if network is not None and network.prefixlen > 30:
                r.fail(
                    fields["network"],
                    f"{path}.network",
                    f"{network} is too small: it holds the hub and its clients",
                )
                network = None
            ok = ok and network is not None
        routes = _read_routes(r, fields["routes"], f"{path}.routes") if "routes" in fields else ()
        hooks = (
            _per_side(r, fields["hooks"], f"{path}.hooks", lambda n, p: _read_hooks(r, n, p))
            if "hooks" in fields
            else {}
        )
        c2c = True
        if "clienttoclient" in fields:
            got = r.boolean(fields["clienttoclient"], f"{path}.clienttoclient")
            c2c = bool(got) if got is not None else True
        interface = None
        if "interface" in fields:
            interface = r.text(fields["interface"], f"{path}.interface")
            if interface is not None and (
                len(interface) > IFNAMSIZ or not _IFNAME_RE.fullmatch(interface)
            ):
                r.fail(
                    fields["interface"],
                    f"{path}.interface",
                    f"{interface!r} is not an interface name: 1..{IFNAMSIZ} of A-Z a-z 0-9 _ . -",
                )
                interface = None
        own_networks = 1 + (tunables.ipv6 is not False and tunables.mtu >= IPV6_MTU_MIN)
        if routes is not None and len(routes) + (own_networks if c2c else 0) > MAX_ROUTES:
            r.fail(
                fields["routes"],
                f"{path}.routes",
                f"at most {MAX_ROUTES - own_networks} routes behind a hub with clienttoclient "
                "(each client also routes the hub's network"
                + (" of each family" if own_networks == 2 else "")
                + "), or set clienttoclient: false",
            )
        clients: list[HubClient] = []
        items = r.sequence(fields["clients"], f"{path}.clients") if "clients" in fields else None
        if items is not None and not items:
            r.fail(fields["clients"], f"{path}.clients", "the list of clients is empty")
        if items is not None and len(items) > MAX_HUB_CLIENTS:
            r.fail(
                fields["clients"], f"{path}.clients", f"at most {MAX_HUB_CLIENTS} clients per hub"
            )
        for j, client_node in enumerate(items or []):
            client = _read_hub_client(r, client_node, f"{path}.clients[{j}]")
            if client is not None:
                clients.append(replace(client, index=j))
        if not ok or name is None or server is None or routes is None or not clients:
            continue
        hubs.append(
            Hub(
                name=name,
                server=server,
                clients=tuple(clients),
                interface=interface or _derived_interface(name),
                tunables=tunables,
                network=network,
                routes=routes,
                hooks=hooks.get("server", ()),
                client_hooks=hooks.get("client", ()),
                clienttoclient=c2c,
                index=i,
            )
        )
    return hubs


def _has_problem(r: _Reader, prefix: str) -> bool:
    return any(p.field.startswith(prefix) for p in r.problems)


def _required_list(r: _Reader, top: Mapping[str, yaml.Node], key: str, root: yaml.Node) -> list:
    if key not in top:
        r.fail(root, key, f"missing required key {key!r} (a list of {key})")
        return []
    items = r.sequence(top[key], key)
    if items is not None and not items:
        r.fail(top[key], key, f"the list of {key} is empty")
    return items or []


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate the inventory file at ``path`` (see :func:`parse_inventory`)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(
            [
                Problem(
                    name,
                    None,
                    "",
                    "no such inventory file (start from "
                    "inventory.example.yaml: cp inventory.example.yaml "
                    "inventory.yaml)",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError([Problem(name, None, "", f"cannot read inventory: {exc}")]) from None
    return parse_inventory(text, name)


# --------------------------------------------------------------------------------------------
# Stage 2: cross checks


def _cross_check(inv: Inventory, explicit_interface: set[int]) -> list[Problem]:
    problems: list[Problem] = []
    add = problems.append

    hosts_by_name: dict[str, Host] = {}
    underlay: dict[Address, str] = {}
    for host in inv.hosts:
        path = f"hosts[{host.index}]"
        if host.name in hosts_by_name:
            add(
                inv.problem(
                    f"{path}.name",
                    f"duplicate host name {host.name!r} "
                    f"(also hosts[{hosts_by_name[host.name].index}])",
                )
            )
            continue
        hosts_by_name[host.name] = host
        for key, address in (("address", host.address), ("address6", host.address6)):
            if address is None:
                continue
            if address in underlay:
                add(
                    inv.problem(
                        f"{path}.{key}", f"{address} is already used by {underlay[address]}"
                    )
                )
            else:
                underlay[address] = f"{path}.{key}"
            if inv.pool6 is not None and address in inv.pool6:
                add(
                    inv.problem(
                        f"{path}.{key}",
                        f"{address} lies inside the IPv6 tunnel pool {inv.pool6} "
                        "(defaults.tunnel_pool6)",
                    )
                )
        if host.address in inv.pool:
            add(
                inv.problem(
                    f"{path}.address",
                    f"{host.address} lies inside the tunnel pool {inv.pool} (defaults.tunnel_pool)",
                )
            )

    # Who talks to whom over a carrier: routes on a host must never capture those addresses.
    peers: dict[str, set[str]] = {name: set() for name in hosts_by_name}
    for link in inv.links:
        if link.server.host in peers and link.client.host in peers:
            peers[link.server.host].add(link.client.host)
            peers[link.client.host].add(link.server.host)
    for hub in inv.hubs:
        for client in hub.clients:
            if hub.server in peers and client.host in peers and hub.server != client.host:
                peers[hub.server].add(client.host)
                peers[client.host].add(hub.server)

    link_names: dict[str, int] = {}
    tunnel_used: dict[Address, str] = {}
    ports: dict[tuple[str, int] | tuple[str, int, str], int] = {}
    devices: dict[tuple[str, str], str] = {}
    interfaces: dict[tuple[str, str], int] = {}
    host_routes: dict[str, list[tuple[Network, str]]] = {}
    for link in inv.links:
        path = f"links[{link.index}]"
        if link.name in link_names:
            add(
                inv.problem(
                    f"{path}.name",
                    f"duplicate link name {link.name!r} (also links[{link_names[link.name]}])",
                )
            )
            continue
        link_names[link.name] = link.index
        missing = False
        for role in ROLES:
            host = link.side(role).host
            if host not in hosts_by_name:
                hint = difflib.get_close_matches(host, list(hosts_by_name), n=1, cutoff=0.6)
                more = f"; did you mean {hint[0]!r}?" if hint else ""
                add(inv.problem(f"{path}.{role}", f"no host named {host!r} in hosts{more}"))
                missing = True
        if missing:
            continue
        if link.server.host == link.client.host:
            add(
                inv.problem(
                    f"{path}.client",
                    f"server and client are both {link.server.host!r}: "
                    "a link joins two different hosts",
                )
            )
            continue

        # A carrier family both hosts have; then the tunnel's families.
        server_host, client_host = (hosts_by_name[link.side(r).host] for r in ROLES)
        if link.transport == "tcp" and not {a.version for a in server_host.addresses} & {
            a.version for a in client_host.addresses
        }:
            add(
                inv.problem(
                    f"{path}.client",
                    f"{client_host.name} ({client_host.address}) and {server_host.name} "
                    f"({server_host.address}) share no address family to carry the link: give "
                    "one of them an address of the other's family (address6 for IPv6)",
                )
            )
        problems.extend(_family_problems(inv, link))
        # Tunnel addresses: unique, distinct from every underlay address.
        for key, role in [(k, r) for k in ("tunnel", "tunnel6") for r in ROLES]:
            address = getattr(link.side(role), key)
            if address is None:
                continue
            where = f"{path}.{key}.{role}"
            if address in underlay:
                add(inv.problem(where, f"{address} is the underlay address of {underlay[address]}"))
            elif address in tunnel_used:
                add(inv.problem(where, f"{address} is already used by {tunnel_used[address]}"))
            else:
                tunnel_used[address] = _owner(where)

        # One listener per server port (TCP and UDP ports apart); one daemon per serial device.
        if link.transport in ("tcp", "udp"):
            key = (link.server.host, link.tunables.port)
            ssh_port = hosts_by_name[link.server.host].ssh.port
            if link.transport == "udp":
                key = (link.server.host, link.tunables.port, "udp")
                ssh_port = -1  # ssh is TCP: no clash
            if key in ports:
                add(
                    inv.problem(
                        f"{path}.port",
                        f"port {key[1]} on host {key[0]!r} is already used by links[{ports[key]}]",
                    )
                )
            elif key[1] == ssh_port:
                add(
                    inv.problem(
                        f"{path}.port",
                        f"port {key[1]} on host {key[0]!r} is its ssh port: vpnd could not "
                        "listen there (and deploy needs ssh)",
                    )
                )
            else:
                ports[key] = link.index
        else:
            for role in ROLES:
                device = link.side(role).device
                dkey = (link.side(role).host, device or "")
                if dkey in devices:
                    add(
                        inv.problem(
                            f"{path}.devices.{role}",
                            f"{device} on host {dkey[0]!r} is already used by {devices[dkey]}",
                        )
                    )
                else:
                    devices[dkey] = path

        # Interface names per host.
        for role in ROLES:
            ikey = (link.side(role).host, link.interface)
            if ikey in interfaces:
                other = interfaces[ikey]
                how = "" if link.index in explicit_interface else " (derived from the link name; "
                how = how and how + "set links[N].interface to choose another)"
                add(
                    inv.problem(
                        f"{path}.interface",
                        f"interface {link.interface!r} on host "
                        f"{ikey[0]!r} is already used by links[{other}]{how}",
                    )
                )
            else:
                interfaces[ikey] = link.index

        # Routes behind one side are installed on the other side's host.
        for role, other_role in (("server", "client"), ("client", "server")):
            installing = link.side(other_role).host
            for j, net in enumerate(link.side(role).routes):
                where = f"{path}.routes.{role}[{j}]"
                carried = next(
                    (
                        (p, a)
                        for p in sorted(peers[installing])
                        for a in hosts_by_name[p].addresses
                        if a in net
                    ),
                    None,
                )
                if carried is not None:
                    add(
                        inv.problem(
                            where,
                            f"{net} contains {carried[0]}'s underlay address "
                            f"{carried[1]}: {installing}'s carrier to "
                            f"{carried[0]} would be routed into a tunnel",
                        )
                    )
                    continue
                clash = next(
                    (o for n, o in host_routes.get(installing, []) if n.overlaps(net)), None
                )
                if clash is not None:
                    add(
                        inv.problem(
                            where, f"{net} overlaps {clash} (both routed on host {installing!r})"
                        )
                    )
                else:
                    host_routes.setdefault(installing, []).append((net, f"{where} ({net})"))
    problems += _check_hubs(
        inv,
        hosts_by_name,
        underlay,
        peers,
        link_names=link_names,
        tunnel_used=tunnel_used,
        ports=ports,
        interfaces=interfaces,
        host_routes=host_routes,
    )
    return problems


def _check_hubs(
    inv: Inventory,
    hosts_by_name: Mapping[str, Host],
    underlay: Mapping[IPv4Address, str],
    peers: Mapping[str, set[str]],
    *,
    link_names: Mapping[str, int],
    tunnel_used: dict[IPv4Address, str],
    ports: dict[tuple[str, int], int],
    interfaces: dict[tuple[str, str], int],
    host_routes: dict[str, list[tuple[IPv4Network, str]]],
) -> list[Problem]:
    """Cross checks of the ``hubs:`` section against the hosts, the links and each other."""
    problems: list[Problem] = []
    add = problems.append
    hub_names: dict[str, int] = {}
    hub_ports: dict[tuple[str, int], str] = {}
    hub_ifaces: dict[tuple[str, str], str] = {}
    networks: list[tuple[IPv4Network, str]] = []

    def known(host: str, where: str) -> bool:
        if host in hosts_by_name:
            return True
        hint = difflib.get_close_matches(host, list(hosts_by_name), n=1, cutoff=0.6)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        add(inv.problem(where, f"no host named {host!r} in hosts{more}"))
        return False

    def route_on(installing: str, net: Network, where: str) -> None:
        carried = next(
            (
                (p, a)
                for p in sorted(peers.get(installing, ()))
                for a in hosts_by_name[p].addresses
                if a in net
            ),
            None,
        )
        if carried is not None:
            add(
                inv.problem(
                    where,
                    f"{net} contains {carried[0]}'s underlay address "
                    f"{carried[1]}: {installing}'s carrier to "
                    f"{carried[0]} would be routed into a tunnel",
                )
            )
            return
        clash = next((o for n, o in host_routes.get(installing, []) if n.overlaps(net)), None)
        if clash is not None:
            add(inv.problem(where, f"{net} overlaps {clash} (both routed on host {installing!r})"))
        else:
            host_routes.setdefault(installing, []).append((net, f"{where} ({net})"))

    for hub in inv.hubs:
        path = f"hubs[{hub.index}]"
        if hub.name in link_names:
            add(
                inv.problem(
                    f"{path}.name",
                    f"{hub.name!r} is already the name of "
                    f"links[{link_names[hub.name]}]: hubs and links share "
                    "one namespace (config, unit and key names)",
                )
            )
            continue
        if hub.name in hub_names:
            add(
                inv.problem(
                    f"{path}.name",
                    f"duplicate hub name {hub.name!r} (also hubs[{hub_names[hub.name]}])",
                )
            )
            continue
        hub_names[hub.name] = hub.index
        if not known(hub.server, f"{path}.server"):
            continue

        # The hub's port and interface.
        key = (hub.server, hub.tunables.port)
        if key in ports or key in hub_ports:
            other = f"links[{ports[key]}]" if key in ports else hub_ports[key]
            add(
                inv.problem(
                    f"{path}.port", f"port {key[1]} on host {key[0]!r} is already used by {other}"
                )
            )
        elif key[1] == hosts_by_name[hub.server].ssh.port:
            add(
                inv.problem(
                    f"{path}.port",
                    f"port {key[1]} on host {key[0]!r} is its ssh port: "
                    "vpnd could not listen there (and deploy needs ssh)",
                )
            )
        else:
            hub_ports[key] = path

        # The hub's client network (when given): no underlay, no other tunnel address inside.
        network_ok = hub.network is not None
        if hub.network is not None:
            inside = next((a for a in sorted(underlay, key=_order) if a in hub.network), None)
            clash_net = next((o for n, o in networks if n.overlaps(hub.network)), None)
            used = next((a for a in sorted(tunnel_used, key=_order) if a in hub.network), None)
            if inside is not None:
                network_ok = False
                add(
                    inv.problem(
                        f"{path}.network",
                        f"{hub.network} contains the underlay address "
                        f"{inside} of {underlay[inside]}",
                    )
                )
            elif clash_net is not None:
                add(inv.problem(f"{path}.network", f"{hub.network} overlaps {clash_net}"))
                network_ok = False
            elif used is not None:
                network_ok = False
                add(
                    inv.problem(
                        f"{path}.network",
                        f"{hub.network} contains {used}, used by {tunnel_used[used]}",
                    )
                )
            else:
                networks.append((hub.network, f"{path}.network ({hub.network})"))
                assert hub.tunnel is not None  # noqa: S101 - network is set
                tunnel_used[hub.tunnel] = path

        seen: dict[str, int] = {}
        bad_routes: set[str] = set()
        hub_ends = [hub.server]
        for client in hub.clients:
            where = f"{path}.clients[{client.index}]"
            if not known(client.host, f"{where}.host"):
                continue
            if client.host == hub.server:
                add(
                    inv.problem(
                        f"{where}.host",
                        f"{client.host!r} is the hub's own server "
                        f"({path}.server): a hub cannot be its own "
                        "client",
                    )
                )
                continue
            if client.host in seen:
                first = inv.line_of(f"{path}.clients[{seen[client.host]}]")
                add(
                    inv.problem(
                        f"{where}.host",
                        f"{client.host!r} is listed twice in this hub (first on line {first})",
                    )
                )
                continue
            seen[client.host] = client.index
            hub_ends.append(client.host)
            problems.extend(_hub_family_problems(inv, hub, client, hosts_by_name))
            if client.tunnel is not None:
                taken = client.tunnel in tunnel_used
                if hub.network is None:
                    add(
                        inv.problem(
                            f"{where}.tunnel",
                            f"a client address needs the hub's network "
                            f"in {path}.network (the pool picks the "
                            "network otherwise)",
                        )
                    )
                elif client.tunnel not in hub.network:
                    add(
                        inv.problem(
                            f"{where}.tunnel",
                            f"{client.tunnel} is outside the hub's network {hub.network}",
                        )
                    )
                elif client.tunnel in (hub.network.network_address, hub.network.broadcast_address):
                    add(
                        inv.problem(
                            f"{where}.tunnel",
                            f"{client.tunnel} is the network or broadcast address of {hub.network}",
                        )
                    )
                elif client.tunnel in underlay:
                    add(
                        inv.problem(
                            f"{where}.tunnel",
                            f"{client.tunnel} is the underlay address of {underlay[client.tunnel]}",
                        )
                    )
                elif taken:
                    owner = tunnel_used[client.tunnel]
                    what = "the hub's own address" if owner == path else f"already used by {owner}"
                    add(inv.problem(f"{where}.tunnel", f"{client.tunnel} is {what}"))
                else:
                    tunnel_used[client.tunnel] = where
            # Networks behind a client are routed on the hub's host.
            for j, net in enumerate(client.routes):
                route_on(hub.server, net, f"{where}.routes[{j}]")
            # Networks behind the hub, and the hub's network, are routed on each client's host
            # (one problem per route, not one per client).
            for j, net in enumerate(hub.routes):
                if f"{path}.routes[{j}]" not in bad_routes:
                    before = len(problems)
                    route_on(client.host, net, f"{path}.routes[{j}]")
                    if len(problems) > before:
                        bad_routes.add(f"{path}.routes[{j}]")
            if network_ok and hub.network is not None and hub.clienttoclient:
                route_on(client.host, hub.network, f"{path}.network")
        for host in hub_ends:
            ikey = (host, hub.interface)
            if ikey in interfaces or ikey in hub_ifaces:
                other = f"links[{interfaces[ikey]}]" if ikey in interfaces else hub_ifaces[ikey]
                how = (
                    ""
                    if f"{path}.interface" in inv.lines
                    else (" (derived from the hub name; set hubs[N].interface to choose another)")
                )
                add(
                    inv.problem(
                        f"{path}.interface",
                        f"interface {hub.interface!r} on host "
                        f"{host!r} is already used by {other}{how}",
                    )
                )
            else:
                hub_ifaces[ikey] = path
    return problems


def _order(address: Address) -> tuple[int, int]:
    """A sort key for addresses of both families (IPv4 first)."""
    return address.version, int(address)


def _hub_family_problems(
    inv: Inventory, hub: Hub, client: HubClient, hosts_by_name: Mapping[str, Host]
) -> list[Problem]:
    """A hub client's host must share a family with the hub's host; IPv6 routes need a
    dual-stack hub (reported once, with the first client)."""
    path = f"hubs[{hub.index}]"
    where = f"{path}.clients[{client.index}]"
    found: list[Problem] = []
    server, host = hosts_by_name[hub.server], hosts_by_name[client.host]
    if not {a.version for a in server.addresses} & {a.version for a in host.addresses}:
        found.append(
            inv.problem(
                f"{where}.host",
                f"{host.name} ({host.address}) and the hub's host {server.name} "
                f"({server.address}) share no address family to carry the link",
            )
        )
    if hub.dual_stack:
        return found
    six = [(f"{where}.routes[{j}]", n) for j, n in enumerate(client.routes) if n.version == 6]
    if client.index == hub.clients[0].index:
        six += [(f"{path}.routes[{j}]", n) for j, n in enumerate(hub.routes) if n.version == 6]
    for at, net in six:
        found.append(
            inv.problem(
                at,
                f"{net} is IPv6 but the hub carries no IPv6 (ipv6: false or mtu "
                f"below {IPV6_MTU_MIN})",
            )
        )
    return found


def _family_problems(inv: Inventory, link: Link) -> list[Problem]:
    """What a link asks of a family it does not carry: IPv6 routes or ``tunnel6`` on a link
    without IPv6 (``ipv6: false``, an MTU below 1280), IPv4 routes on an IPv6-only tunnel."""
    path = f"links[{link.index}]"
    found: list[Problem] = []
    six_only = link.server.tunnel is not None and link.server.tunnel.version == 6
    why = (
        "the link opts out of IPv6 (ipv6: false)"
        if link.tunables.ipv6 is False
        else f"the link's mtu {link.tunables.mtu} is below {IPV6_MTU_MIN}, the least IPv6 needs"
    )
    if link.tunables.ipv6 and link.tunables.mtu < IPV6_MTU_MIN:
        at = f"{path}.mtu" if f"{path}.mtu" in inv.lines else "defaults.mtu"
        found.append(
            inv.problem(
                at,
                f"mtu {link.tunables.mtu} is below {IPV6_MTU_MIN}: a link carrying IPv6 needs "
                "at least that (or set ipv6: false)",
            )
        )
    if link.server.tunnel6 is not None:
        if six_only:
            found.append(
                inv.problem(
                    f"{path}.tunnel6",
                    "the tunnel is already IPv6 (tunnel:); tunnel6 goes beside an IPv4 tunnel",
                )
            )
        elif not link.dual_stack:
            found.append(inv.problem(f"{path}.tunnel6", f"an IPv6 pair, but {why}"))
    carried = {6} if six_only else ({4, 6} if link.dual_stack else {4})
    for role in ROLES:
        for j, net in enumerate(link.side(role).routes):
            if net.version in carried:
                continue
            message = (
                f"{net} is IPv4 but the tunnel is IPv6-only (tunnel: is IPv6)"
                if net.version == 4
                else f"{net} is IPv6 but {why}"
            )
            found.append(inv.problem(f"{path}.routes.{role}[{j}]", message))
    return found


def _owner(where: str) -> str:
    """``links[0].tunnel.server`` -> ``links[0]``: how a collision names the other user."""
    return where.split(".", 1)[0]


# --------------------------------------------------------------------------------------------
# Stage 3: pool allocation


def _home_block(name: str, blocks: int) -> int:
    digest = hashlib.sha256(b"vpnctl-pool\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % blocks


def _block_addresses(pool: IPv4Network, block: int) -> tuple[IPv4Address, IPv4Address]:
    base = int(pool.network_address) + 4 * block
    return IPv4Address(base + 1), IPv4Address(base + 2)


def allocate_tunnels(
    inv: Inventory,
    record: Mapping[str, tuple[IPv4Address, IPv4Address]],
    record_name: str,
    reserved: Iterable[IPv4Network] = (),
) -> tuple[Inventory, dict[str, tuple[IPv4Address, IPv4Address]]]:
    """Give every link without ``tunnel:`` a (server, client) address pair from the pool.

    ``record`` maps link names to pairs allocated earlier (``keystore/allocations.json``,
    named ``record_name`` in messages); those are kept whenever they are still in the pool.
    Returns the inventory with every tunnel address set and the full record to persist
    (earlier entries, including links since removed, are kept so their block stays reserved).
    """
    blocks = inv.pool.num_addresses // 4
    used: set[IPv4Address] = {h.address for h in inv.hosts}
    explicit_owner: dict[IPv4Address, tuple[str, str]] = {}  # address -> (link name, path)
    for link in inv.links:
        for role in ROLES:
            address = link.side(role).tunnel
            if address is not None:
                explicit_owner[address] = (link.name, f"links[{link.index}].tunnel.{role}")
    used |= set(explicit_owner)
    routes = [net for link in inv.links for role in ROLES for net in link.side(role).routes]
    routes += list(reserved)  # hub networks: a link's /30 never lands inside one

    new_record = dict(record)
    problems: list[Problem] = []
    pending: list[Link] = []
    assigned: dict[str, tuple[IPv4Address, IPv4Address]] = {}
    # Earlier allocations of links that still exist first (they own their blocks), then new ones.
    for name, pair in sorted(record.items()):
        if pair[0] in inv.pool and pair[1] in inv.pool:
            for address in pair:
                owner = explicit_owner.get(address)
                if owner is not None and owner[0] != name:  # pinning one's own pair is fine
                    problems.append(
                        inv.problem(
                            owner[1],
                            f"{address} is already allocated to link {name!r} in {record_name}",
                        )
                    )
            used.update(pair)
    for link in inv.links:
        if link.server.tunnel is not None:
            continue
        pair = record.get(link.name)
        if pair is not None and pair[0] in inv.pool and pair[1] in inv.pool:
            assigned[link.name] = pair
        else:
            pending.append(link)
    for link in sorted(pending, key=lambda lk: lk.name):
        home = _home_block(link.name, blocks)
        for step in range(blocks):
            block = (home + step) % blocks
            net = IPv4Network((int(inv.pool.network_address) + 4 * block, 30))
            if any(address in used for address in net):
                continue
            if any(net.overlaps(route) for route in routes):
                continue
            pair = _block_addresses(inv.pool, block)
            break
        else:
            problems.append(
                inv.problem(
                    f"links[{link.index}].tunnel",
                    f"the tunnel pool {inv.pool} is full; widen defaults.tunnel_pool",
                )
            )
            continue
        used.update(pair)
        assigned[link.name] = pair
        new_record[link.name] = pair
    if problems:
        raise InventoryError(problems)

    links = []
    for original in inv.links:
        pair = assigned.get(original.name)
        links.append(
            original
            if pair is None
            else replace(
                original,
                server=replace(original.server, tunnel=pair[0]),
                client=replace(original.client, tunnel=pair[1]),
            )
        )
    return replace(inv, links=tuple(links)), new_record


HubRecord = dict[str, tuple[IPv4Network, dict[str, IPv4Address]]]
HUB_BLOCK_PREFIX = 24


def hub_networks(inv: Inventory, hub_record: Mapping[str, Any]) -> list[IPv4Network]:
    """Every network a hub holds or held (explicit or recorded): the pool keeps them for hubs."""
    nets = [hub.network for hub in inv.hubs if hub.network is not None]
    nets += [network for network, _ in hub_record.values() if network.subnet_of(inv.pool)]
    return nets


def _hub_prefix(pool: IPv4Network, clients: int) -> int:
    """A hub's block: a /24 (room for 253 clients; adding one never moves another), or, in a
    pool smaller than a /24, the smallest block holding the hub, its clients and the network
    and broadcast addresses."""
    if pool.prefixlen <= HUB_BLOCK_PREFIX:
        return HUB_BLOCK_PREFIX
    prefix = 30
    while prefix > pool.prefixlen and 2 ** (32 - prefix) < clients + 3:
        prefix -= 1
    return prefix


def allocate_hubs(inv: Inventory, hub_record: Mapping[str, Any]) -> tuple[Inventory, HubRecord]:
    """Give every hub without ``network:`` a block of the pool, and every client without
    ``tunnel:`` an address in its hub's network; ``inv`` must have its links allocated.

    ``hub_record`` maps hub names to ``(network, {client: address})`` allocated earlier
    (``keystore/allocations.json``): kept whenever still valid, and
    kept for hubs and clients since removed, so adding a client or a hub never moves another.
    A hub's block: SHA-256(hub name) modulo the number of blocks, probing upwards past blocks
    that hold a used address or overlap a route, a link's tunnel or another hub's network.
    New clients take the lowest free addresses after the hub's own (network + 1), in file order.
    """
    used: set[IPv4Address] = {h.address for h in inv.hosts}
    for link in inv.links:
        for role in ROLES:
            address = link.side(role).tunnel
            if address is not None:
                used.add(address)
    taken: list[IPv4Network] = [hub.network for hub in inv.hubs if hub.network is not None]
    routes = [net for link in inv.links for role in ROLES for net in link.side(role).routes]
    for hub in inv.hubs:
        routes += list(hub.routes) + [net for c in hub.clients for net in c.routes]
    new_record: HubRecord = {
        name: (network, dict(clients)) for name, (network, clients) in hub_record.items()
    }
    problems: list[Problem] = []
    networks: dict[str, IPv4Network] = {}
    for _name, (network, _) in sorted(hub_record.items()):
        if network.subnet_of(inv.pool):
            taken.append(network)
    for hub in sorted(inv.hubs, key=lambda h: h.name):
        if hub.network is not None:
            inside = sorted(a for a in used if a in hub.network)
            if inside:  # a link's tunnel, allocated before this network was given
                problems.append(inv.problem(f"hubs[{hub.index}].network",
                                            f"{hub.network} contains {inside[0]}, already a "
                                            "link's tunnel address"))  # fmt: skip
            networks[hub.name] = hub.network
            continue
        recorded = hub_record.get(hub.name)
        if recorded is not None and recorded[0].subnet_of(inv.pool):
            networks[hub.name] = recorded[0]
            continue
        prefix = _hub_prefix(inv.pool, len(hub.clients))
        size = 2 ** (32 - prefix)
        blocks = inv.pool.num_addresses // size
        home = (
            int.from_bytes(hashlib.sha256(b"vpnctl-hub\0" + hub.name.encode()).digest()[:8], "big")
            % blocks
        )
        for step in range(blocks):
            net = IPv4Network(
                (int(inv.pool.network_address) + size * ((home + step) % blocks), prefix)
            )
            if any(address in net for address in used):
                continue
            if any(net.overlaps(other) for other in taken + routes):
                continue
            break
        else:
            problems.append(
                inv.problem(
                    f"hubs[{hub.index}].network",
                    f"the tunnel pool {inv.pool} has no free /{prefix} for "
                    "this hub; widen defaults.tunnel_pool or give "
                    "network:",
                )
            )
            continue
        networks[hub.name] = net
        taken.append(net)
        new_record[hub.name] = (net, {})
    if problems:
        raise InventoryError(problems)

    hubs = []
    for hub in inv.hubs:
        network = networks[hub.name]
        recorded_clients = dict(new_record.get(hub.name, (network, {}))[1])
        if new_record.get(hub.name, (None,))[0] != network:
            recorded_clients = {}  # the hub moved (an explicit network): start afresh
        hub_used = {
            network.network_address,
            network.network_address + 1,
            network.broadcast_address,
        } | used
        hub_used |= {c.tunnel for c in hub.clients if c.tunnel is not None}
        hub_used |= {a for n, a in recorded_clients.items() if a in network}
        free = (a for a in network.hosts() if a not in hub_used)
        pinned = {c.tunnel for c in hub.clients if c.tunnel is not None}
        holder = {a: n for n, a in recorded_clients.items()}
        clients = []
        for client in hub.clients:
            address = client.tunnel
            if address is not None and holder.get(address, client.name) != client.name:
                problems.append(inv.problem(
                    f"hubs[{hub.index}].clients[{client.index}].tunnel",
                    f"{address} is already allocated to client {holder[address]!r} of this hub "
                    "in keystore/allocations.json"))  # fmt: skip
                continue
            if address is None:
                kept = recorded_clients.get(client.name)
                if kept is not None and kept in network and kept not in pinned:
                    address = kept
                else:
                    address = next(free, None)
                    if address is None:
                        problems.append(
                            inv.problem(
                                f"hubs[{hub.index}].clients[{client.index}]",
                                f"the hub's network {network} is full; give a larger network:",
                            )
                        )
                        continue
                    recorded_clients[client.name] = address
            clients.append(replace(client, tunnel=address))
        if hub.network is None or recorded_clients:
            new_record[hub.name] = (network, recorded_clients)
        hubs.append(replace(hub, network=network, clients=tuple(clients)))
    if problems:
        raise InventoryError(problems)
    return replace(inv, hubs=tuple(hubs)), new_record
