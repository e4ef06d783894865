"""Stage 1: the shape reader (composed YAML -> model, every problem at its file:line)."""

from __future__ import annotations

import contextlib
import difflib
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from vpnctl.inventory.checks import _cross_check
from vpnctl.inventory.model import (
    DEFAULT_DAEMON_USER,
    DEFAULT_POOL,
    HOOKS,
    MAX_ROUTES,
    ROLES,
    Address,
    Host,
    Inventory,
    InventoryError,
    Link,
    Network,
    Problem,
    Side,
    Ssh,
    Tunables,
    UserError,
)
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

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SSH_HOST_RE = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
)
_PREFIX_RE = re.compile(r"/[A-Za-z0-9_./-]*")
_SSH_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: The account vpnd runs as (deploy creates it): a plain system user name, no numeric ids.
_DAEMON_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SSH_JUMP_ONE = (
    r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?"
    r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_SSH_JUMP_RE = re.compile(rf"{_SSH_JUMP_ONE}(?:,{_SSH_JUMP_ONE})*")

# --------------------------------------------------------------------------------------------
# Stage 1: the shape reader

_MISSING = object()


def _read_age(r: _Reader, node: yaml.Node, path: str) -> float | None:
    """An age like ``90d`` (vpnctl/rotation.py's parse_age), its problem at the node's line."""
    from vpnctl.rotation import parse_age  # noqa: PLC0415 - vpnctl.rotation imports vpnctl.inventory

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

    def required(
        self, node: yaml.Node, fields: Mapping[str, yaml.Node], path: str, keys: Iterable[str]
    ) -> bool:
        """Whether every key of ``keys`` is in ``fields`` (the mapping ``node`` at ``path``);
        each missing one is a problem at the mapping's line."""
        missing = [key for key in keys if key not in fields]
        for key in missing:
            self.fail(node, f"{path}.{key}", f"missing required key {key!r}")
        return not missing

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


def _read_pair(
    r: _Reader,
    fields: Mapping[str, Any],
    path: str,
    key: str,
    read: Callable[[yaml.Node, str], Any],
    *,
    family: str = "",
) -> dict[str, Any]:
    """A link's `key` (tunnel, tunnel6): an address per end, both or neither (then the pool
    gives them); {} when absent. `family` ("" or "IPv6 ") names the addresses in the error."""
    if key not in fields:
        return {}
    pair = _per_side(r, fields[key], f"{path}.{key}", read)
    if set(pair) != set(ROLES) and not _has_problem(r, f"{path}.{key}"):
        r.fail(
            fields[key],
            f"{path}.{key}",
            f"give both server and client {family}addresses, or leave {key} out to use the pool",
        )
    return pair


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


def _read_interface(r: _Reader, fields: Mapping[str, yaml.Node], path: str) -> str | None:
    """A link's or hub's ``interface:`` (None when absent or refused): a Linux interface name."""
    if "interface" not in fields:
        return None
    interface = r.text(fields["interface"], f"{path}.interface")
    if interface is not None and (len(interface) > IFNAMSIZ or not _IFNAME_RE.fullmatch(interface)):
        r.fail(
            fields["interface"],
            f"{path}.interface",
            f"{interface!r} is not an interface name: 1..{IFNAMSIZ} of A-Z a-z 0-9 _ . -",
        )
        return None
    return interface


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
        r.required(node, fields, path, ("name", "address"))
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
        ok = r.required(node, fields, path, ("name", "server", "client"))
        name = r.name(fields["name"], f"{path}.name") if "name" in fields else None
        ends = {role: r.name(fields[role], f"{path}.{role}") for role in ROLES if role in fields}
        own_tunables = _read_tunables(r, fields, path)
        explicit[i] = own_tunables
        tunables = Tunables(**{**default_tunables, **own_tunables})
        tunnel = _read_pair(r, fields, path, "tunnel", r.address)
        if tunnel.keys() == set(ROLES) and tunnel["server"].version != tunnel["client"].version:
            r.fail(
                r.lines.get(f"{path}.tunnel.client"),
                f"{path}.tunnel.client",
                f"{tunnel['client']} and the server's {tunnel['server']} are of different "
                "families: put the IPv6 pair under tunnel6",
            )
        tunnel6 = _read_pair(
            r, fields, path, "tunnel6", lambda n, p: r.address(n, p, 6), family="IPv6 "
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
        interface = _read_interface(r, fields, path)

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
    if "hubs" in top:
        from vpnctl.inventory.hubs import read_hubs  # noqa: PLC0415 - hubs.py builds on this reader

        hubs = read_hubs(r, top["hubs"], default_tunables)
    else:
        hubs = []
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
