"""The TCP carrier's pure parts and socket options (loopback only, no traffic sent)."""

from __future__ import annotations

import socket

import pytest

from vpnd_runtime.io import tcp


@pytest.mark.parametrize(
    ("ipopts", "tos"),
    [(0, 0x00), (1, 0x04), (2, 0x08), (4, 0x10), (8, 0x20), (6, 0x18), (15, 0x3C)],
)
def test_ipopts_sum_maps_to_the_tos_bits_it_names(ipopts: int, tos: int) -> None:
    assert tcp.ipopts_to_tos(ipopts) == tos


def test_ipopts_outside_0_to_15_is_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.15"):
        tcp.ipopts_to_tos(16)


def test_listening_socket_carries_the_configured_tos() -> None:
    sock = tcp.listen("127.0.0.1", 0, tos=tcp.ipopts_to_tos(4))
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0x10
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("peer", "host", "port", "allowed"),
    [
        (("198.18.1.2", 40000), "0.0.0.0", 0, True),
        (("198.18.1.2", 40000), "0", 0, True),
        (("198.18.1.2", 40000), "198.18.1.2", 0, True),
        (("198.18.1.3", 40000), "198.18.1.2", 0, False),
        (("198.18.1.2", 40000), "0.0.0.0", 40000, True),
        (("198.18.1.2", 40001), "0.0.0.0", 40000, False),
        (("198.18.1.2", 40000), "198.18.1.2", 40000, True),
    ],
)
def test_client_filter_accepts_only_the_configured_address_and_port(
    peer: tuple[str, int], host: str, port: int, allowed: bool
) -> None:
    assert tcp.client_allowed(peer, host, port) is allowed


def test_carrier_queues_what_the_kernel_does_not_take_and_flushes_it_later() -> None:
    listener = tcp.listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    listener.setblocking(True)
    server, _ = listener.accept()
    listener.close()
    carrier = tcp.TcpCarrier(client, f"127.0.0.1:{port}")
    big = b"x" * (16 * 1024 * 1024)
    carrier.write(big)
    assert carrier.pending  # more than the socket buffers hold
    received = bytearray()
    server.settimeout(5)
    while len(received) < len(big):
        received += server.recv(1 << 20)
        carrier.flush()
    assert received == big
    assert not carrier.pending
    carrier.close()
    server.close()


def _pair() -> tuple[tcp.TcpCarrier, socket.socket]:
    listener = tcp.listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    listener.setblocking(True)
    server, _ = listener.accept()
    listener.close()
    return tcp.TcpCarrier(client, f"127.0.0.1:{port}"), server


def test_writes_keep_their_order_whether_sent_at_once_or_queued() -> None:
    """`write` sends straight to the kernel only while nothing is queued (issue 15's short
    path): small writes behind a queued big one wait their turn, byte order never changes."""
    carrier, server = _pair()
    parts = [b"a" * 100, b"b" * (8 << 20), b"c" * 100, b"d" * 5000, b"e"]
    for part in parts:
        carrier.write(part)
    want = b"".join(parts)
    received = bytearray()
    server.settimeout(5)
    while len(received) < len(want):
        received += server.recv(1 << 20)
        carrier.flush()
    assert received == want
    assert not carrier.pending
    carrier.close()
    server.close()
