"""The daemon's loop on a lone packet and on bursts (issue 15).

Two real `Daemon`s of a point-to-point TCP link run their real loop turns on real fds in this
process (bench/lone_path.py: a loopback TCP carrier, each TUN one end of a SOCK_SEQPACKET pair
the test holds). Lone packets take the short path (`_send_lone`, `receive_packets`), bursts the
general one; whichever path, every packet arrives once, in order, and the counters (status,
peer, protocol) say exactly what was sent and received.
"""

from __future__ import annotations

import select
import socket
from pathlib import Path

import pytest

from bench.lone_path import HDR, _link
from vpnd_runtime.daemon import Daemon
from vpnd_runtime.io import poller


def _ready(d: Daemon) -> bool:
    return bool(select.select([d.sel.epoll.fileno()], [], [], 0)[0])


def _pump(c: Daemon, s: Daemon, tun: socket.socket, want: int) -> list[bytes]:
    """Run whichever daemon has work until `want` packets came out of `tun` (the far TUN)."""
    got: list[bytes] = []
    tun.setblocking(False)
    for _ in range(10_000):
        for d in (c, s):
            if _ready(d):
                d._turn()
        while True:
            try:
                got.append(tun.recv(70000))
            except BlockingIOError:
                break
        if len(got) >= want:
            return got
        select.select([c.sel.epoll.fileno(), s.sel.epoll.fileno()], [], [], 0.05)
    raise AssertionError(f"only {len(got)} of {want} packets arrived")


def test_lone_packets_and_bursts_arrive_in_order_with_exact_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poller, "_epoll", poller._epoll)  # _link wraps it: restored after
    c, s, ctun, stun = _link("chacha20-poly1305", tmp_path)
    try:
        sent_c: list[bytes] = []
        sent_s: list[bytes] = []
        n = 0
        for burst in (1, 1, 5, 1, 40, 1, 3, 1, 1, 70):
            for tun, sent, (src, dst) in ((ctun, sent_c, (c, s)), (stun, sent_s, (s, c))):
                packets = []
                for _ in range(burst):
                    n += 1
                    size = 20 + (n * 37) % 1400
                    packets.append(HDR + bytes([0x45]) + n.to_bytes(4, "big") * (size // 4))
                for p in packets:
                    tun.send(p)  # a burst waits in the TUN: one turn reads it as a batch
                sent.extend(packets)
                far = stun if tun is ctun else ctun
                got = _pump(src, dst, far, len(packets))
                assert got == packets
        for d, out, inn in ((c, sent_c, sent_s), (s, sent_s, sent_c)):
            ip_out = sum(len(p) - len(HDR) for p in out)
            ip_in = sum(len(p) - len(HDR) for p in inn)
            assert (d.status.packets_out, d.status.bytes_out) == (len(out), ip_out)
            assert (d.peer.packets_out, d.peer.bytes_out) == (len(out), ip_out)
            assert (d.peer.packets_in, d.peer.bytes_in) == (len(inn), ip_in)
            assert d.link.packets_bytes_in == (len(inn), ip_in)
            stats = d.peer.session.conn.stats
            assert (stats.packets_out, stats.packets_in) == (len(out), len(inn))
            assert stats.bytes_out == sum(map(len, out)) and stats.bytes_in == sum(map(len, inn))
            assert not d.status.drops.get("link_down")
    finally:
        for d in (c, s):
            if d.link.writer is not None:
                d.link.writer.close()
            d.sel.close()
