"""Stage 3: pool allocation (tunnel /30s of links, hub networks), recorded so nothing moves."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from vpnctl.inventory.model import ROLES, Address, Inventory, InventoryError, Link, Problem

# --------------------------------------------------------------------------------------------
# Stage 3: pool allocation


def home_block(salt: bytes, name: str, blocks: int) -> int:
    """Where ``name`` starts probing among ``blocks`` blocks: SHA-256(salt, NUL, name) modulo
    their number, so a name lands on the same block whatever else the pool holds. One salt per
    kind of block (``vpnctl-pool``, ``vpnctl-hub``, and vpnctl/pool6.py's IPv6 ones)."""
    digest = hashlib.sha256(salt + b"\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % blocks


def claim_recorded(
    inv: Inventory,
    kept: Mapping[str, tuple[Address, Address]],
    explicit_owner: Mapping[Address, tuple[str, str]],
    used: set[Address],
    record_name: str,
) -> list[Problem]:
    """Mark the recorded pairs still in the pool (``kept``, link name -> pair) as used, in name
    order, and refuse an explicit ``tunnel:`` that another link's recorded pair holds
    (``explicit_owner``: address -> (link name, its path)); pinning one's own pair is fine.
    Shared by the IPv4 pool (here) and the IPv6 one (vpnctl/pool6.py)."""
    problems: list[Problem] = []
    for name, pair in sorted(kept.items()):
        for address in pair:
            owner = explicit_owner.get(address)
            if owner is not None and owner[0] != name:
                problems.append(
                    inv.problem(
                        owner[1],
                        f"{address} is already allocated to link {name!r} in {record_name}",
                    )
                )
        used.update(pair)
    return problems


def with_pairs(
    links: Iterable[Link], assigned: Mapping[str, tuple[Address, Address]], key: str
) -> tuple[Link, ...]:
    """``links`` with each assigned (server, client) pair set as their ``key`` address
    (``tunnel`` or ``tunnel6``); a link with no assigned pair is kept as it is."""
    out = []
    for link in links:
        pair = assigned.get(link.name)
        out.append(
            link
            if pair is None
            else replace(
                link,
                server=replace(link.server, **{key: pair[0]}),
                client=replace(link.client, **{key: pair[1]}),
            )
        )
    return tuple(out)


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
    pending: list[Link] = []
    assigned: dict[str, tuple[IPv4Address, IPv4Address]] = {}
    # Earlier allocations of links that still exist first (they own their blocks), then new ones.
    kept = {
        name: pair for name, pair in record.items() if pair[0] in inv.pool and pair[1] in inv.pool
    }
    problems = claim_recorded(inv, kept, explicit_owner, used, record_name)
    for link in inv.links:
        if link.server.tunnel is not None:
            continue
        if link.name in kept:
            assigned[link.name] = kept[link.name]
        else:
            pending.append(link)
    for link in sorted(pending, key=lambda lk: lk.name):
        home = home_block(b"vpnctl-pool", link.name, blocks)
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
    return replace(inv, links=with_pairs(inv.links, assigned, "tunnel")), new_record


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
        home = home_block(b"vpnctl-hub", hub.name, blocks)
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
