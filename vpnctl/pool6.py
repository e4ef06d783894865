"""The IPv6 pool: every dual-stack link gets an IPv6 tunnel pair beside its IPv4 one.

Theory of operation
-------------------
Links carry IPv6 by default (see :attr:`vpnctl.inventory.Link.dual_stack`; ``ipv6: false`` opts
out). A link without ``tunnel6:`` gets its pair from the inventory's IPv6 pool:

* **The pool** is ``defaults.tunnel_pool6`` when given, else a ULA /64 (RFC 4193,
  ``fdXX:XXXX:XXXX::/64``) whose 40-bit global ID is SHA-256 of the inventory's host names. Once
  used it is recorded in ``keystore/allocations.json`` (under ``"ipv6"``) and kept from then on,
  so adding or renaming hosts later moves nothing.
* **A link's pair** is a /126 block of the pool (the IPv4 pool's /30, in IPv6): server = block + 1,
  client = block + 2, each configured as a /128 point-to-point address (``local6 peer remote6``).
  The home block is SHA-256(link name) modulo the number of blocks, probing upwards past blocks
  that hold a used address or overlap a route. Pairs are recorded beside the IPv4 ones and
  reused on every later run: adding a link moves nothing.
* **A dual-stack hub** gets a /112 of the pool (home block SHA-256(hub name), probing past
  blocks in use): the hub is network + 1, clients take the lowest free addresses after it in
  file order. Recorded per hub with its clients, so adding a client or a hub moves no one.

Pure: the record comes in and goes out; the keystore reads and writes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv6Address, IPv6Network

from vpnctl.inventory import ROLES, Hub, Inventory, InventoryError, Link, Problem
from vpnctl.inventory.allocate import claim_recorded, home_block, with_pairs

__all__ = ["Record6", "allocate_ipv6", "derive_pool6"]

BLOCK = 4  # addresses per link: a /126
HUB_PREFIX = 112  # a hub's IPv6 client network
HubRecord6 = Mapping[str, tuple[IPv6Network, Mapping[str, IPv6Address]]]


@dataclass(frozen=True)
class Record6:
    """The IPv6 part of ``allocations.json``: the pool in use and each link's pair."""

    pool: IPv6Network | None = None
    links: Mapping[str, tuple[IPv6Address, IPv6Address]] = field(default_factory=dict)
    hubs: HubRecord6 = field(default_factory=dict)


def derive_pool6(inv: Inventory) -> IPv6Network:
    """A ULA /64 for this inventory: fd00::/8 + 40 bits of SHA-256 of its host names."""
    seed = "\0".join(sorted(h.name for h in inv.hosts)).encode()
    global_id = int.from_bytes(hashlib.sha256(b"vpnctl-ula\0" + seed).digest()[:5], "big")
    return IPv6Network(((0xFD << 120) | (global_id << 80), 64))


