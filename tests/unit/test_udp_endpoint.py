"""io/udp.py over loopback: GSO runs arrive as the datagrams they were, with and without the
kernel's offloads (the fallback a kernel without UDP_SEGMENT / UDP_GRO takes)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.wait import poll_until
from vpnd_runtime.io.udp import GSO_MAX_SEGMENTS, UdpEndpoint


@pytest.mark.parametrize("offload", [True, False])
def test_datagrams_arrive_whole_and_in_order(offload: bool) -> None:
    a = UdpEndpoint(("127.0.0.1", 0))
    b = UdpEndpoint(("127.0.0.1", 0))
    try:
        if not offload:
            a.gso = b.gso = False
            b.gro = False
        grams = [os.urandom(1400) for _ in range(40)] + [os.urandom(300)] + [os.urandom(90)] * 3
        a.send(grams, b.local)
        got: list[bytes] = []

        def drained() -> bool:
            for source, parts in b.receive():
                assert source == a.local
                got.extend(bytes(p) for p in parts)
            return len(got) >= len(grams)

        poll_until(drained, 5, what="all datagrams")
        assert got == grams
        assert a.sent == len(grams)
        if offload and a.gso:
            assert a.send_calls < len(grams)  # runs of equal size went out together
        else:
            assert a.send_calls == len(grams)
    finally:
        a.close()
        b.close()


def _reference_runs(lens: list[int], gso_max: int) -> list[int]:
    """The run lengths of the first `_send_now`: equal-sized datagrams, the last may be shorter,
    at most GSO_MAX_SEGMENTS and `gso_max` bytes per call."""
    runs, i, n = [], 0, len(lens)
    while i < n:
        size, j, total = lens[i], i + 1, lens[i]
        while j < n and j - i < GSO_MAX_SEGMENTS:
            m = lens[j]
            if m > size or total + m > gso_max:
                break
            total += m
            j += 1
            if m < size:
                break
        runs.append(j - i)
        i = j
    return runs


class _Recorder:
    """A socket stand-in that takes everything and remembers how many datagrams per call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def sendmsg(self, buffers: list[bytes], *_: object) -> int:
        self.calls.append(len(buffers))
        return sum(map(len, buffers))

    def sendto(self, data: bytes, _addr: object) -> int:
        self.calls.append(1)
        return len(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(1449), st.integers(1, 1500), st.just(20000), st.just(40000)),
        max_size=200,
    )
)
def test_gso_runs_are_those_of_the_plain_loop(lens: list[int]) -> None:
    ep = UdpEndpoint(("127.0.0.1", 0))
    try:
        ep.gso = True
        ep.sock.close()
        ep.sock = _Recorder()  # type: ignore[assignment]
        assert ep._send_now([bytes(n) for n in lens], ("127.0.0.1", 9)) == []
        assert ep.sock.calls == _reference_runs(lens, ep.gso_max)
        assert ep.sent == len(lens)
    finally:
        ep._queue.clear()
