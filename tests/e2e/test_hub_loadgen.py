"""The hub benchmark's load generator against a real vpnd server, in namespaces.

The generator (bench/hub_loadgen.py) plays clients with the protocol core; here it plays one,
from a source address of its /22, against an ordinary single-peer `vpnd` server, and must keep
the session alive: the server's keepalive pings are answered (the server measures an RTT and
misses none) and its own pings are answered by the server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_hub import GEN_TUNNEL_NET, HUB_PORT, add_sources, generator
from bench.hub_loadgen import key_name, tunnel_address
from tests.conftest import require_root_netns
from tests.helpers.netns import namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root


def test_generated_client_stays_up_and_answers_keepalives(tmp_path: Path) -> None:
    require_root_netns()
    keydir = tmp_path / "keys"
    keydir.mkdir()
    generate_key(keydir / key_name(0), randomdev="/dev/urandom")
    conf = tmp_path / "server.conf"
    conf.write_text(
        f"mode server\nserver 0 {HUB_PORT}\nlocal 198.19.0.1\n"
        f"remote {tunnel_address(GEN_TUNNEL_NET, 0)}\nkeyfile {keydir / key_name(0)}\n"
        f"keepalive 1\nnoanswer 3\nrandomdev /dev/urandom\n"
        f"statusfile {tmp_path}/server.status.json\n"
    )
    with namespace_pair(new_tag("vg")) as pair:
        conf.write_text(conf.read_text() + f"interface {pair.tag}t\n")
        # The generator's first source address, routed back through the client's main address.
        add_sources(pair.client, pair.client_if, pair.server, pair.client_ip, 1)
        with vpnd(pair.server, conf, tmp_path, "server") as server:
            poll_until(lambda: server.state() == "listening", 20, what="server listening")
            with generator(pair.client, pair.server_ip, keydir, 1, "--keepalive", "1") as gen:
                gen.expect("ready", 30)
                ramp = gen.expect("ramp", 60)
                assert ramp["up"] == 1, ramp
                assert ramp["failures"] == {}, ramp
                poll_until(lambda: gen.status()["keepalive_rtts"] >= 3, 20, what="3 pings answered")

                def server_measured_rtts() -> bool:
                    record = server.status()
                    return record.get("state") == "up" and record.get("last_rtt") is not None

                poll_until(server_measured_rtts, 20, what="the server's pings answered")
                record = server.status()
                assert str(record["peer"]).startswith("198.18.4.1:"), record
                assert record.get("missed_keepalives", 0) == 0, record
                status = gen.status()
                assert status["up"] == 1 and status["lost"] == {}, status
                bye = gen.stop()
        assert bye is not None and bye["up"] == 1, bye
