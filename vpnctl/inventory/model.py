"""The inventory's model: hosts, links, hubs and their settings, and the errors that name a line."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

DEFAULT_POOL = IPv4Network("198.19.0.0/16")
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
#: IPv6 needs links of at least this MTU; a link below it stays IPv4-only unless told otherwise.
IPV6_MTU_MIN = 1280
DEFAULT_PORT = 379
HOOKS = ("linkup", "linkdown", "slipup", "slipdown")
ROLES = ("server", "client")
MAX_ROUTES = 9  # route1..route9 in the vpnd directive file
#: The account vpnd runs as (deploy creates it): a plain system user name, no numeric ids.
DEFAULT_DAEMON_USER = "vpnd"


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
