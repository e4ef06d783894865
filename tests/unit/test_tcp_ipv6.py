"""The TCP carrier over IPv6, on loopback only: families follow the address, `server 0` is
dual-stack, IPv4 peers of a dual-stack socket come out as plain IPv4, ipopts is the traffic
class, and the client filter compares across spellings."""

from __future__ import annotations

import socket

import pytest

from vpnd_runtime.io import tcp


def _accept(listener: socket.socket) -> tuple[socket.socket, tuple]:
    listener.setblocking(True)
    listener.settimeout(5)
    return listener.accept()


def test_an_ipv6_listener_and_connect_with_the_traffic_class_of_ipopts() -> None:
    tos = tcp.ipopts_to_tos(4)
    listener = tcp.listen("::1", 0, tos)
    try:
        assert listener.family == socket.AF_INET6
        port = listener.getsockname()[1]
        client = tcp.start_connect(("::1", port), ("0.0.0.0", 0), tos)
        try:
            assert client.family == socket.AF_INET6
            assert client.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 0x10
            conn, addr = _accept(listener)
            conn.close()
            assert tcp.peer_address(addr)[0] == "::1"
            assert tcp.endpoint_text("::1", port) == f"[::1]:{port}"
        finally:
            client.close()
    finally:
        listener.close()


def test_listening_on_any_takes_ipv4_and_ipv6_clients_and_shows_ipv4_plainly() -> None:
    listener = tcp.listen("0.0.0.0", 0)
    try:
        if listener.family != socket.AF_INET6:
            pytest.skip("no IPv6 on this host: the listener fell back to IPv4")
        port = listener.getsockname()[1]
        for host in ("127.0.0.1", "::1"):
            client = socket.create_connection((host, port), timeout=5)
            conn, addr = _accept(listener)
            assert tcp.peer_address(addr)[0] == host
            assert tcp.client_allowed(tcp.peer_address(addr), host, 0)
            conn.close()
            client.close()
    finally:
        listener.close()


def test_client_filter_across_families_and_spellings() -> None:
    assert tcp.client_allowed(("::ffff:198.18.1.2", 4000), "198.18.1.2", 0)
    assert tcp.client_allowed(("2001:db8:1::2", 4000), "2001:db8:1:0::2", 4000)
    assert not tcp.client_allowed(("2001:db8:1::3", 4000), "2001:db8:1::2", 0)
    assert not tcp.client_allowed(("198.18.1.2", 4000), "2001:db8:1::2", 0)
    assert tcp.client_allowed(("2001:db8:1::9", 1), "0.0.0.0", 0)


def test_a_client_address_of_the_other_family_is_a_clear_error() -> None:
    with pytest.raises(OSError, match="different families"):
        tcp.start_connect(("::1", 9), ("127.0.0.1", 0))
