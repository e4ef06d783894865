"""One vpnd hub serving several real vpnd clients, each in a namespace of its own.

The hub (198.19.1.1 inside the tunnel, a network 198.18.100.0/24 behind it) runs one daemon, one
port, one TUN; each client has its own key unless a test says otherwise, and a route to the hub's
client network so that clients reach each other through the hub.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Star, VpndProcess, namespace_star, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root

HUB = "198.19.1.1"
BEHIND_HUB = "198.18.100.1"
PORT = 24741


def client_addr(i: int) -> str:
    return f"198.19.1.{10 + i}"


@dataclass
class HubLab:
    star: Star
    dir: Path
    tag: str
    stack: ExitStack
    hub: VpndProcess | None = None
    clients: dict[int, VpndProcess] = field(default_factory=dict)

    @property
    def peers(self) -> Path:
        return self.dir / "peers"

    def add_peer(self, i: int, key: str | None = None, extra: str = "") -> None:
        """Write client i's peer file on the hub (its own key unless `key` names another)."""
        self.peers.mkdir(exist_ok=True)
        keyname = key or f"c{i}.key"
        if not (self.dir / keyname).exists():
            generate_key(self.dir / keyname, randomdev="/dev/urandom")
        keyline = f"keyfile {self.dir / keyname}\n" if key != "hub.key" else ""
        (self.peers / f"c{i}.peer").write_text(f"remote {client_addr(i)}\n{keyline}{extra}")

    def start_hub(self, extra: str = "") -> VpndProcess:
        if not (self.dir / "hub.key").exists():
            generate_key(self.dir / "hub.key", randomdev="/dev/urandom")
        conf = self.dir / "hub.conf"
        conf.write_text(
            textwrap.dedent(f"""\
                mode server
                server 0 {PORT}
                local {HUB}
                peers {self.peers}
                keyfile {self.dir / "hub.key"}
                interface {self.tag}h
                pidfile {self.dir}/hub.pid
                statusfile {self.dir}/hub.status.json
                randomdev /dev/urandom
                linkup {self.dir / "hook.sh"}
                linkdown {self.dir / "hook.sh"}
            """)
            + extra
        )
        self.hub = self.stack.enter_context(vpnd(self.star.hub, conf, self.dir, "hub"))
        return self.hub

    def start_client(self, i: int, key: str | None = None) -> VpndProcess:
        conf = self.dir / f"c{i}.conf"
        conf.write_text(
            textwrap.dedent(f"""\
                mode client
                server {Star.hub_ip(i)} {PORT}
                local {client_addr(i)}
                remote {HUB}
                keyfile {self.dir / (key or f"c{i}.key")}
                interface {self.tag}t
                statusfile {self.dir}/c{i}.status.json
                randomdev /dev/urandom
                route1 198.19.1.0 255.255.255.0 {HUB}
                route2 198.18.100.0 255.255.255.0 {HUB}
            """)
        )
        proc = self.stack.enter_context(vpnd(self.star.clients[i], conf, self.dir, f"c{i}"))
        self.clients[i] = proc
        return proc

    def hub_peer(self, i: int) -> dict:
        assert self.hub is not None
        for entry in self.hub.status().get("peers", []):
            if entry["name"] == f"c{i}":
                return entry
        return {}

    def reload_hub(self) -> None:
        assert self.hub is not None
        os.kill(self.hub.pid, signal.SIGHUP)

    def hook_calls(self) -> list[str]:
        path = self.dir / "hooks.txt"
        return path.read_text().splitlines() if path.exists() else []


def _make_lab(tmp_path_factory: pytest.TempPathFactory, n: int) -> Iterator[HubLab]:
    require_root_netns()
    require_tools("ping", "sysctl")
    tag = new_tag("vh")
    d = tmp_path_factory.mktemp(f"{tag}-hub")
    hook = d / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$VPND_EVENT $*" >> {d}/hooks.txt\n')
    hook.chmod(0o755)
    with namespace_star(n, tag) as star, ExitStack() as stack:
        star.hub.run("ip", "addr", "add", f"{BEHIND_HUB}/24", "dev", "lo")
        yield HubLab(star, d, tag, stack)


