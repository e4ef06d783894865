"""`vpnctl deploy` over IPv6 on the real lab: a dual-stack server, an IPv6-only client (no IPv4
anywhere: ssh, the carrier and deploy all run over IPv6) and a dual-stack client.

Every link is dual-stack by default, so after one deploy each client pings the server's tunnel
addresses of both families: the IPv6-only client carries an IPv4+IPv6 tunnel over an IPv6-only
underlay.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_root_netns, require_tools
from tests.helpers.lab import lab_exec, lab_ping, link_ends, rendered_lab, vpnctl
from vpnctl.lab import LabState

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    require(os.path.isdir("/proc/sys/net/ipv6"), "needs IPv6 in the kernel")
    with rendered_lab(
        tmp_path_factory.mktemp("deploy6") / "lab", clients=2, base="d6", stack="dual,ipv6,dual"
    ) as state:
        yield state


def _tunnels(state: LabState) -> dict[str, dict[str, str]]:
    """link -> {client, server4, server6}: its client host and its server's tunnel addresses."""
    return {
        link: {"client": client, "server4": server["local"], "server6": server["local6"]}
        for link, (client, _mine, server) in link_ends(state).items()
    }


def test_the_ipv6_only_host_has_no_ipv4_and_is_reached_by_ssh_over_ipv6(lab: LabState) -> None:
    client1 = next(h for h in lab.hosts if h.name == "client1")
    assert client1.stack == "ipv6" and client1.mgmt_ip == "" and client1.wan_ip == ""
    addrs = lab_exec(lab, "client1", "ip", "-4", "-o", "addr", "show", "scope", "global")
    assert addrs.strip() == ""
    ssh_config = (Path(lab.directory) / "ssh_config").read_text()
    assert f"Host client1\n    HostName {client1.mgmt_ip6}\n" in ssh_config
    inventory = (Path(lab.directory) / "inventory.yaml").read_text()
    assert f"address: {client1.wan_ip6}" in inventory
    # the IPv6-only client dials the dual-stack server's IPv6 address
    conf = (Path(lab.directory) / "build" / "client1" / "etc" / "vpnd" / "l1.conf").read_text()
    server = lab.hosts[0]
    assert f"server {server.wan_ip6} 4001" in conf


def test_deploy_over_ipv6_brings_up_dual_stack_links_that_carry_both_families(
    lab: LabState,
) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1, l2" in proc.stdout, proc.stdout
    for link, t in _tunnels(lab).items():
        for address in (t["server4"], t["server6"]):
            lab_ping(lab, t["client"], address, what=f"{link}: ")
    # the l1 carrier runs over IPv6: its client's status names the server's IPv6 endpoint
    status = json.loads(vpnctl(lab, "status", "--json").stdout)
    ends = {(e["host"], e["link"]): e for link in status["links"] for e in link["ends"]}
    assert ends[("client1", "l1")]["peer"] == f"[{lab.hosts[0].wan_ip6}]:4001"
    assert status["all_up"] is True


@pytest.fixture(scope="module")
def hub_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    require(os.path.isdir("/proc/sys/net/ipv6"), "needs IPv6 in the kernel")
    with rendered_lab(
        tmp_path_factory.mktemp("deployhub6") / "lab",
        clients=2,
        base="h6",
        stack="dual,ipv6,dual",
        hub=True,
    ) as state:
        yield state


def test_a_dual_stack_hub_deployed_over_ipv6_serves_an_ipv6_only_client(
    hub_lab: LabState,
) -> None:
    proc = vpnctl(hub_lab, "deploy", "--all", "--wait", "30")
    assert proc.returncode == 0, proc.stdout
    build = Path(hub_lab.directory) / "build"
    hub = json.loads((build / "server" / "manifest.json").read_text())["links"]["hub"]
    assert set(hub["clients"]) == {"client1", "client2"}
    assert hub["clients"]["client1"]["address6"] != hub["clients"]["client2"]["address6"]
    # every client reaches the hub in both families (client1 has no IPv4 underlay at all)
    for client in ("client1", "client2"):
        for address in (hub["local"], hub["local6"]):
            lab_ping(hub_lab, client, address)
    # (client-to-client IPv6 through a hub: tests/e2e/test_hub_ipv6.py, outside the lab)
