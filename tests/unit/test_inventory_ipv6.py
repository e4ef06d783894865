"""IPv6 in the inventory: dual stack by default, a stable IPv6 pool, and validation that
names the file, line and path for every family problem."""

from __future__ import annotations

import textwrap
from ipaddress import IPv6Address, IPv6Network

import pytest

from vpnctl.inventory import InventoryError, allocate_tunnels, parse_inventory
from vpnctl.pool6 import Record6, allocate_ipv6, derive_pool6

HOSTS = """\
hosts:
  - name: alpha
    address: 198.18.1.1
    address6: 2001:db8:1::1
  - name: beta
    address: 2001:db8:1::2
  - name: gamma
    address: 198.18.1.3
"""  # lines 1-8; links: on line 9, the first link item from line 10


def parse(links: str, defaults: str = ""):
    return parse_inventory(defaults + HOSTS + "links:\n" + textwrap.dedent(links), "inv.yaml")


def problems(links: str, defaults: str = "") -> list[str]:
    with pytest.raises(InventoryError) as caught:
        parse(links, defaults)
    return str(caught.value).splitlines()


def allocate(inv, record6: Record6 | None = None):
    inv, _ = allocate_tunnels(inv, {}, "allocations.json")
    return allocate_ipv6(inv, record6 or Record6(), "allocations.json")


def links_text(names: list[str], extra: str = "") -> str:
    return "".join(
        f"- name: {n}\n  server: alpha\n  client: gamma\n  port: {4000 + i}\n{extra}"
        for i, n in enumerate(names)
    )


def test_every_link_is_dual_stack_by_default_from_a_ula_64_recorded_with_its_pairs() -> None:
    inv, record = allocate(parse(links_text(["east", "west"])))
    pool = derive_pool6(inv)
    assert pool.prefixlen == 64 and pool.subnet_of(IPv6Network("fd00::/8"))
    assert record.pool == pool
    for link in inv.links:
        server, client = link.server.tunnel6, link.client.tunnel6
        assert server in pool and int(server) % 4 == 1 and int(client) == int(server) + 1
        assert record.links[link.name] == (server, client)
        assert link.server.tunnel is not None  # and the IPv4 pair beside it


def test_adding_a_link_or_a_host_moves_no_ipv6_pair() -> None:
    before, record = allocate(parse(links_text(["east", "west"])))
    text = links_text(["east", "west", "aaa-new"])
    more_hosts = HOSTS + "  - name: delta\n    address: 198.18.1.4\n"
    inv = parse_inventory(more_hosts + "links:\n" + text, "inv.yaml")
    after, _ = allocate(inv, record)
    old = {lk.name: lk.server.tunnel6 for lk in before.links}
    new = {lk.name: lk.server.tunnel6 for lk in after.links}
    assert new["east"] == old["east"] and new["west"] == old["west"]
    assert derive_pool6(inv) != record.pool  # the host list changed the hash...
    assert all(a in record.pool for a in new.values())  # ...but the recorded pool stays


def test_opt_out_per_link_in_defaults_and_below_1280_mtu() -> None:
    inv, record = allocate(parse(links_text(["east"], "  ipv6: false\n")))
    assert inv.links[0].server.tunnel6 is None and record == Record6()
    inv, _ = allocate(parse(links_text(["east"]), "defaults:\n  ipv6: false\n"))
    assert inv.links[0].server.tunnel6 is None
    inv, _ = allocate(parse(links_text(["east"], "  mtu: 576\n")))
    assert inv.links[0].server.tunnel6 is None
    inv, _ = allocate(parse(links_text(["east"], "  ipv6: true\n"), "defaults:\n  ipv6: false\n"))
    assert inv.links[0].server.tunnel6 is not None


def test_explicit_pairs_and_pool6_are_used_and_avoided() -> None:
    text = links_text(["east"]) + "  tunnel6:\n    server: fd00:77::1\n    client: fd00:77::2\n"
    text += links_text(["west"]).replace("4000", "4001")
    inv, _ = allocate(parse(text, "defaults:\n  tunnel_pool6: fd00:77::/64\n"))
    east, west = inv.links
    assert (east.server.tunnel6, east.client.tunnel6) == (
        IPv6Address("fd00:77::1"),
        IPv6Address("fd00:77::2"),
    )
    assert west.server.tunnel6 in IPv6Network("fd00:77::/64")
    assert west.server.tunnel6 not in (east.server.tunnel6, east.client.tunnel6)


