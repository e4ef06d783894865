"""Stage 1 for ``hubs:``: one server host for many client hosts (HUB-SPEC), read by the shape
reader of :mod:`.reader` (:func:`~vpnctl.inventory.reader.parse_inventory` calls
:func:`read_hubs`), every problem at its file:line like the rest of the inventory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from vpnctl.inventory.model import IPV6_MTU_MIN, MAX_ROUTES, Hub, HubClient, Tunables
from vpnctl.inventory.reader import (
    _SERIAL_ONLY,
    _TUNABLE_READERS,
    _derived_interface,
    _per_side,
    _read_hooks,
    _read_interface,
    _read_routes,
    _read_tunables,
    _Reader,
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


def read_hubs(r: _Reader, node: yaml.Node, default_tunables: Mapping[str, Any]) -> list[Hub]:
    """The ``hubs:`` section: each a server host, its client hosts and hub-wide settings."""
    hubs: list[Hub] = []
    for i, item in enumerate(r.sequence(node, "hubs") or []):
        path = f"hubs[{i}]"
        fields = r.mapping(item, path, _HUB_KEYS)
        if fields is None:
            continue
        ok = r.required(item, fields, path, ("name", "server", "clients"))
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
        interface = _read_interface(r, fields, path)
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
