"""The protocol core in datagram mode (UDP): lost handshake messages, reordering across a rekey,
replays, and answers never larger than what they answer."""

from __future__ import annotations

import os
import random

import pytest

from vpnd_runtime.proto.connection import Connection, Params
from vpnd_runtime.proto.events import LinkUp, Packets

PSK = bytes(range(32))
WALL = 1_700_000_000.0
P = Params(datagram=True, keepalive=2.0, keyttl=3.0)


def pair(params: Params = P) -> tuple[Connection, Connection]:
    i = Connection("initiator", PSK, params, os.urandom, 0.0, wall=WALL, index=0x1111)
    r = Connection("responder", PSK, params, os.urandom, 0.0, wall=WALL, index=0x2222)
    return i, r


def deliver(src: Connection, dst: Connection, now: float, keep=lambda d: True) -> list:
    """Move src's queued datagrams to dst (index stripped, as the daemon does)."""
    grams = [d for d in src.datagrams_to_send() if keep(d)]
    for d in grams:
        assert int.from_bytes(d[:4], "big") in (0, dst.index)
    return dst.receive_datagrams([d[4:] for d in grams], now)


def test_handshake_sizes_and_indexes() -> None:
    i, r = pair()
    i.start(0.0)
    (m1,) = i.datagrams_to_send()
    assert len(m1) == 87 and m1[:4] == bytes(4) and m1[-4:] == (0x1111).to_bytes(4, "big")
    r.receive_datagrams([m1[4:]], 0.0)
    (m2,) = r.datagrams_to_send()
    assert len(m2) == 57 < len(m1)  # never amplifies
    assert m2[:4] == (0x1111).to_bytes(4, "big") and m2[-4:] == (0x2222).to_bytes(4, "big")


def test_lost_message1_and_message2_are_made_good_by_fresh_retransmissions() -> None:
    i, r = pair()
    i.start(0.0)
    i.datagrams_to_send()  # message 1 lost
    assert i.next_deadline() == 1.0
    i.tick(1.0)
    first_retry = i.datagrams_to_send()
    r.receive_datagrams([first_retry[0][4:]], 1.0)
    r.datagrams_to_send()  # message 2 lost
    i.tick(3.0)  # backoff: 1 s, then 2 s
    (retry2,) = i.datagrams_to_send()
    assert retry2 != first_retry[0]  # a fresh message 1 (new key and timestamp)
    r2 = Connection("responder", PSK, P, os.urandom, 3.0, wall=WALL + 3, index=0x3333,
                    replay_guard=r._guard)  # fmt: skip  # the same process's guard
    r2.receive_datagrams([retry2[4:]], 3.0)
    events = deliver(r2, i, 3.0)
    assert any(isinstance(e, LinkUp) for e in events)
    # the CONFIRM is lost too: the initiator's quick ping (1 s) confirms the session
    i.datagrams_to_send()
    i.tick(4.0)
    assert any(isinstance(e, LinkUp) for e in deliver(i, r2, 4.0))


def test_a_stale_message2_does_not_spoil_the_current_handshake() -> None:
    i, r = pair()
    i.start(0.0)
    (old,) = i.datagrams_to_send()
    r.receive_datagrams([old[4:]], 0.0)
    (stale_answer,) = r.datagrams_to_send()
    i.tick(1.0)  # retransmits: the answer to the old message 1 is now stale
    (fresh,) = i.datagrams_to_send()
    assert i.receive_datagrams([stale_answer[4:]], 1.0) == []
    assert i.stats.drops.get("bad_handshake") == 1
    r2 = Connection("responder", PSK, P, os.urandom, 1.0, wall=WALL + 1, index=0x4444)
    r2.receive_datagrams([fresh[4:]], 1.0)
    assert any(isinstance(e, LinkUp) for e in deliver(r2, i, 1.0))


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_reordering_loss_and_rekeys_lose_no_delivered_packet_and_replays_are_counted(
    loss: float,
) -> None:
    i, r = pair()
    i.start(0.0)
    deliver(i, r, 0.0)
    deliver(r, i, 0.0)
    deliver(i, r, 0.0)
    rng = random.Random(5)
    sent, got, replayed = set(), [], 0
    now = 0.0
    held: list[bytes] = []
    for n in range(3000):
        now += 0.005
        pkt = n.to_bytes(4, "big") * 10
        i.send_packets([pkt], now)
        sent.add(pkt)
        for src, dst in ((i, r), (r, i)):
            src.tick(now)
            grams = src.datagrams_to_send()
            if src is i:
                grams = held + grams
                rng.shuffle(grams)
                held, grams = grams[:3], grams[3:]  # a few always arrive late (reordered)
                if n % 97 == 0 and grams:
                    grams.append(grams[0])  # a duplicate on the wire
                    replayed += 1
            grams = [g for g in grams if rng.random() >= loss]
            for e in dst.receive_datagrams([g[4:] for g in grams], now):
                if isinstance(e, Packets) and dst is r:
                    got.extend(e.packets)
    assert i.stats.rekeys >= 4 and r.stats.rekeys >= 4
    assert len(got) == len(set(got))  # nothing accepted twice
    assert set(got) <= sent
    if loss:
        assert len(got) > 0.9 * len(sent)
    else:  # reordered across four rekeys and more: every packet but the 3 still held arrives
        assert len(got) == len(sent) - len(held)
    assert r.stats.drops.get("replay", 0) >= 1
    assert i.state.value == r.state.value == "established"
