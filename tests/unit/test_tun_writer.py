"""The TUN writer keeps packet order and exact counts whether a batch is written inline (small,
writer idle) or handed to its thread (large, or while the thread is busy)."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from vpnd_runtime.io.tun import INLINE_MAX, TunWriter

HDR = 10


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(20, 9000), min_size=1, max_size=6), min_size=1, max_size=25),
    st.lists(st.booleans(), min_size=25, max_size=25),
)
def test_order_and_counters_survive_any_mix_of_inline_and_threaded_writes(
    sizes: list[list[int]], inline: list[bool]
) -> None:
    tx, rx = _pair()
    writer = TunWriter(tx.fileno(), HDR)
    sent: list[bytes] = []
    seq = 0
    for batch_sizes, force in zip(sizes, inline):  # noqa: B905 — also runs under Python 3.9
        batch = []
        for size in batch_sizes:
            pkt = bytes(HDR) + seq.to_bytes(4, "big") + bytes(size - 4)
            seq += 1
            batch.append(pkt)
        sent += batch
        writer.put(batch, inline=force)  # inline=True: at once unless the thread has a backlog
    rx.settimeout(5)
    got = [rx.recv(65536) for _ in sent]
    writer.close()
    tx.close()
    rx.close()
    assert got == sent  # every packet, once, in order
    assert writer.packets == len(sent)
    assert writer.bytes == sum(len(p) - HDR for p in sent)
    assert writer.backlog == 0


def test_a_small_batch_on_an_idle_writer_is_written_before_put_returns() -> None:
    tx, rx = _pair()
    writer = TunWriter(tx.fileno(), HDR)
    try:
        writer.put([bytes(HDR + 84)])
        rx.setblocking(False)
        assert len(rx.recv(65536)) == HDR + 84  # no thread hand-off: already there
        assert writer.packets == 1
        big = [bytes(HDR + INLINE_MAX + 1)]
        writer.put(big)  # too big for inline: the thread writes it
        rx.settimeout(5)
        assert len(rx.recv(65536)) == HDR + INLINE_MAX + 1
    finally:
        writer.close()
        tx.close()
        rx.close()


def test_inline_puts_any_batch_on_an_idle_writer_before_returning() -> None:
    """The UDP receive path (`put(..., inline=True)`): a big batch never waits for the thread."""
    tx, rx = _pair()
    writer = TunWriter(tx.fileno(), HDR)
    try:
        big = [bytes(HDR + 60000), bytes(HDR + INLINE_MAX + 1)]
        writer.put(big, inline=True)
        rx.setblocking(False)
        assert [len(rx.recv(65536)) for _ in big] == [len(p) for p in big]
        assert writer.packets == 2 and writer.backlog == 0
    finally:
        writer.close()
        tx.close()
        rx.close()


def test_drops_are_counted_while_the_writer_runs_not_only_when_it_closes() -> None:
    # Given a TUN writer whose device stops taking packets (a full, non-blocking queue)
    tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.setblocking(False)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = TunWriter(tx.fileno(), HDR)
    try:
        # When more is written inline than it takes
        for _ in range(64):
            writer.put([bytes(HDR + 1000)], inline=True)
        # Then the live counts already say so, and equal what close() reports at the end
        live = writer.drop_counts()
        assert live.get("tun_full", 0) > 0
        assert writer.packets + live["tun_full"] == 64
    finally:
        final = writer.close()
        rx.close()
    assert final == live