def allocate_ipv6(inv: Inventory, record: Record6, record_name: str) -> tuple[Inventory, Record6]:
    """Give every dual-stack link without ``tunnel6:`` an IPv6 (server, client) pair.

    Returns the inventory with those pairs set and the record to persist (earlier entries,
    including links since removed, are kept so their block stays reserved).
    """
    pool = inv.pool6 or record.pool or derive_pool6(inv)
    blocks = pool.num_addresses // BLOCK
    used: set[IPv6Address] = {h.address6 for h in inv.hosts if h.address6 is not None}
    used |= {h.address for h in inv.hosts if isinstance(h.address, IPv6Address)}
    explicit: dict[IPv6Address, tuple[str, str]] = {}
    for link in inv.links:
        for role in ROLES:
            for key in ("tunnel", "tunnel6"):
                address = getattr(link.side(role), key)
                if isinstance(address, IPv6Address):
                    explicit[address] = (link.name, f"links[{link.index}].{key}.{role}")
    used |= set(explicit)
    routes = [
        net
        for link in inv.links
        for role in ROLES
        for net in link.side(role).routes
        if net.version == 6
    ]
    for hub in inv.hubs:
        routes += [n for n in (*hub.routes, *(n for c in hub.clients for n in c.routes))
                   if n.version == 6]  # fmt: skip
    # a link never lands in a hub's recorded IPv6 network
    routes += [net for net, _ in record.hubs.values()]
    kept = {name: pair for name, pair in record.links.items() if pair[0] in pool}
    problems = claim_recorded(inv, kept, explicit, used, record_name)
    new_links = dict(record.links)
    assigned: dict[str, tuple[IPv6Address, IPv6Address]] = {}
    pending: list[Link] = []
    for link in inv.links:
        if not link.dual_stack or link.server.tunnel6 is not None:
            continue
        if link.name in kept:
            assigned[link.name] = kept[link.name]
        else:
            pending.append(link)
    base = int(pool.network_address)
    for link in sorted(pending, key=lambda lk: lk.name):
        home = home_block(b"vpnctl-pool6", link.name, blocks)
        for step in range(min(blocks, 1 << 16)):
            block = (home + step) % blocks
            net = IPv6Network((base + BLOCK * block, pool.max_prefixlen - 2))
            pair = (IPv6Address(base + BLOCK * block + 1), IPv6Address(base + BLOCK * block + 2))
            if net.network_address in used or any(a in used for a in pair):
                continue
            if any(net.overlaps(route) for route in routes):
                continue
            break
        else:
            problems.append(
                inv.problem(
                    f"links[{link.index}].tunnel6",
                    f"the IPv6 tunnel pool {pool} is full; widen defaults.tunnel_pool6",
                )
            )
            continue
        used.update(pair)
        assigned[link.name] = pair
        new_links[link.name] = pair
    hubs, new_hubs = _allocate_hubs(inv, pool, record, used=used, routes=routes, problems=problems)
    if problems:
        raise InventoryError(problems)
    inv = replace(inv, links=with_pairs(inv.links, assigned, "tunnel6"), hubs=tuple(hubs))
    if not new_links and not new_hubs and record.pool is None:
        return inv, record  # no IPv6 yet: record nothing
    return inv, Record6(pool, new_links, new_hubs)


def _allocate_hubs(
    inv: Inventory,
    pool: IPv6Network,
    record: Record6,
    *,
    used: set[IPv6Address],
    routes: list,
    problems: list[Problem],
) -> tuple[list[Hub], dict[str, tuple[IPv6Network, dict[str, IPv6Address]]]]:
    """A /112 per dual-stack hub and an address per client (see the module docstring)."""
    new: dict[str, tuple[IPv6Network, dict[str, IPv6Address]]] = {
        name: (net, dict(clients)) for name, (net, clients) in record.hubs.items()
    }
    taken = [net for net, _ in new.values() if net.subnet_of(pool)]
    size = 1 << (128 - HUB_PREFIX)
    blocks = pool.num_addresses // size
    base = int(pool.network_address)
    hubs: list[Hub] = []
    for hub in inv.hubs:
        if not hub.dual_stack:
            hubs.append(hub)
            continue
        recorded = new.get(hub.name)
        if recorded is not None and recorded[0].subnet_of(pool):
            network = recorded[0]
        else:
            home = home_block(b"vpnctl-hub6", hub.name, blocks)
            for step in range(min(blocks, 1 << 16)):
                network = IPv6Network((base + size * ((home + step) % blocks), HUB_PREFIX))
                if any(a in network for a in used) or any(
                    network.overlaps(n) for n in [*taken, *routes]
                ):
                    continue
                break
            else:
                problems.append(
                    inv.problem(f"hubs[{hub.index}]", f"the IPv6 pool {pool} has no free /112")
                )
                hubs.append(hub)
                continue
            taken.append(network)
            new[hub.name] = (network, {})
        clients = new[hub.name][1]
        mine = {network.network_address + 1, *clients.values()}
        placed = []
        for client in hub.clients:
            address = clients.get(client.name)
            if address is None or address not in network:
                address = next(
                    network.network_address + k
                    for k in range(2, size)
                    if network.network_address + k not in mine
                )
                clients[client.name] = address
                mine.add(address)
            placed.append(replace(client, tunnel6=address))
        hubs.append(replace(hub, network6=network, clients=tuple(placed)))
    return hubs, {
        k: v for k, v in new.items() if k in {h.name for h in inv.hubs} or k in record.hubs
    }
