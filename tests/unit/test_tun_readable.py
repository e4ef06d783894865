"""Tun.readable: the daemon's TUN reader stops after a lone packet when it says False, so it
must say True exactly while a packet waits (here on a pipe, which polls like the TUN fd)."""

from __future__ import annotations

import os

from vpnd_runtime.io.tun import Tun


def test_readable_says_whether_a_packet_waits():
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        tun = Tun(name="t", fd=r)
        assert tun.readable() is False
        os.write(w, b"\x45" * 84)
        assert tun.readable() is True
        assert tun.readable() is True  # asking does not consume
        assert os.read(r, 65535) == b"\x45" * 84
        assert tun.readable() is False
    finally:
        os.close(r)
        os.close(w)
