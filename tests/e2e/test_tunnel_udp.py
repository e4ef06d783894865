"""The tunnel over UDP (`transport udp`) between two namespaces: ping, a route behind, a transfer
with a moving client, captured datagrams replayed, and a spoofed message-1 flood.

Each test builds its own namespaces (server 198.18.1.1, client 198.18.1.2 on a veth 'WAN'),
writes a key and two mirrored configs, and starts `vpnd` in each.
"""

from __future__ import annotations

import hashlib
import json
import os
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
from tests.helpers.transfer import transfer
from tests.helpers.tunnel_conf import write_conf
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
        extra = "transport udp\n" + textwrap.dedent(extra)
        return write_conf(self.dir, role, body, tag=self.tag, extra=extra)


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_netns()
    require_tools("ping", "sysctl")
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


CAPTURE = str(Path(__file__).parents[1] / "helpers" / "udp_capture.py")


def test_client_changes_address_mid_transfer_and_the_server_follows(lab: Lab) -> None:
    blob = lab.dir / "blob"
    blob.write_bytes(os.urandom(20 * 1024 * 1024))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    client_ns, cif = lab.pair.client, lab.pair.client_if
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        assert server.status()["peer"].startswith("198.18.1.2:")

        def move() -> None:
            # NAT rebinding, as the server sees it: the client's source address changes.
            client_ns.run("sysctl", "-qw", f"net.ipv4.conf.{cif}.promote_secondaries=1")
            client_ns.run("ip", "addr", "add", "198.18.1.3/24", "dev", cif)
            client_ns.run("ip", "addr", "del", "198.18.1.2/24", "dev", cif)

        n, digest = transfer(lab.pair.server, client_ns, SERVER_TUN, blob, at_half=move)
        assert (n, digest) == (blob.stat().st_size, want)
        s = server.status()
        assert s["peer"].startswith("198.18.1.3:"), s["peer"]
        assert s["roams"] >= 1
        assert s["reconnects"] == 0 and client.status()["reconnects"] == 0  # same session
        assert "peer moved from 198.18.1.2:" in server.log()


