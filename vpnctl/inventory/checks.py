"""Stage 2: cross checks over the whole inventory (names, addresses, ports, routes, hubs)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

from vpnctl.inventory.model import (
    IPV6_MTU_MIN,
    ROLES,
    Address,
    Host,
    Hub,
    HubClient,
    Inventory,
    Link,
    Network,
    Problem,
)

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
            unknown = _unknown_host(inv, hosts_by_name, link.side(role).host, f"{path}.{role}")
            if unknown is not None:
                add(unknown)
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
                routed = _install_route(
                    inv, hosts_by_name, installing, net, where, peers=peers, host_routes=host_routes
                )
                if routed is not None:
                    add(routed)
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


def _unknown_host(
    inv: Inventory, hosts_by_name: Mapping[str, Host], host: str, where: str
) -> Problem | None:
    """The problem of a link or hub naming ``host`` (at ``where``) when no host has that name,
    with a hint at the nearest name; None for a known host."""
    if host in hosts_by_name:
        return None
    hint = difflib.get_close_matches(host, list(hosts_by_name), n=1, cutoff=0.6)
    more = f"; did you mean {hint[0]!r}?" if hint else ""
    return inv.problem(where, f"no host named {host!r} in hosts{more}")


def _install_route(
    inv: Inventory,
    hosts_by_name: Mapping[str, Host],
    installing: str,
    net: Network,
    where: str,
    *,
    peers: Mapping[str, set[str]],
    host_routes: dict[str, list[tuple[Network, str]]],
) -> Problem | None:
    """Install route ``net`` (given at ``where``) on host ``installing``, in ``host_routes``;
    or the problem that refuses it: it would capture the underlay address of one of that host's
    carrier peers (its carrier would then run into a tunnel), or it overlaps a route already
    installed there. Links and hubs check their routes with this one function."""
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
        return inv.problem(
            where,
            f"{net} contains {carried[0]}'s underlay address "
            f"{carried[1]}: {installing}'s carrier to "
            f"{carried[0]} would be routed into a tunnel",
        )
    clash = next((o for n, o in host_routes.get(installing, []) if n.overlaps(net)), None)
    if clash is not None:
        return inv.problem(where, f"{net} overlaps {clash} (both routed on host {installing!r})")
    host_routes.setdefault(installing, []).append((net, f"{where} ({net})"))
    return None


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
        unknown = _unknown_host(inv, hosts_by_name, host, where)
        if unknown is not None:
            add(unknown)
        return unknown is None

    def route_on(installing: str, net: Network, where: str) -> None:
        routed = _install_route(
            inv, hosts_by_name, installing, net, where, peers=peers, host_routes=host_routes
        )
        if routed is not None:
            add(routed)

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