def test_an_ipv6_only_tunnel_needs_no_second_pair_and_takes_ipv6_routes() -> None:
    text = links_text(["six"]) + (
        "  tunnel:\n    server: fd00:66::1\n    client: fd00:66::2\n"
        "  routes:\n    server:\n      - 2001:db8:40::/48\n"
    )
    inv, _ = allocate(parse(text))
    assert inv.links[0].server.tunnel6 is None
    assert inv.links[0].server.tunnel == IPv6Address("fd00:66::1")


def test_a_tunnel_pair_of_two_families_names_the_client_line() -> None:
    got = problems(
        """\
        - name: two
          server: alpha
          client: beta
          tunnel:
            server: 198.19.9.1
            client: fd00:9::2
        """
    )
    assert got == [
        "inv.yaml:15 links[0].tunnel.client: fd00:9::2 and the server's 198.19.9.1 are of "
        "different families: put the IPv6 pair under tunnel6",
    ]


def test_family_problems_name_file_line_and_path() -> None:
    got = problems(
        """\
        - name: one
          server: alpha
          client: gamma
          ipv6: false
          routes:
            server:
              - 2001:db8:40::/48
        - name: three
          server: gamma
          client: alpha
          tunnel:
            server: fd00:3::1
            client: fd00:3::2
          tunnel6:
            server: fd00:3::5
            client: fd00:3::6
          routes:
            client:
              - 198.18.50.0/24
        - name: four
          server: gamma
          client: alpha
          port: 401
          routes:
            client:
              - 2001:db8:1::/64
        """
    )
    assert got == [
        "inv.yaml:16 links[0].routes.server[0]: 2001:db8:40::/48 is IPv6 but the link opts out "
        "of IPv6 (ipv6: false)",
        "inv.yaml:24 links[1].tunnel6: the tunnel is already IPv6 (tunnel:); tunnel6 goes "
        "beside an IPv4 tunnel",
        "inv.yaml:28 links[1].routes.client[0]: 198.18.50.0/24 is IPv4 but the tunnel is "
        "IPv6-only (tunnel: is IPv6)",
        "inv.yaml:35 links[2].routes.client[0]: 2001:db8:1::/64 contains alpha's underlay "
        "address 2001:db8:1::1: gamma's carrier to alpha would be routed into a tunnel",
    ]


def test_ipv6_collisions_and_overlaps_name_file_line_and_path() -> None:
    got = problems(
        """\
        - name: one
          server: alpha
          client: gamma
          tunnel6:
            server: 2001:db8:1::2
            client: fd00:1::2
          routes:
            client:
              - 2001:db8:60::/48
        - name: two
          server: alpha
          client: beta
          port: 400
          tunnel6:
            server: fd00:1::2
            client: fd00:1::3
          routes:
            client:
              - 2001:db8:60:1::/64
        """,
        "defaults:\n  mtu: 1400\n",
    )
    assert got == [
        "inv.yaml:16 links[0].tunnel6.server: 2001:db8:1::2 is the underlay address of "
        "hosts[1].address",
        "inv.yaml:26 links[1].tunnel6.server: fd00:1::2 is already used by links[0]",
        "inv.yaml:30 links[1].routes.client[0]: 2001:db8:60:1::/64 overlaps links[0].routes."
        "client[0] (2001:db8:60::/48) (both routed on host 'alpha')",
    ]


def test_an_mtu_below_1280_with_ipv6_asked_for_and_a_too_small_pool6() -> None:
    got = problems(links_text(["east"], "  mtu: 1000\n  ipv6: true\n"),
                   "defaults:\n  tunnel_pool6: fd00:1::/96\n")  # fmt: skip
    assert got == [
        "inv.yaml:2 defaults.tunnel_pool6: fd00:1::/96 is too small: give a /64 (or wider) "
        "for the IPv6 pool",
    ] or got[0].startswith("inv.yaml:2 defaults.tunnel_pool6")
    got = problems(links_text(["east"], "  mtu: 1000\n  ipv6: true\n"))
    assert got == [
        "inv.yaml:14 links[0].mtu: mtu 1000 is below 1280: a link carrying IPv6 needs at least "
        "that (or set ipv6: false)"
    ]


def test_hosts_without_a_family_in_common_cannot_be_linked() -> None:
    assert problems(
        links_text(["x"])
        .replace("client: gamma", "client: beta")
        .replace("server: alpha", "server: gamma")
    ) == [
        "inv.yaml:12 links[0].client: beta (2001:db8:1::2) and gamma (198.18.1.3) share no "
        "address family to carry the link: give one of them an address of the other's family "
        "(address6 for IPv6)"
    ]
