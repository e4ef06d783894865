"""Hitless key rotation on a point-to-point link: a ping runs through every step and loses
nothing. The steps are the ones `vpnctl` drives (docs/directives.md, `nextkey`):

1. the server also accepts the new key (`nextkey NEW`), by SIGHUP: the session stays up;
2. the client switches to the new key (`keyfile NEW`, `nextkey OLD`), by SIGHUP: it opens a
   session with the new key beside the running one, which then replaces it (make before break);
3. the server retires the old key (`keyfile NEW`), and the client too: the session stays up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import fingerprint, generate_key, load_key

pytestmark = pytest.mark.root

SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
PINGS = 300  # 15 s at 20 per second: longer than the whole rotation


@pytest.fixture
def site() -> Iterator[tuple[Pair, Path, str]]:
    require_root_netns()
    require_tools("ping")
    tag = new_tag("vk")
    with tempfile.TemporaryDirectory(prefix=f"{tag}-") as d, namespace_pair(tag) as pair:
        yield pair, Path(d), tag


def _write(path: Path, role: str, tag: str, work: Path, keys: str) -> None:
    head = (
        "mode server\nserver 0 24741\nlocal 198.19.0.1\nremote 198.19.0.2\n"
        if role == "server"
        else "mode client\nserver 198.18.1.1 24741\nlocal 198.19.0.2\nremote 198.19.0.1\n"
    )
    path.write_text(
        head + keys + f"interface {tag}t\nstatusfile {work}/{role}.status.json\n"
        "randomdev /dev/urandom\nkeepalive 2\nnoanswer 3\n"
    )


def test_a_key_rotates_under_a_running_ping_and_no_reply_is_lost(
    site: tuple[Pair, Path, str],
) -> None:
    pair, work, tag = site
    old, new = work / "old.key", work / "new.key"
    generate_key(old, randomdev="/dev/urandom")
    generate_key(new, randomdev="/dev/urandom")
    fp_old, fp_new = fingerprint(load_key(old)), fingerprint(load_key(new))
    s_conf, c_conf = work / "server.conf", work / "client.conf"
    _write(s_conf, "server", tag, work, f"keyfile {old}\n")
    _write(c_conf, "client", tag, work, f"keyfile {old}\n")
    with (
        vpnd(pair.server, s_conf, work, "server") as server,
        vpnd(pair.client, c_conf, work, "client") as client,
    ):
        poll_until(lambda: client.state() == "up" and server.state() == "up", 20, what="link up")
        assert client.status()["session_key_fingerprint"] == fp_old
        started = server.status()["session_started"]
        ping = subprocess.Popen(
            pair.client.cmd("ping", "-n", "-q", "-c", str(PINGS), "-i", "0.05", SERVER_TUN),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def step(conf: Path, role: str, keys: str, pid: int) -> None:
            _write(conf, role, tag, work, keys)
            os.kill(pid, signal.SIGHUP)

        # 1. the server also accepts the new key; its session stays
        step(s_conf, "server", f"keyfile {old}\nnextkey {new}\n", server.pid)
        poll_until(
            lambda: server.status().get("next_key_fingerprint") == fp_new,
            10,
            what="server accepts the new key",
        )
        assert server.status()["session_started"] == started
        # 2. the client switches: a new session with the new key replaces the old one
        step(c_conf, "client", f"keyfile {new}\nnextkey {old}\n", client.pid)
        poll_until(
            lambda: (
                client.status().get("session_key_fingerprint") == fp_new
                and server.status().get("session_key_fingerprint") == fp_new
            ),
            15,
            what="both ends on the new key",
        )
        # 3. the old key is retired at both ends; the session (new key) stays
        step(s_conf, "server", f"keyfile {new}\n", server.pid)
        step(c_conf, "client", f"keyfile {new}\n", client.pid)
        poll_until(
            lambda: (
                server.status()["key_fingerprint"] == fp_new
                and server.status().get("next_key_fingerprint") is None
                and client.status().get("next_key_fingerprint") is None
            ),
            10,
            what="old key retired",
        )
        assert client.state() == "up" and server.state() == "up"
        out, _ = ping.communicate(timeout=60)  # the pings outlast the rotation
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        assert (int(m.group(1)), int(m.group(2))) == (PINGS, PINGS), out
        assert "key rotated out" not in client.log() + server.log()
        assert client.status()["links_up"] == 1  # never went down: no TUN torn down
