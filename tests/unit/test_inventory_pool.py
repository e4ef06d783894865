"""Tunnel addresses from the pool are stable: same inventory, same addresses; new links move
no one."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from vpnctl.inventory import InventoryError, allocate_tunnels, parse_inventory


def inventory_text(link_names: list[str], pool: str | None = None, extra: str = "") -> str:
    hosts = "\n".join(
        f"  - name: h{i}\n    address: 198.18.1.{i + 1}" for i in range(len(link_names) + 1)
    )
    links = "\n".join(
        f"  - name: {name}\n    server: h0\n    client: h{i + 1}\n    port: {4000 + i}"
        for i, name in enumerate(link_names)
    )
    defaults = f"defaults:\n  tunnel_pool: {pool}\n" if pool else ""
    return f"{defaults}hosts:\n{hosts}\nlinks:\n{links}\n{extra}"


def allocate(text: str, record: dict | None = None):
    inventory = parse_inventory(text, "inv.yaml")
    return allocate_tunnels(inventory, record or {}, "keystore/allocations.json")


def pairs(inventory) -> dict[str, tuple[IPv4Address, IPv4Address]]:
    return {link.name: (link.server.tunnel, link.client.tunnel) for link in inventory.links}


def test_same_inventory_always_yields_the_same_addresses() -> None:
    text = inventory_text(["east", "west", "north"])
    first, _ = allocate(text)
    second, _ = allocate(text)
    assert pairs(first) == pairs(second)


def test_allocated_pair_is_block_plus_one_and_two_inside_the_pool() -> None:
    inventory, record = allocate(inventory_text(["east"]))
    server, client = pairs(inventory)["east"]
    assert server in IPv4Network("198.19.0.0/16")
    assert int(server) % 4 == 1
    assert int(client) == int(server) + 1
    assert record == {"east": (server, client)}


def test_adding_a_link_never_moves_another_links_addresses() -> None:
    before, record = allocate(inventory_text(["east", "west"]))
    after, _ = allocate(inventory_text(["east", "west", "aaa-new"]), record)
    for name in ("east", "west"):
        assert pairs(after)[name] == pairs(before)[name]


def test_recorded_allocation_wins_over_a_new_link_that_would_probe_into_it() -> None:
    # A tiny pool: 2 blocks. Both links hash somewhere; whichever order, the recorded one stays.
    pool = "198.19.0.0/29"
    first, record = allocate(inventory_text(["zeta"], pool))
    later, _ = allocate(inventory_text(["alpha", "zeta"], pool), record)
    assert pairs(later)["zeta"] == pairs(first)["zeta"]
    assert pairs(later)["alpha"] != pairs(first)["zeta"]


def test_links_removed_from_the_inventory_keep_their_block_reserved() -> None:
    _, record = allocate(inventory_text(["east", "west"]))
    after, new_record = allocate(inventory_text(["west", "south"]), record)
    assert new_record["east"] == record["east"]
    assert pairs(after)["south"] != record["east"]


def test_pool_blocks_overlapping_a_route_are_skipped() -> None:
    # A /28 pool has 4 blocks; a route covering the first three leaves only the last one.
    extra = "    routes:\n      client: [198.19.0.0/27]\n"
    text = inventory_text(["east"], "198.19.0.0/26")
    text = text.rstrip("\n") + "\n" + extra
    inventory, _ = allocate(text)
    server, _client = pairs(inventory)["east"]
    assert server not in IPv4Network("198.19.0.0/27")


def test_full_pool_is_reported_on_the_link() -> None:
    text = inventory_text(["one", "two"], "198.19.0.0/30")
    with pytest.raises(InventoryError) as caught:
        allocate(text)
    assert str(caught.value) == (
        "inv.yaml:15 links[1].tunnel: the tunnel pool 198.19.0.0/30 is full; widen "
        "defaults.tunnel_pool"
    )


def test_explicit_address_taking_a_recorded_allocation_is_refused() -> None:
    _, record = allocate(inventory_text(["east"]))
    taken = record["east"][0]
    text = inventory_text(["east", "west"]).replace(
        "    port: 4001\n",
        f"    port: 4001\n    tunnel: {{server: {taken}, client: 198.18.200.2}}\n",
    )
    with pytest.raises(InventoryError) as caught:
        allocate(text, record)
    assert str(caught.value) == (
        f"inv.yaml:17 links[1].tunnel.server: {taken} is already allocated to link 'east' in "
        "keystore/allocations.json"
    )
