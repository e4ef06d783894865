"""io/udp.py over loopback: GSO runs arrive as the datagrams they were, with and without the
kernel's offloads (the fallback a kernel without UDP_SEGMENT / UDP_GRO takes)."""

from __future__ import annotations

import os

import pytest

from tests.helpers.wait import poll_until
from vpnd_runtime.io.udp import UdpEndpoint


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
