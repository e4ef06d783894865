"""The floor bench's relay (bench/floor.py) carries real traffic between two namespaces.

The relay is the yardstick the note's latency and throughput arguments rest on, so it must keep
working: both relays come up, a ping crosses them with each cipher, and a one-second iperf3
run (TCP super-packets through the TUN offloads) completes and moves megabytes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.floor import FLOOR_SERVER, floor_pair
from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import namespace_pair, new_tag, poll_until

pytestmark = pytest.mark.root


@pytest.mark.parametrize(
    ("cipher", "design"),
    [
        ("none", "epoll"),
        ("chacha20-poly1305", "epoll"),
        ("aes-256-gcm", "epoll"),
        ("chacha20-poly1305", "threads"),
    ],
)
def test_floor_relay_carries_pings_and_a_transfer(tmp_path: Path, cipher: str, design: str) -> None:
    require_root_netns()
    require_tools("ping", "iperf3")
    with (
        namespace_pair(new_tag("vq")) as pair,
        floor_pair(pair, cipher, tmp_path / "floor.log", design),
    ):
        poll_until(lambda: pair.client.ping(FLOOR_SERVER, timeout=1), 20, what="ping via relay")
        assert pair.client.ping(FLOOR_SERVER, count=5, timeout=5)
        server = subprocess.Popen(
            pair.server.cmd("iperf3", "-s", "-B", FLOOR_SERVER),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def transfer() -> int | None:
            """Bytes the server received in a 1 s iperf3 run (None: not listening yet)."""
            proc = pair.client.run(
                "iperf3", "-c", FLOOR_SERVER, "-t", "1", "-J", check=False, timeout=60
            )
            try:
                return int(json.loads(proc.stdout)["end"]["sum_received"]["bytes"])
            except (ValueError, KeyError):
                return None

        try:
            received = poll_until(transfer, 20, interval=0.2, what="iperf3 through the relay")
        finally:
            server.kill()
            server.wait()
        assert received >= 1 << 20  # a 1 s run completed and moved megabytes, not a trickle
