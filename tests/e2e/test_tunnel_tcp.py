"""A real encrypted TUN tunnel over TCP between two namespaces, driven like an operator would.

Each test builds its own pair of namespaces (server 198.18.1.1, client 198.18.1.2 on a veth
'WAN'), writes a key and two mirrored configs, starts `vpnd` in each and narrates its steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from tests.helpers.transfer import transfer
from tests.helpers.tunnel_conf import write_conf
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root

SERVER_TUN = "198.19.0.1"
CLIENT_TUN = "198.19.0.2"
BEHIND_SERVER = "198.18.100.1"  # a network behind the server (on its loopback)


@dataclass
class Lab:
    pair: Pair
    dir: Path
    tag: str

    def conf(self, role: str, extra: str = "", key: str = "shared.key") -> Path:
        """Write the config of one side; the two sides mirror each other."""
        hooks = "".join(
            f"{hook} {self.dir / 'hook.sh'}\n"
            for hook in ("slipup", "slipdown", "linkup", "linkdown")
        )
        if role == "server":
            body = f"""
                mode server
                server 0 24741
                client 0 0
                local {SERVER_TUN}
                remote {CLIENT_TUN}
            """
        else:
            body = f"""
                mode client
                server {self.pair.server_ip} 24741
                local {CLIENT_TUN}
                remote {SERVER_TUN}
                route1 198.18.100.0 255.255.255.0 {SERVER_TUN}
            """
        extra = hooks + textwrap.dedent(extra)
        return write_conf(self.dir, role, body, tag=self.tag, key=key, extra=extra)

    def hook_calls(self) -> list[str]:
        path = self.dir / "hooks.txt"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_netns()
    require_tools("ping")
    tag = new_tag("vt")
    d = tmp_path_factory.mktemp(f"{tag}-tcp")
    generate_key(d / "shared.key", randomdev="/dev/urandom")
    hook = d / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$VPND_MODE $VPND_EVENT $*" >> {d}/hooks.txt\n')
    hook.chmod(0o755)
    with namespace_pair(tag) as pair:
        pair.server.run("ip", "addr", "add", f"{BEHIND_SERVER}/24", "dev", "lo")
        yield Lab(pair, d, tag)


def _up(p) -> bool:
    return p.state() == "up"


def test_link_comes_up_pings_both_ways_reaches_route1_and_counts_exactly(lab: Lab) -> None:
    # Given a server and a client with mirrored configs
    s_conf, c_conf = lab.conf("server"), lab.conf("client")
    with (
        vpnd(lab.pair.server, s_conf, lab.dir, "server") as server,
        vpnd(lab.pair.client, c_conf, lab.dir, "client") as client,
    ):
        # When both run, the link comes up on both ends
        poll_until(lambda: _up(server) and _up(client), 20, what="link up on both ends")
        # Then exactly 5 pings cross, and both status records count them exactly
        assert lab.pair.client.ping(SERVER_TUN, count=5)

        def counted() -> bool:
            c, s = client.status(), server.status()
            return c["packets_out"] == 5 and c["packets_in"] == 5 and s["packets_in"] == 5

        poll_until(counted, 10, what="exact counters")
        c, s = client.status(), server.status()
        assert (c["bytes_out"], c["bytes_in"]) == (5 * 84, 5 * 84)
        assert (s["packets_out"], s["bytes_in"], s["bytes_out"]) == (5, 5 * 84, 5 * 84)
        assert c["peer"] == f"{lab.pair.server_ip}:24741"
        assert c["key_fingerprint"] == s["key_fingerprint"]
        # And the other way round, and to the network behind the server (route1)
        assert lab.pair.server.ping(CLIENT_TUN)
        assert "198.18.100.0/24 via 198.19.0.1" in lab.pair.client.routes()
        assert lab.pair.client.ping(BEHIND_SERVER)
        # And the hooks ran with the interface name (slip*) and the link facts (link*)
        tun = f"{lab.tag}t"
        calls = lab.hook_calls()
        assert f"server slipup {tun}" in calls
        assert f"client slipup {tun}" in calls
        assert f"client linkup {tun} {CLIENT_TUN} {SERVER_TUN} {lab.pair.server_ip}:24741" in calls
        assert any(
            c.startswith(f"server linkup {tun} {SERVER_TUN} {CLIENT_TUN} 198.18.1.2:")
            for c in calls
        )


def test_wrong_key_gives_no_link_clear_logs_and_client_retries_with_backoff(lab: Lab) -> None:
    generate_key(lab.dir / "other.key", randomdev="/dev/urandom")
    s_conf, c_conf = lab.conf("server"), lab.conf("client", key="other.key")
    with (
        vpnd(lab.pair.server, s_conf, lab.dir, "server") as server,
        vpnd(lab.pair.client, c_conf, lab.dir, "client") as client,
    ):
        poll_until(
            lambda: len(re.findall(r"retrying in", client.log())) >= 3,
            20,
            what="three client retries",
        )
        assert server.state() == "listening"
        assert client.state() == "connecting"
        assert re.search(r"handshake failed: .*key", server.log()), server.log()
        assert "wrong key" in client.log()
        delays = [float(x) for x in re.findall(r"retrying in ([0-9.]+) s", client.log())]
        assert delays[2] > delays[0], delays  # exponential backoff


def test_server_refuses_a_client_from_an_address_it_does_not_allow(lab: Lab) -> None:
    s_conf = lab.conf("server", extra="")
    s_conf.write_text(s_conf.read_text().replace("client 0 0", "client 198.18.1.99 0"))
    with (
        vpnd(lab.pair.server, s_conf, lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(
            lambda: "refused connection from 198.18.1.2" in server.log(),
            15,
            what="the refusal log line",
        )
        assert client.state() != "up"


def test_silent_underlay_cut_is_detected_by_keepalive_and_link_returns_by_itself(lab: Lab) -> None:
    timers = "keepalive 1\nnoanswer 3\n"
    with (
        vpnd(lab.pair.server, lab.conf("server", timers), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client", timers), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        # When the WAN is cut silently
        lab.pair.cut()
        import time

        cut_at = time.monotonic()
        # Then both ends declare the link dead within keepalive x noanswer (+1 interval, +1 s slack)
        poll_until(
            lambda: client.state() != "up" and server.state() != "up",
            1 * 3 + 1 + 1 + 2,
            what="link declared dead",
        )
        assert time.monotonic() - cut_at <= 1 * 3 + 1 + 1 + 2
        poll_until(
            lambda: sum("linkdown" in c for c in lab.hook_calls()) >= 2,
            10,
            what="linkdown on both ends",
        )
        # When the WAN comes back, the link comes back without restarting anything
        lab.pair.restore()
        poll_until(lambda: _up(server) and _up(client), 40, what="link back up")
        assert lab.pair.client.ping(SERVER_TUN)


def test_client_reconnects_by_itself_after_server_is_killed_and_restarted(lab: Lab) -> None:
    s_conf, c_conf = lab.conf("server"), lab.conf("client")
    with vpnd(lab.pair.client, c_conf, lab.dir, "client") as client:
        with vpnd(lab.pair.server, s_conf, lab.dir, "server1") as server:
            poll_until(lambda: _up(server) and _up(client), 20, what="link up")
            server.stop(signal.SIGKILL)
        poll_until(lambda: client.state() != "up", 10, what="client notices")
        with vpnd(lab.pair.server, s_conf, lab.dir, "server2") as server:
            poll_until(lambda: _up(server) and _up(client), 40, what="link up again")
            assert lab.pair.client.ping(SERVER_TUN)
            assert client.status()["reconnects"] >= 1


def test_twenty_megabytes_cross_the_tunnel_intact_across_a_rekey(lab: Lab) -> None:
    blob = lab.dir / "blob"
    blob.write_bytes(os.urandom(20 * 1024 * 1024))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    rekey = "keyttl 1\n"
    with (
        vpnd(lab.pair.server, lab.conf("server", rekey), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client", rekey), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")

        def rekeyed() -> None:
            # When the first 10 MB are through, wait for the session keys to be renewed; then
            # the rest goes through on the new keys, on the same inner TCP connection
            rekeys = client.status()["rekeys"]
            poll_until(lambda: client.status()["rekeys"] > rekeys, 10, what="a rekey")

        size, digest = transfer(lab.pair.server, lab.pair.client, SERVER_TUN, blob, at_half=rekeyed)
        assert size == 20 * 1024 * 1024
        assert digest == want
        assert server.status()["rekeys"] >= 1
        assert client.status()["drops"] == {}


def test_shutdown_leaves_no_process_tun_route_pidfile_or_status(lab: Lab) -> None:
    tun = f"{lab.tag}t"
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        assert (lab.dir / "client.pid").exists()
        assert lab.pair.client.link_exists(tun)
        assert client.stop() == 0
        assert server.stop() == 0
    for ns in (lab.pair.server, lab.pair.client):
        assert not ns.link_exists(tun)
        assert "198.18.100.0/24" not in ns.routes()
    for role in ("server", "client"):
        assert not (lab.dir / f"{role}.pid").exists()
        assert not (lab.dir / f"{role}.status.json").exists()
    events = sorted(c.split()[0] + " " + c.split()[1] for c in lab.hook_calls())
    assert events == sorted(
        f"{r} {e}"
        for r in ("client", "server")
        for e in ("slipup", "linkup", "linkdown", "slipdown")
    )
    with pytest.raises(ProcessLookupError):
        os.kill(client.pid, 0)


def test_daemon_mode_detaches_writes_pidfile_reloads_on_sighup_and_stops_on_sigterm(
    lab: Lab,
) -> None:
    s_conf = lab.conf("server")
    pidfile = lab.dir / "server.pid"
    logfile = lab.dir / "server.log"  # no syslog here: the daemon logs beside its status file
    # When started with --daemon, vpnd returns only once the daemon is serving
    proc = lab.pair.server.run(sys.executable, "-m", "vpnd_runtime", "-f", str(s_conf), "--daemon")
    assert proc.returncode == 0, proc.stderr
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own
        with vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client:
            poll_until(lambda: _up(client), 20, what="link up with the detached server")
            # A SIGHUP with an unchanged file changes nothing
            os.kill(pid, signal.SIGHUP)
            poll_until(lambda: "configuration unchanged" in _read(logfile), 15, what="reload log")
            # A broken file is refused and the running link kept
            good = s_conf.read_text()
            s_conf.write_text(good + "keepaliv 5\n")
            os.kill(pid, signal.SIGHUP)
            poll_until(lambda: "not reloaded" in _read(logfile), 15, what="refused reload")
            assert "did you mean 'keepalive'" in _read(logfile)
            assert _up(client)
            # A changed file restarts the link with the new settings
            s_conf.write_text(good + "keepalive 2\n")
            os.kill(pid, signal.SIGHUP)
            poll_until(lambda: "configuration changed" in _read(logfile), 15, what="reload")
            poll_until(
                lambda: _up(client) and client.status()["reconnects"] >= 1,
                30,
                what="link back after reload",
            )
        # A second daemon on the same pidfile refuses to start
        again = lab.pair.server.run(
            sys.executable, "-m", "vpnd_runtime", "-f", str(s_conf), "--daemon", check=False
        )
        assert again.returncode != 0
        assert "already running" in again.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    poll_until(lambda: not pidfile.exists(), 10, what="pidfile removed on SIGTERM")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_autoroute_pins_the_carrier_route_while_up_and_removes_it_after(lab: Lab) -> None:
    with vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server:
        with vpnd(lab.pair.client, lab.conf("client", "autoroute\n"), lab.dir, "client") as c:
            poll_until(lambda: _up(server) and _up(c), 20, what="link up")
            assert f"198.18.1.1 dev {lab.pair.client_if}" in lab.pair.client.routes()
            assert "carrier route pinned" in c.log()
        assert f"198.18.1.1 dev {lab.pair.client_if}" not in lab.pair.client.routes()


def test_a_deleted_tun_takes_the_link_down_and_it_comes_back_by_itself(lab: Lab) -> None:
    tun = f"{lab.tag}t"
    with (
        vpnd(lab.pair.server, lab.conf("server"), lab.dir, "server") as server,
        vpnd(lab.pair.client, lab.conf("client"), lab.dir, "client") as client,
    ):
        poll_until(lambda: _up(server) and _up(client), 20, what="link up")
        # When someone deletes the client's interface under the running daemon
        lab.pair.client.run("ip", "link", "del", tun)
        # Then the client notices, tears the link down and builds it again
        poll_until(lambda: f"TUN {tun} lost" in client.log(), 10, what="TUN loss noticed")
        poll_until(lambda: _up(server) and _up(client), 30, what="link back up")
        assert lab.pair.client.ping(SERVER_TUN)
