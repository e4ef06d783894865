"""IPv6 inside the tunnel and as the carrier, between two real namespaces.

Dual-stack link over the usual IPv4 underlay (198.18.1.1 <-> 198.18.1.2): tunnel 198.19.0.1/.2
plus fd00:5ee::1/::2, pings of both families both ways, an IPv6 network behind the server
(2001:db8:100::/64 on its loopback) reached through `route1 2001:db8:100::/64`, and a TCP
transfer over IPv6 inside the tunnel checked by sha256 that crosses as TSO6 super-packets.
Then an IPv6-only underlay (2001:db8:1::1 <-> ::2, no IPv4 on the veth) carrying the same
IPv4+IPv6 tunnel, with the server's `client` filter naming the client's IPv6 address.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require, require_root_netns, require_tools
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from tests.helpers.transfer import transfer
from tests.helpers.tunnel_conf import write_conf
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root

SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
SERVER_TUN6, CLIENT_TUN6 = "fd00:5ee::1", "fd00:5ee::2"
BEHIND_SERVER6 = "2001:db8:100::1"
SERVER_WAN6, CLIENT_WAN6 = "2001:db8:1::1", "2001:db8:1::2"


@dataclass
class Lab:
    pair: Pair
    dir: Path
    tag: str

    def conf(self, role: str, server_addr: str, extra: str = "") -> Path:
        """One side's config: a dual-stack tunnel, the client routing the server's network."""
        if role == "server":
            body = f"""
                mode server
                server 0 24741
                local {SERVER_TUN}
                remote {CLIENT_TUN}
                local6 {SERVER_TUN6}
                remote6 {CLIENT_TUN6}
            """
        else:
            body = f"""
                mode client
                server {server_addr} 24741
                local {CLIENT_TUN}
                remote {SERVER_TUN}
                local6 {CLIENT_TUN6}
                remote6 {SERVER_TUN6}
                route1 2001:db8:100::/64 {SERVER_TUN6}
            """
        return write_conf(self.dir, role, body, tag=self.tag, extra=extra)


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_netns()
    require_tools("ping")
    require(os.path.isdir("/proc/sys/net/ipv6"), "needs IPv6 in the kernel")
    tag = new_tag("v6")
    d = tmp_path_factory.mktemp(f"{tag}-ipv6")
    generate_key(d / "shared.key", randomdev="/dev/urandom")
    with namespace_pair(tag) as pair:
        pair.server.run("ip", "-6", "addr", "add", f"{BEHIND_SERVER6}/64", "dev", "lo")
        yield Lab(pair, d, tag)


def test_dual_stack_link_pings_both_families_routes_ipv6_and_moves_tcp_over_ipv6(
    lab: Lab,
) -> None:
    # Given a dual-stack tunnel over the IPv4 underlay
    s_conf = lab.conf("server", "")
    c_conf = lab.conf("client", lab.pair.server_ip)
    with (
        vpnd(lab.pair.server, s_conf, lab.dir, "server") as server,
        vpnd(lab.pair.client, c_conf, lab.dir, "client") as client,
    ):
        poll_until(lambda: server.state() == "up" and client.state() == "up", 20, what="link up")
        # Then both families cross both ways
        assert lab.pair.client.ping(SERVER_TUN)
        assert lab.pair.server.ping(CLIENT_TUN)
        assert lab.pair.client.ping(SERVER_TUN6)
        assert lab.pair.server.ping(CLIENT_TUN6)
        # And the IPv6 network behind the server is reached through route1
        routes6 = lab.pair.client.run("ip", "-6", "route").stdout
        assert "2001:db8:100::/64" in routes6
        assert lab.pair.client.ping(BEHIND_SERVER6)
        # And the status records show both families
        c = client.status()
        assert (c["local"], c["remote"], c["local6"], c["remote6"]) == (
            CLIENT_TUN,
            SERVER_TUN,
            CLIENT_TUN6,
            SERVER_TUN6,
        )
        shown = lab.pair.client.run(
            sys.executable, "-m", "vpnd_runtime", "status", "-f", str(c_conf)
        ).stdout
        assert f"{CLIENT_TUN6} -> {SERVER_TUN6}" in shown
        # When 16 MiB cross over TCP/IPv6 inside the tunnel
        blob = lab.dir / "blob"
        blob.write_bytes(os.urandom(16 * 1024 * 1024))
        before = client.status()
        n, digest = transfer(lab.pair.server, lab.pair.client, SERVER_TUN6, blob)
        # Then they arrive intact
        assert (n, digest) == (blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest())
        # And they crossed as TSO6 super-packets: far fewer TUN reads than 1400-byte segments
        poll_until(
            lambda: client.status()["bytes_out"] - before["bytes_out"] >= n, 10, what="counted"
        )
        after = client.status()
        sent_bytes = after["bytes_out"] - before["bytes_out"]
        sent_packets = after["packets_out"] - before["packets_out"]
        assert sent_bytes >= n
        assert sent_packets < n / 1400 / 2, (sent_packets, sent_bytes)


def test_ipv6_only_underlay_carries_an_ipv4_and_ipv6_tunnel(lab: Lab) -> None:
    # Given an underlay with IPv6 only: the veth's IPv4 addresses are gone
    pair = lab.pair
    pair.server.run("ip", "addr", "flush", "dev", pair.server_if)
    pair.client.run("ip", "addr", "flush", "dev", pair.client_if)
    pair.server.run("ip", "-6", "addr", "add", f"{SERVER_WAN6}/64", "dev", pair.server_if, "nodad")
    pair.client.run("ip", "-6", "addr", "add", f"{CLIENT_WAN6}/64", "dev", pair.client_if, "nodad")
    assert pair.client.ping(SERVER_WAN6)
    # And a server that accepts this one client by its IPv6 address, marking with ipopts
    s_conf = lab.conf("server", "", f"client {CLIENT_WAN6} 0\nipopts 4\n")
    c_conf = lab.conf("client", SERVER_WAN6, "ipopts 4\nautoroute\nroute2 ::/0\n")
    with (
        vpnd(pair.server, s_conf, lab.dir, "server6") as server,
        vpnd(pair.client, c_conf, lab.dir, "client6") as client,
    ):
        poll_until(lambda: server.state() == "up" and client.state() == "up", 20, what="link up")
        # Then both families cross the tunnel both ways
        assert pair.client.ping(SERVER_TUN)
        assert pair.server.ping(CLIENT_TUN)
        assert pair.client.ping(SERVER_TUN6)
        assert pair.server.ping(CLIENT_TUN6)
        # And a default IPv6 route through the tunnel leaves the carrier alone: autoroute
        # pinned the server's carrier address along its own path
        routes6 = pair.client.run("ip", "-6", "route").stdout
        assert f"default dev {lab.tag}t" in routes6 or "default via fd00:5ee::1" in routes6
        assert f"{SERVER_WAN6} dev {pair.client_if}" in routes6, routes6
        # And each end shows its carrier peer as an IPv6 endpoint
        assert client.status()["peer"] == f"[{SERVER_WAN6}]:24741"
        assert server.status()["peer"].startswith(f"[{CLIENT_WAN6}]:")
        # And the carrier's connection carries the traffic class ipopts 4 (low delay) asks for
        ss = pair.client.run("ss", "-6", "-t", "-n", "--tos", "state", "established").stdout
        assert "tclass:0x10" in ss, ss


def test_udp_over_an_ipv6_underlay_carries_both_families_and_tcp_over_ipv6(lab: Lab) -> None:
    # Given the IPv6-only underlay and a dual-stack tunnel over UDP
    pair = lab.pair
    pair.server.run("ip", "addr", "flush", "dev", pair.server_if)
    pair.client.run("ip", "addr", "flush", "dev", pair.client_if)
    pair.server.run("ip", "-6", "addr", "add", f"{SERVER_WAN6}/64", "dev", pair.server_if, "nodad")
    pair.client.run("ip", "-6", "addr", "add", f"{CLIENT_WAN6}/64", "dev", pair.client_if, "nodad")
    s_conf = lab.conf("server", "", f"transport udp\nclient {CLIENT_WAN6} 0\nipopts 4\n")
    c_conf = lab.conf("client", SERVER_WAN6, "transport udp\nipopts 4\n")
    with (
        vpnd(pair.server, s_conf, lab.dir, "server-udp6") as server,
        vpnd(pair.client, c_conf, lab.dir, "client-udp6") as client,
    ):
        poll_until(lambda: server.state() == "up" and client.state() == "up", 20, what="link up")
        # Then both families cross both ways, and the carrier endpoints are IPv6
        for ns, targets in (
            (pair.client, (SERVER_TUN, SERVER_TUN6)),
            (pair.server, (CLIENT_TUN, CLIENT_TUN6)),
        ):
            for target in targets:
                assert ns.ping(target), target
        assert client.status()["peer"] == f"[{SERVER_WAN6}]:24741"
        assert server.status()["peer"].startswith(f"[{CLIENT_WAN6}]:")
        # And 8 MiB of TCP over IPv6 inside the tunnel arrive intact (segmented for datagrams)
        blob = lab.dir / "blob-udp"
        blob.write_bytes(os.urandom(8 * 1024 * 1024))
        n, digest = transfer(lab.pair.server, lab.pair.client, SERVER_TUN6, blob)
        assert (n, digest) == (blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest())