def test_replayed_datagrams_are_dropped_and_counted_and_move_nothing(lab: Lab) -> None:
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        # Capture what the client sends while pings cross the tunnel
        cap = subprocess.Popen(
            lab.pair.server.cmd(sys.executable, CAPTURE, lab.pair.server_if, str(PORT), "3", "in"),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        assert lab.pair.client.ping(SERVER_TUN, count=8)
        out, _ = cap.communicate(timeout=30)
        grams = [bytes.fromhex(d[4]) for d in json.loads(out)["datagrams"]]
        data = [g for g in grams if len(g) > 4 and g[4] == 0x03]  # data messages only
        assert len(data) >= 8, grams
        before = server.status()
        pkts_before = before["packets_in"]
        # When an attacker re-sends them, from the client's host but another port
        replay = "\n".join(
            [
                "import socket, sys",
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
                "for h in sys.argv[2:]:",
                f"    s.sendto(bytes.fromhex(h), (sys.argv[1], {PORT}))",
            ]
        )
        lab.pair.client.run(sys.executable, "-c", replay, lab.pair.server_ip,
                            *[g.hex() for g in data])  # fmt: skip
        # Then each is dropped and counted as a replay, none reaches the TUN, the peer stays put
        poll_until(
            lambda: server.status()["drops"].get("proto_replay", 0) >= len(data),
            10,
            what="replays counted",
        )
        after = server.status()
        assert after["packets_in"] == pkts_before
        assert after["peer"] == before["peer"] and after["roams"] == 0
        assert lab.pair.client.ping(SERVER_TUN)


def test_spoofed_message1_flood_gets_no_answer_larger_than_itself(lab: Lab) -> None:
    key = load_key(lab.dir / "shared.key")
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        # One genuine, fresh message 1 made with the key (its answer is the only one allowed)
        from vpnd_runtime.proto.connection import Connection, Params

        genuine = Connection("initiator", key, Params(datagram=True), os.urandom, 0.0,
                             wall=time.time(), index=77)  # fmt: skip
        genuine.start(0.0)
        (msg1,) = genuine.datagrams_to_send()
        kid = msg1[5:9]
        # A spoofed source with a neighbour entry, so an answer to it would show on the wire
        mac = lab.pair.client.run("cat", f"/sys/class/net/{lab.pair.client_if}/address").stdout
        lab.pair.server.run("ip", "neigh", "replace", "198.18.1.77", "lladdr", mac.strip(),
                            "dev", lab.pair.server_if)  # fmt: skip
        cap = subprocess.Popen(
            lab.pair.server.cmd(
                sys.executable, CAPTURE, lab.pair.server_if, str(PORT), "12", "out"
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        flood = f"""
import os, socket, struct, sys, time
server = ("{lab.pair.server_ip}", {PORT})
msg1 = bytes.fromhex("{msg1.hex()}")
kid = bytes.fromhex("{kid.hex()}")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(msg1, server)                       # the genuine one
time.sleep(0.3)
for _ in range(50):
    u.sendto(msg1, server)                   # ... replayed
junk = [bytes(4) + b"\\x01" + kid + os.urandom(78) for _ in range(64)]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def spoofed(payload, src):
    udp = struct.pack("!HHHH", 40000, {PORT}, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(server[0]))
    raw.sendto(ip + udp, (server[0], 0))
end = time.monotonic() + 5
sent = 0
while time.monotonic() < end:
    for j in junk:
        u.sendto(j, server)
        spoofed(j, "198.18.1.77")
        sent += 2
print(sent, flush=True)
"""
        sent = int(lab.pair.client.run(sys.executable, "-c", flood, timeout=60).stdout.split()[0])
        # During and after the flood the link stays up and carries traffic
        assert lab.pair.client.ping(SERVER_TUN, count=3)
        out, _ = cap.communicate(timeout=30)
        answers = [d for d in json.loads(out)["datagrams"] if d[2] != lab.pair.client_ip
                   or not server.status()["peer"].endswith(f":{d[3]}")]  # fmt: skip
        assert sent > 1000
        # Then: nothing went to the spoofed address, and the flooding socket got exactly one
        # answer (to the genuine message 1), smaller than the message it answers
        assert not [d for d in answers if d[2] == "198.18.1.77"]
        sizes = [len(bytes.fromhex(d[4])) for d in answers]
        assert sizes == [57], answers
        assert max(sizes) <= len(msg1) == 87
        drops = server.status()["drops"]
        assert drops.get("handshake_ratelimited", 0) + drops.get("proto_bad_handshake", 0) > 1000
        assert drops.get("proto_replay", 0) + drops.get("handshake_ratelimited", 0) >= 50
        assert client.state() == "up"


def test_twenty_megabytes_cross_a_lossy_jittery_reordering_wan_intact(tmp_path: Path) -> None:
    """Through the lab WAN (tests/helpers/wan.py): 20 ms one-way delay with 30 ms jitter, 2 %
    loss and 2 % reordering each way, and a rekey every 3 s on top."""
    require_root_netns()
    from tests.helpers.wan import wan_pair

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(20 * 1024 * 1024))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    generate_key(tmp_path / "shared.key", randomdev="/dev/urandom")
    spec = "delay=20ms,jitter=30ms,loss=2%,reorder=2%,seed=7"
    with wan_pair(spec, new_tag("vw")) as wp:
        lab = Lab(Pair(wp.tag, wp.b, wp.a, "wan0", "wan0"), tmp_path, wp.tag)
        timers = "keyttl 3\nkeepalive 2\nnoanswer 5\n"
        with (
            vpnd(wp.b, lab.conf("server", timers), tmp_path, "server") as server,
            vpnd(wp.a, lab.conf("client", timers), tmp_path, "client") as client,
        ):
            poll_until(lambda: _up(server) and _up(client), 30, what="link up through the WAN")
            n, digest = transfer(wp.b, wp.a, SERVER_TUN, blob, timeout=240)
            assert (n, digest) == (blob.stat().st_size, want)
            s, c = server.status(), client.status()
            assert s["reconnects"] == 0 and c["reconnects"] == 0
            assert c["rekeys"] >= 1
            lost = wp.stats()
        # The WAN really dropped and reordered datagrams (the session absorbed them)
        up = lost["up"]
        assert up["dropped_loss"] > 0 and up["reordered"] > 0, lost
