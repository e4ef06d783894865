"""A hub carrying IPv6: a dual-stack client with an IPv6 network behind it and an IPv6-only
client, both on one vpnd hub (198.19.1.1 + fd00:1::1) that forwards between them.

The hub's allowed-source rule and longest-prefix routing read IPv6 headers: the IPv6-only client
reaches the other client's address and the network behind it through the hub, and a packet it
sends from an address of that network is dropped at the hub and counted as spoofed.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_root_netns, require_tools
from tests.helpers.netns import Star, namespace_star, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root

HUB, HUB6 = "198.19.1.1", "fd00:1::1"
C0, C0_6, C1_6 = "198.19.1.10", "fd00:1::10", "fd00:1::11"
BEHIND_C0 = "2001:db8:40::1"
PORT = 24741


@pytest.fixture
def star(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Star, Path]]:
    require_root_netns()
    require_tools("ping", "sysctl")
    require(os.path.isdir("/proc/sys/net/ipv6"), "needs IPv6 in the kernel")
    tag = new_tag("h6")
    d = tmp_path_factory.mktemp(f"{tag}-hub6")
    with namespace_star(2, tag) as star:
        star.hub.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
        star.clients[0].run("ip", "-6", "addr", "add", f"{BEHIND_C0}/64", "dev", "lo")
        yield star, d


def _write(d: Path, tag: str) -> dict[str, Path]:
    for name in ("c0", "c1"):
        generate_key(d / f"{name}.key", randomdev="/dev/urandom")
    peers = d / "peers"
    peers.mkdir()
    (peers / "c0.peer").write_text(
        f"remote {C0}\nremote6 {C0_6}\nkeyfile {d / 'c0.key'}\nroute1 2001:db8:40::/48 {C0_6}\n"
    )
    (peers / "c1.peer").write_text(f"remote {C1_6}\nkeyfile {d / 'c1.key'}\n")
    common = f"randomdev /dev/urandom\ninterface {tag}t\n"
    confs = {
        "hub": f"""\
            mode server
            server 0 {PORT}
            local {HUB}
            local6 {HUB6}
            peers {peers}
            statusfile {d}/hub.status.json
            pidfile {d}/hub.pid
        """,
        "c0": f"""\
            mode client
            server {Star.hub_ip(0)} {PORT}
            local {C0}
            remote {HUB}
            local6 {C0_6}
            remote6 {HUB6}
            keyfile {d / "c0.key"}
            statusfile {d}/c0.status.json
            route1 fd00:1::/64
        """,
        "c1": f"""\
            mode client
            server {Star.hub_ip(1)} {PORT}
            local {C1_6}
            remote {HUB6}
            keyfile {d / "c1.key"}
            statusfile {d}/c1.status.json
            route1 fd00:1::/64
            route2 2001:db8:40::/48 {HUB6}
        """,
    }
    out = {}
    for name, text in confs.items():
        out[name] = d / f"{name}.conf"
        out[name].write_text(textwrap.dedent(text) + common)
    return out


def test_a_hub_routes_and_polices_ipv6_between_a_dual_stack_and_an_ipv6_only_client(
    star: tuple[Star, Path],
) -> None:
    s, d = star
    confs = _write(d, s.tag)
    with (
        vpnd(s.hub, confs["hub"], d, "hub") as hub,
        vpnd(s.clients[0], confs["c0"], d, "c0") as c0,
        vpnd(s.clients[1], confs["c1"], d, "c1") as c1,
    ):
        poll_until(
            lambda: c0.state() == "up" and c1.state() == "up" and hub.status()["peers_up"] == 2,
            20,
            what="both clients up",
        )
        # Then each client reaches the hub in the families it has
        assert s.clients[0].ping(HUB) and s.clients[0].ping(HUB6)
        assert s.clients[1].ping(HUB6)
        # And the IPv6-only client reaches the other client and the network behind it
        assert s.clients[1].ping(C0_6)
        assert s.clients[1].ping(BEHIND_C0)
        # And the hub's record shows the dual-stack client's two addresses
        peers = {p["name"]: p for p in hub.status()["peers"]}
        assert (peers["c0"]["address"], peers["c0"]["address6"]) == (C0, C0_6)
        assert (peers["c1"]["address"], peers["c1"]["address6"]) == (C1_6, None)
        assert "2001:db8:40::/48" in s.hub.run("ip", "-6", "route").stdout
        # When c1 sends from an address of c0's network, the hub drops it as spoofed
        s.clients[1].run("ip", "-6", "addr", "add", "2001:db8:40::99/128", "dev", "lo")
        s.clients[1].run(
            "ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "2001:db8:40::99", HUB6, check=False
        )

        def spoofed() -> int:
            entry = {p["name"]: p for p in hub.status()["peers"]}["c1"]
            return int(entry["drops"].get("spoofed_source", 0))

        poll_until(lambda: spoofed() == 2, 10, what="two spoofed packets counted")