@pytest.fixture
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubLab]:
    yield from _make_lab(tmp_path_factory, 3)


@pytest.fixture
def lab4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubLab]:
    yield from _make_lab(tmp_path_factory, 4)


def _all_up(lab: HubLab, ids: list[int]) -> bool:
    return all(lab.clients[i].state() == "up" for i in ids) and all(
        lab.hub_peer(i).get("state") == "up" for i in ids
    )


def test_three_clients_reach_the_hub_its_network_and_each_other_and_spoofing_is_dropped(
    lab3: HubLab,
) -> None:
    # Given a hub with three clients, each with its own key
    for i in range(3):
        lab3.add_peer(i, extra="route1 198.18.200.0 255.255.255.0 198.19.1.10\n" if i == 0 else "")
    hub = lab3.start_hub()
    for i in range(3):
        lab3.start_client(i)
    poll_until(lambda: _all_up(lab3, [0, 1, 2]), 30, what="three clients up at the hub")
    # Then each pings the hub and the network behind it
    for i in range(3):
        assert lab3.star.clients[i].ping(HUB), f"client {i} -> hub"
        assert lab3.star.clients[i].ping(BEHIND_HUB), f"client {i} -> network behind the hub"
    # And the hub reaches each client, and the network behind client 0 goes to client 0
    for i in range(3):
        assert lab3.star.hub.ping(client_addr(i)), f"hub -> client {i}"
    lab3.star.clients[0].run("ip", "addr", "add", "198.18.200.1/24", "dev", "lo")
    assert lab3.star.hub.ping("198.18.200.1"), "hub -> network behind client 0"
    # And clients reach each other through the hub (it forwards IP)
    assert lab3.star.clients[0].ping(client_addr(1)), "client 0 -> client 1 via the hub"
    assert lab3.star.clients[2].ping(client_addr(0)), "client 2 -> client 0 via the hub"
    # When client 0 sends from client 1's address (spoofed), the hub drops and counts it
    lab3.star.clients[0].run("ip", "addr", "add", f"{client_addr(1)}/32", "dev", "lo")
    lab3.star.clients[0].run(
        "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", client_addr(1), HUB,
        check=False,
    )  # fmt: skip
    poll_until(
        lambda: lab3.hub_peer(0).get("drops", {}).get("spoofed_source", 0) >= 3,
        10,
        what="spoofed packets counted on client 0",
    )
    # And the status record shows every client with its own key and endpoint
    status = hub.status()
    assert (status["hub"], status["peers_total"], status["peers_up"]) == (True, 3, 3)
    fingerprints = {p["key_fingerprint"] for p in status["peers"]}
    assert len(fingerprints) == 3
    assert lab3.hub_peer(0)["routes"] == ["198.18.200.0/24"]
    assert lab3.hub_peer(1)["peer"].startswith(Star.client_ip(1) + ":")
    # And linkup ran per client with its name as the last argument
    ups = [c for c in lab3.hook_calls() if c.startswith("linkup")]
    assert sorted(c.split()[-1] for c in ups) == ["c0", "c1", "c2"]


