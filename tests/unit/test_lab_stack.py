"""The lab's plan for dual-stack and IPv6-only hosts (pure: no namespace is made here)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vpnctl.inventory import parse_inventory
from vpnctl.lab import LabError, _host_plan, lab_inventory, mgmt_net6, parse_stacks

MGMT = ipaddress.IPv4Network("198.18.123.0/24")


def test_stacks_one_for_all_or_one_per_host() -> None:
    assert parse_stacks("dual", 3) == ["dual"] * 3
    assert parse_stacks("dual,ipv6,ipv4", 3) == ["dual", "ipv6", "ipv4"]
    with pytest.raises(LabError, match="one per host"):
        parse_stacks("dual,ipv6", 3)
    with pytest.raises(LabError, match="'ip6' is not one of ipv4, dual, ipv6"):
        parse_stacks("ip6", 2)


def test_plan_gives_documentation_addresses_and_an_ipv6_only_host_no_ipv4() -> None:
    hosts = _host_plan("t", Path("/lab"), MGMT, 2, ["dual", "ipv6", "ipv4"])
    server, six, four = hosts
    assert mgmt_net6(MGMT) == ipaddress.IPv6Network("2001:db8:ff:7b::/64")
    assert (server.wan_ip, server.wan_ip6) == ("198.18.1.1", "2001:db8:1::1")
    assert (six.mgmt_ip, six.wan_ip) == ("", "")
    assert six.ssh_ip == six.mgmt_ip6 == "2001:db8:ff:7b::3"
    assert (four.mgmt_ip6, four.wan_ip6) == ("", "")
    for host in hosts:
        for address in filter(None, (host.mgmt_ip6, host.wan_ip6)):
            assert ipaddress.IPv6Address(address) in ipaddress.IPv6Network("2001:db8::/32")
        for address in filter(None, (host.mgmt_ip, host.wan_ip)):
            assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("198.18.0.0/15")


def test_the_lab_inventory_of_mixed_stacks_is_valid() -> None:
    import yaml

    hosts = _host_plan("t", Path("/lab"), MGMT, 2, ["dual", "ipv6", "dual"])
    document = lab_inventory(hosts, Path("/lab"), Path("/lab"))
    inventory = parse_inventory(yaml.safe_dump(document), "inventory.yaml")
    by_name = {h.name: h for h in inventory.hosts}
    assert str(by_name["client1"].address) == "2001:db8:1::b"
    assert str(by_name["server"].address6) == "2001:db8:1::1"
    assert all(link.dual_stack for link in inventory.links)
