"""The TCP carrier: listener, connector and a non-blocking byte pipe with an output queue.

A `Carrier` is the small interface the daemon drives from its selector loop (serial lines provide
the same one): `fileno()`, `read()` (b"" at EOF; BlockingIOError when nothing is there),
`write(data)` (queues and sends what the kernel takes now), `flush()` (sends more; True when
nothing is left queued), `pending`, `close()`, and `peer` (a printable address).
The output queue is what gives back-pressure: while it is non-empty the daemon stops reading the
TUN, so a slow carrier makes the kernel drop at the TUN queue instead of vpnd buffering without end.

Both families: the socket's family follows the address (IPv6 literals open AF_INET6 sockets and
`ipopts` becomes the IPv6 traffic class). A server on "any" (0.0.0.0) listens on `::` with
IPV6_V6ONLY off, so IPv4 and IPv6 clients reach one socket (IPv4 ones arrive as ::ffff:a.b.c.d and
are shown, filtered and counted as plain IPv4: `peer_address`); without IPv6 it falls back to
AF_INET. Printable endpoints are `host:port`, `[v6]:port` for IPv6 (`endpoint_text`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections import deque
from typing import Protocol

#: recv() size: large enough for several 64 KiB frames per system call.
RECV_SIZE = 256 * 1024

#: ipopts bits (vpnd's sum of 1, 2, 4, 8) -> the IPv4 TOS bits they stand for.
_TOS_BITS = {1: 0x04, 2: 0x08, 4: 0x10, 8: 0x20}  # reliability, throughput, lowdelay, priority


def ipopts_to_tos(ipopts: int) -> int:
    """Translate vpnd's `ipopts` sum into the IP TOS byte of the carrier socket."""
    if not 0 <= ipopts <= 15:
        raise ValueError(f"ipopts must be 0..15, got {ipopts}")
    return sum(tos for bit, tos in _TOS_BITS.items() if ipopts & bit)


class Carrier(Protocol):
    """What the daemon needs from a transport (TCP socket or serial line)."""

    peer: str

    def fileno(self) -> int: ...
    def read(self) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def flush(self) -> bool: ...
    @property
    def pending(self) -> bool: ...
    def close(self) -> None: ...


class TcpCarrier:
    """A connected, non-blocking TCP socket with an output queue."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self._out: deque[memoryview] = deque()

    def fileno(self) -> int:
        """The socket's fd, for the selector."""
        return self.sock.fileno()

    def read(self) -> bytes:
        """Bytes available now; b"" means the peer closed the connection."""
        return self.sock.recv(RECV_SIZE)

    def write(self, data: bytes) -> None:
        """Queue `data` and push as much as the kernel accepts now."""
        if not data:
            return
        out = self._out
        if not out:  # nothing queued (the rule): straight to the kernel, the rest queued
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n < len(data):
                out.append(memoryview(data)[n:])
            return
        out.append(memoryview(data))
        self.flush()

    def flush(self) -> bool:
        """Send queued bytes until the kernel pushes back; True when the queue is empty."""
        out = self._out
        send = self.sock.send
        while out:
            head = out[0]
            try:
                n = send(head)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            if n == len(head):
                out.popleft()
            else:
                out[0] = head[n:]
                return False
        return True

    @property
    def pending(self) -> bool:
        """True while bytes wait in the output queue."""
        return bool(self._out)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._out.clear()
        with contextlib.suppress(OSError):
            self.sock.close()


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def endpoint_text(host: str, port: int) -> str:
    """`host:port`, with brackets around an IPv6 host (`[2001:db8::1]:379`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(addr: tuple) -> tuple[str, int]:  # type: ignore[type-arg]
    """(host, port) of an accepted socket's address, any family; ::ffff:a.b.c.d -> a.b.c.d."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


def _configure(sock: socket.socket, tos: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    if tos:
        if sock.family == socket.AF_INET6:
            # The traffic class byte has the TOS byte's layout; IP_TOS still marks the IPv4
            # packets of a dual-stack socket.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)


def any_socket(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, str]:
    """A socket of `kind` for "every address" and the host to bind it to: dual-stack IPv6 when
    the host has IPv6, else IPv4 (the UDP carrier's server socket too)."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:
        return socket.socket(socket.AF_INET, kind), "0.0.0.0"
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        return socket.socket(socket.AF_INET, kind), "0.0.0.0"
    return sock, "::"


def listen(host: str, port: int, tos: int = 0, backlog: int = 16) -> socket.socket:
    """A non-blocking listening socket on host:port (host '0.0.0.0' = every address of both
    families; an IPv6 literal = that IPv6 address)."""
    if host in ("0.0.0.0", "0"):
        sock, host = any_socket()
    else:
        sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _configure(sock, tos)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if host != "::" or exc.errno != errno.EADDRNOTAVAIL:
                raise
            # IPv6 switched off (disable_ipv6): every IPv4 address it is.
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _configure(sock, tos)
            sock.bind(("0.0.0.0", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def start_connect(
    server: tuple[str, int], bind: tuple[str, int] | None, tos: int = 0
) -> socket.socket:
    """Begin a non-blocking connect; when writable, the caller calls `finish_connect`.
    The socket's family is the server address's; `bind` ('0.0.0.0', port) means any address."""
    family = family_of(server[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _configure(sock, tos)
        if bind and (bind[0] != "0.0.0.0" or bind[1]):
            host = bind[0]
            if host == "0.0.0.0" and family == socket.AF_INET6:
                host = "::"
            elif family_of(host) != family:
                raise OSError(
                    errno.EAFNOSUPPORT,
                    f"client address {host} and server {server[0]} are of different families",
                )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, bind[1]))
        sock.setblocking(False)
        err = sock.connect_ex(server)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(
                err, f"connect to {endpoint_text(*server)}: {errno.errorcode.get(err, err)}"
            )
    except OSError:
        sock.close()
        raise
    return sock


def finish_connect(sock: socket.socket) -> None:
    """Raise the OSError a non-blocking connect ended with, if any."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, errno.errorcode.get(err, str(err)))


def client_allowed(peer: tuple[str, int], host: str, port: int) -> bool:
    """vpnd's client filter: `host`/`port` of 0 (or 0.0.0.0) accept any address/port.
    Either family; an IPv4 client seen on a dual-stack socket as ::ffff:a.b.c.d is a.b.c.d."""
    if host not in ("0", "0.0.0.0") and _plain(peer[0]) != _plain(host):
        return False
    return not (port and peer[1] != port)


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.strip("[]"))
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