def test_revoking_and_adding_clients_by_sighup_leaves_the_others_sessions_alone(
    lab4: HubLab,
) -> None:
    # Given a hub with clients 0, 1 and 2 up
    for i in range(3):
        lab4.add_peer(i)
    lab4.start_hub()
    for i in range(3):
        lab4.start_client(i)
    poll_until(lambda: _all_up(lab4, [0, 1, 2]), 30, what="three clients up")
    started = {i: lab4.hub_peer(i)["session_started"] for i in (0, 2)}
    hub_pid = lab4.hub.pid if lab4.hub else 0
    # When client 1's peer file is removed and the hub reloads
    (lab4.peers / "c1.peer").unlink()
    lab4.reload_hub()
    # Then client 1 is cut at once and its key opens nothing any more
    poll_until(lambda: lab4.hub_peer(1) == {}, 5, what="client 1 gone from the hub")
    poll_until(lambda: lab4.clients[1].state() != "up", 5, what="client 1 down")
    assert not lab4.star.clients[1].ping(HUB, count=1, timeout=1)
    # When client 3 is added and the hub reloads
    lab4.add_peer(3)
    lab4.reload_hub()
    lab4.start_client(3)
    poll_until(lambda: _all_up(lab4, [3]), 20, what="added client 3 up")
    assert lab4.star.clients[3].ping(HUB)
    # Then clients 0 and 2 kept their sessions (same start, growing age), the hub its PID
    for i in (0, 2):
        entry = lab4.hub_peer(i)
        assert entry["state"] == "up"
        assert entry["session_started"] == started[i]
        assert lab4.star.clients[i].ping(HUB)
    assert lab4.hub is not None and lab4.hub.pid == hub_pid and lab4.hub.proc.poll() is None
    assert "handshake failed" in lab4.clients[1].log() or lab4.clients[1].state() != "up"


def test_clienttoclient_no_refuses_client_to_client_traffic(lab3: HubLab) -> None:
    for i in range(2):
        lab3.add_peer(i)
    lab3.start_hub(extra="clienttoclient no\n")
    for i in range(2):
        lab3.start_client(i)
    poll_until(lambda: _all_up(lab3, [0, 1]), 30, what="two clients up")
    assert lab3.star.clients[0].ping(HUB)
    assert not lab3.star.clients[0].ping(client_addr(1), count=2, timeout=1)
    poll_until(
        lambda: lab3.hub_peer(0).get("drops", {}).get("client_to_client", 0) >= 2,
        10,
        what="client-to-client drops counted",
    )


def test_shared_key_clients_with_distinct_addresses_both_work(lab3: HubLab) -> None:
    # Given two peer files without a keyfile: both clients hold the hub's key (seed style)
    for i in range(2):
        lab3.add_peer(i, key="hub.key")
    lab3.start_hub()
    for i in range(2):
        lab3.start_client(i, key="hub.key")
    poll_until(lambda: _all_up(lab3, [0, 1]), 30, what="both shared-key clients up")
    for i in range(2):
        assert lab3.star.clients[i].ping(HUB)
    assert lab3.hub_peer(0)["key_fingerprint"] == lab3.hub_peer(1)["key_fingerprint"]


JUNK = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        if i % 2:  # half send garbage, half say nothing and just hold a slot
            s.send(b"\x00\x00\x00\x05junk!")
    except OSError:
        pass
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()  # hold them until told to stop
"""


def test_junk_connections_and_a_wrong_key_client_do_not_keep_a_client_out(
    lab3: HubLab,
) -> None:
    lab3.add_peer(0)
    lab3.add_peer(1)
    hub = lab3.start_hub()
    poll_until(lambda: hub.state() == "listening", 10, what="hub listening")
    # Given 500 junk connections from client 2's host and a client with a wrong key
    junk = subprocess.Popen(
        lab3.star.clients[2].cmd(sys.executable, "-c", JUNK, Star.hub_ip(2), str(PORT), "500"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert junk.stdout is not None
        assert junk.stdout.readline().strip() == "ready"
        generate_key(lab3.dir / "wrong.key", randomdev="/dev/urandom")
        wrong = lab3.start_client(1, key="wrong.key")
        # When the legitimate client connects
        lab3.start_client(0)
        # Then it comes up, and the wrong-key client does not
        poll_until(lambda: _all_up(lab3, [0]), 20, what="legit client up despite the flood")
        assert lab3.star.clients[0].ping(HUB)
        assert wrong.state() != "up"
        assert hub.status()["drops"].get("handshake_evicted", 0) > 0
    finally:
        junk.kill()
        junk.wait(5)
