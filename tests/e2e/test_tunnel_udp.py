"""The tunnel over UDP (`transport udp`) between two namespaces: ping, a route behind, a transfer
with a moving client, captured datagrams replayed, and a spoofed message-1 flood.

Each test builds its own namespaces (server 198.18.1.1, client 198.18.1.2 on a veth 'WAN'),
writes a key and two mirrored configs, and starts `vpnd` in each.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key, load_key

pytestmark = pytest.mark.root

SERVER_TUN = "198.19.0.1"
CLIENT_TUN = "198.19.0.2"
BEHIND_SERVER = "198.18.100.1"  # a network behind the server (on its loopback)
PORT = 24751


@dataclass
class Lab:
    pair: Pair
    dir: Path
    tag: str

    def conf(self, role: str, extra: str = "") -> Path:
        """Write the config of one side; the two sides mirror each other."""
        path = self.dir / f"{role}.conf"
        if role == "server":
            body = f"""
                mode server
                server 0 {PORT}
                local {SERVER_TUN}
                remote {CLIENT_TUN}
            """
        else:
            body = f"""
                mode client
                server {self.pair.server_ip} {PORT}
                local {CLIENT_TUN}
                remote {SERVER_TUN}
                route1 198.18.100.0 255.255.255.0 {SERVER_TUN}
            """
        path.write_text(
            textwrap.dedent(body)
            + "transport udp\n"
            + f"interface {self.tag}t\n"
            + f"keyfile {self.dir / 'shared.key'}\n"
            + f"pidfile {self.dir / role}.pid\n"
            + f"statusfile {self.dir / role}.status.json\n"
            + "randomdev /dev/urandom\n"
            + textwrap.dedent(extra)
        )
        return path


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_netns()
    require_tools("ping")
    tag = new_tag("vu")
    d = tmp_path_factory.mktemp(f"{tag}-udp")
    generate_key(d / "shared.key", randomdev="/dev/urandom")
    with namespace_pair(tag) as pair:
        pair.server.run("ip", "addr", "add", f"{BEHIND_SERVER}/24", "dev", "lo")
        yield Lab(pair, d, tag)


def _up(p) -> bool:
    return p.state() == "up"


def test_link_over_udp_pings_both_ways_and_reaches_the_route_behind(lab: Lab) -> None:
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up on both ends")
        assert lab.pair.client.ping(SERVER_TUN, count=3)
        assert lab.pair.server.ping(CLIENT_TUN)
        assert "198.18.100.0/24 via 198.19.0.1" in lab.pair.client.routes()
        assert lab.pair.client.ping(BEHIND_SERVER)
        c = client.status()
        assert c["peer"] == f"{lab.pair.server_ip}:{PORT}"
        assert server.status()["peer"].startswith("198.18.1.2:")
        assert "listening on udp" in server.log()
