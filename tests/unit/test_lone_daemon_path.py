"""The daemon's loop on a lone packet and on bursts (issue 15), with and without `busypoll`.

Two real `Daemon`s of a point-to-point TCP link run their real loop turns on real fds in this
process (bench/lone_path.py: a loopback TCP carrier, each TUN one end of a SOCK_SEQPACKET pair
the test holds). Lone packets take the short path (`_send_lone`, `receive_packets`), bursts the
general one; whichever path and whatever `busypoll` says, every packet arrives once, in order,
and the counters (status, peer, protocol) say exactly what was sent and received.
"""

from __future__ import annotations

import select
import socket
from pathlib import Path

import pytest

from bench.lone_path import HDR, _link
from vpnd_runtime.config import ConfigError, parse_config
from vpnd_runtime.daemon import Daemon
from vpnd_runtime.io import poller

BASE = "mode client\nserver 198.18.0.1 379\nlocal 198.18.1.1\nremote 198.18.1.2\n"


@pytest.mark.parametrize(("text", "value"), [("", 0), ("busypoll 0", 0), ("busypoll 750", 750)])
def test_busypoll_parses_in_microseconds_and_is_off_by_default(text: str, value: int) -> None:
    config = parse_config(f"{BASE}{text}\n", "t.conf")
    assert config.busypoll == value
    assert parse_config(config.to_text(), "t.conf") == config


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("busypoll -1", "t.conf:5: busypoll: busypoll must be a whole number"),
        ("busypoll 1.5", "t.conf:5: busypoll: busypoll must be a whole number"),
        ("busypoll 100001", "t.conf:5: busypoll: busypoll must be 0..100000, got 100001"),
        ("busypoll", "t.conf:5: busypoll: wrong number of arguments (0)"),
    ],
)
def test_bad_busypoll_is_refused_with_file_and_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"{BASE}{line}\n", "t.conf")
    assert message in str(err.value)


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


@pytest.mark.parametrize("busypoll", [0, 1000])
def test_lone_packets_and_bursts_arrive_in_order_with_exact_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busypoll: int
) -> None:
    monkeypatch.setattr(poller, "_epoll", poller._epoll)  # _link wraps it: restored after
    c, s, ctun, stun = _link("chacha20-poly1305", tmp_path, f"busypoll {busypoll}\n")
    try:
        assert c._busy == s._busy == busypoll / 1e6
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
