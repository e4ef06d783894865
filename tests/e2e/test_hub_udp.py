"""A hub over UDP: one socket serves several clients, told apart by the session index in every
datagram (and, for clients sharing a key, by the address they announce)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from tests.e2e.test_hub import HUB, PORT, HubLab, _all_up, _make_lab, client_addr
from tests.helpers.netns import Star, VpndProcess, poll_until, vpnd

pytestmark = pytest.mark.root


@pytest.fixture
def lab3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubLab]:
    yield from _make_lab(tmp_path_factory, 3)


def start_udp_client(lab: HubLab, i: int, key: str | None = None) -> VpndProcess:
    """Like HubLab.start_client, with `transport udp`."""
    conf = lab.dir / f"c{i}.conf"
    conf.write_text(
        textwrap.dedent(f"""\
            mode client
            server {Star.hub_ip(i)} {PORT}
            transport udp
            local {client_addr(i)}
            remote {HUB}
            keyfile {lab.dir / (key or f"c{i}.key")}
            interface {lab.tag}t
            statusfile {lab.dir}/c{i}.status.json
            randomdev /dev/urandom
            route1 198.19.1.0 255.255.255.0 {HUB}
        """)
    )
    proc = lab.stack.enter_context(vpnd(lab.star.clients[i], conf, lab.dir, f"c{i}"))
    lab.clients[i] = proc
    return proc


def test_three_udp_clients_on_one_socket_reach_the_hub_and_each_other(lab3: HubLab) -> None:
    # Given a hub over UDP; clients 1 and 2 share one key (the seed's style)
    lab3.add_peer(0)
    lab3.add_peer(1, key="shared.key")
    lab3.add_peer(2, key="shared.key")
    hub = lab3.start_hub("transport udp\n")
    start_udp_client(lab3, 0)
    start_udp_client(lab3, 1, key="shared.key")
    start_udp_client(lab3, 2, key="shared.key")
    poll_until(lambda: _all_up(lab3, [0, 1, 2]), 30, what="three UDP clients up at the hub")
    # Then each reaches the hub, the hub each, and clients each other through the hub
    for i in range(3):
        assert lab3.star.clients[i].ping(HUB), f"client {i} -> hub"
        assert lab3.star.hub.ping(client_addr(i)), f"hub -> client {i}"
    assert lab3.star.clients[1].ping(client_addr(2)), "client 1 -> client 2 (same key)"
    assert lab3.star.clients[0].ping(client_addr(1)), "client 0 -> client 1"
    # And the hub holds exactly one UDP socket for all of them
    sockets = lab3.star.hub.run("ss", "-uanH", "sport", f"= :{PORT}").stdout.splitlines()
    assert len(sockets) == 1, sockets
    status = hub.status()
    assert (status["peers_total"], status["peers_up"]) == (3, 3)
    assert lab3.hub_peer(2)["peer"].startswith(Star.client_ip(2) + ":")
    # When client 1 is removed by SIGHUP, it is cut and the others keep their sessions
    started = {i: lab3.hub_peer(i)["session_started"] for i in (0, 2)}
    (lab3.peers / "c1.peer").unlink()
    lab3.reload_hub()
    poll_until(lambda: lab3.hub_peer(1) == {}, 10, what="client 1 gone from the hub")
    assert not lab3.star.clients[1].ping(HUB, timeout=1)
    for i in (0, 2):
        assert lab3.hub_peer(i)["session_started"] == started[i]
        assert lab3.star.clients[i].ping(HUB)
