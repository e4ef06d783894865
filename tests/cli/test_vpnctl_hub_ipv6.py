"""A hub is dual-stack by default: an IPv6 /112 of the inventory's pool beside its IPv4
network, an IPv6 address per client, IPv6 routes behind clients and the hub; all recorded so
that adding a client moves nobody, and mirrored by render --check."""

from __future__ import annotations

import json
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

from tests.cli.test_vpnctl_hub import HUB, project, run, write  # noqa: F401 - the fixture

SIX = HUB.replace(
    "        routes: [198.18.40.0/24]\n", "        routes: [198.18.40.0/24, 2001:db8:40::/48]\n"
).replace("    routes: [198.18.10.0/24]\n", "    routes: [198.18.10.0/24, 2001:db8:10::/48]\n")


def _directives(path: Path) -> dict[str, list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out[words[0]] = words[1:]
    return out


def test_a_dual_stack_hub_renders_both_families_and_pairs_with_its_clients(
    project: Path,  # noqa: F811 - the fixture
) -> None:
    write(project, SIX)
    assert run("keygen").exit_code == 0
    render = run("render")
    assert render.exit_code == 0, render.output
    build = project / "build"
    hub = _directives(build / "alpha/etc/vpnd/branches.conf")
    local6 = IPv6Address(hub["local6"][0])
    record = json.loads((project / "keystore/allocations.json").read_text())["ipv6"]
    network6 = IPv6Network(record["hubs"]["branches"]["network"])
    assert network6.prefixlen == 112 and network6.subnet_of(IPv6Network(record["pool"]))
    assert local6 == network6.network_address + 1
    gamma_peer = _directives(build / "alpha/etc/vpnd/branches.peers/gamma.peer")
    gamma6 = gamma_peer["remote6"][0]
    assert gamma6 == record["hubs"]["branches"]["clients"]["gamma"]
    assert gamma_peer["route2"] == ["2001:db8:40::/48", gamma6]
    client = _directives(build / "gamma/etc/vpnd/branches.conf")
    assert (client["local6"], client["remote6"]) == ([gamma6], [str(local6)])
    routes = {tuple(v) for k, v in client.items() if k.startswith("route")}
    assert (str(network6), str(local6)) in routes
    assert ("2001:db8:10::/48", str(local6)) in routes
    check = run("render", "--check")
    assert check.exit_code == 0, check.output
    # a client's local6 changed by hand (no longer its peer file's remote6) is caught
    conf = build / "gamma/etc/vpnd/branches.conf"
    conf.write_text(conf.read_text().replace(f"local6 {gamma6}", f"local6 {local6 + 99}"))
    check = run("render", "--check")
    assert check.exit_code == 1
    assert "IPv6 tunnel addresses do not mirror" in check.output


def test_adding_a_hub_client_moves_no_ipv6_address(project: Path) -> None:  # noqa: F811
    write(project, SIX)
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    path = project / "keystore/allocations.json"
    before = json.loads(path.read_text())["ipv6"]["hubs"]["branches"]
    write(project, SIX.replace("      - beta\n", "      - delta\n      - beta\n"))
    assert run("keygen").exit_code == 0
    assert run("render").exit_code == 0
    after = json.loads(path.read_text())["ipv6"]["hubs"]["branches"]
    assert after["network"] == before["network"]
    for name, address in before["clients"].items():
        assert after["clients"][name] == address
    assert after["clients"]["delta"] not in before["clients"].values()


def test_ipv6_routes_on_a_hub_without_ipv6_name_the_line(project: Path) -> None:  # noqa: F811
    write(project, SIX.replace("    port: 381\n", "    port: 381\n    ipv6: false\n"))
    result = run("keys")
    assert result.exit_code == 2
    assert "hubs[0].routes[1]: 2001:db8:10::/48 is IPv6 but the hub carries no IPv6" in (
        result.stderr
    )
    assert "hubs[0].clients[1].routes[1]: 2001:db8:40::/48 is IPv6 but the hub" in result.stderr
