"""The UDP carrier: a non-blocking datagram socket, with the kernel's UDP GSO and GRO if present.

Contract (what the daemon relies on):
- `UdpEndpoint(bind, tos)` opens and binds the socket. It switches on UDP_GRO (receive) and checks
  UDP_SEGMENT (send) with a setsockopt try each; a kernel without them (before 4.18 / 5.0) gives
  ENOPROTOOPT and the endpoint falls back to one system call per datagram (`gso`/`gro` say which).
- `send(datagrams, addr)`: one `sendmsg` per run of equal-sized datagrams (the last of a run may be
  shorter, as GSO requires), at most `GSO_MAX_SEGMENTS` datagrams and `GSO_MAX_BYTES` per call, so
  the segments of one 64 KiB TUN super-packet leave in one call. What the kernel refuses for now
  (EAGAIN) is queued; `pending` says so and `flush()` retries when the socket is writable (the
  daemon pauses the TUN meanwhile, as for TCP). A GSO send the kernel rejects with EINVAL/EIO
  (segment size above the route's MTU, a device without checksum offload) is resent one datagram
  per call and GSO is switched off for the endpoint.
- `receive(limit)`: up to `limit` reads; each returns `(source, [datagram, ...])`: with GRO one read
  returns a super-datagram of equal-sized segments from one source, cut here at the size the
  kernel reports in its UDP_GRO control message. Datagrams are zero-copy memoryviews.
- Both families: the socket's family follows the bind address, or the peer's for a client
  (`peer=`); "any" (0.0.0.0) on a server is a dual-stack `::` socket (IPv6-only off; AF_INET
  when the host has no IPv6). IPv4 sources arriving there as ::ffff:a.b.c.d are reported as plain
  a.b.c.d, and sends to plain IPv4 addresses are mapped back. `tos` is IPV6_TCLASS (and IP_TOS)
  on an AF_INET6 socket. A GSO send stays under the IPv6 length limit on such a socket.
- `UdpLink` is a session's view of an endpoint: the peer's address (changed by roaming) and the
  `Carrier` attributes the daemon reads (`peer`, `fileno`, `pending`, `flush`, `close`). A client
  owns its endpoint (closing the link closes the socket); a server's sessions share one.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections import deque

from vpnd_runtime.io.tcp import any_socket

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
#: Most datagrams per GSO send (the kernel's UDP_MAX_SEGMENTS was 64 until 5.x).
GSO_MAX_SEGMENTS = 64
#: Most bytes per GSO send: the UDP length field (65,535) minus the UDP and IPv4 headers.
GSO_MAX_BYTES = 65535 - 8 - 20
#: The same under an IPv6 header.
GSO_MAX_BYTES6 = 65535 - 8 - 40
#: One read: a GRO super-datagram is at most 64 KiB.
RECV_SIZE = 65535
#: Socket buffers asked for (SO_*BUFFORCE as root, else capped by net.core.[rw]mem_max).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Socket reads per readable event (each up to a 64 KiB GRO super-datagram).
UDP_READS = 16
_CMSG_SPACE = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")

Address = tuple[str, int]


def _bufsize(sock: socket.socket, force: int, plain: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


class UdpEndpoint:
    """A bound, non-blocking UDP socket with GSO/GRO when the kernel has them."""

    def __init__(self, bind: Address, tos: int = 0, peer: Address | None = None) -> None:
        host, port = bind
        if peer is not None:  # a client: the server's family
            six = ":" in peer[0]
            if host in ("0.0.0.0", "0"):
                host = "::" if six else "0.0.0.0"
            elif (":" in host) != six:
                raise OSError(
                    errno.EAFNOSUPPORT,
                    f"client address {host} and server {peer[0]} are of different families",
                )
            sock = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
        elif host in ("0.0.0.0", "0"):  # a server on any: both families on one socket
            sock, host = any_socket(socket.SOCK_DGRAM)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if tos:
                if sock.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            _bufsize(sock, 32, socket.SO_SNDBUF)  # SO_SNDBUFFORCE
            _bufsize(sock, 33, socket.SO_RCVBUF)  # SO_RCVBUFFORCE
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.v6 = sock.family == socket.AF_INET6
        self.gso_max = GSO_MAX_BYTES6 if self.v6 else GSO_MAX_BYTES
        self.gso = self._try(UDP_SEGMENT, 0)
        self.gro = self._try(UDP_GRO, 1)
        self._queue: deque[tuple[list[bytes], Address]] = deque()
        #: Datagrams and system calls, for the status record and the benchmark.
        self.sent = 0
        self.send_calls = 0
        self.received = 0
        self.recv_calls = 0

    def _try(self, option: int, value: int) -> bool:
        try:
            self.sock.setsockopt(SOL_UDP, option, value)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        """The socket's fd, for the selector."""
        return self.sock.fileno()

    @property
    def local(self) -> Address:
        """The bound address (port chosen by the kernel when 0 was asked)."""
        host, port = self.sock.getsockname()[:2]
        return _plain(host), port

    @property
    def pending(self) -> bool:
        """True while datagrams wait for the kernel to take them."""
        return bool(self._queue)

    def send(self, datagrams: list[bytes], addr: Address) -> None:
        """Send `datagrams` to `addr` (queued behind what is still pending)."""
        if not datagrams:
            return
        if self._queue:
            self._queue.append((datagrams, addr))
            self.flush()
            return
        rest = self._send_now(datagrams, addr)
        if rest:
            self._queue.append((rest, addr))

    def flush(self) -> bool:
        """Send what is queued; True when nothing is left."""
        q = self._queue
        while q:
            datagrams, addr = q[0]
            rest = self._send_now(datagrams, addr)
            if rest:
                q[0] = (rest, addr)
                return False
            q.popleft()
        return True

    def _send_now(self, datagrams: list[bytes], addr: Address) -> list[bytes]:
        """Send as much as the kernel takes; return the datagrams left over (EAGAIN)."""
        sock = self.sock
        if self.v6 and ":" not in addr[0]:
            addr = (f"::ffff:{addr[0]}", addr[1])  # an IPv4 peer of a dual-stack socket
        i = 0
        n = len(datagrams)
        lens = list(map(len, datagrams))
        while i < n:
            first = datagrams[i]
            size = lens[i]
            j = i + 1
            if self.gso and size:
                # The usual run (the segments of one super-packet): as many equal-sized datagrams
                # as one call may carry, then at most one shorter; recognised by one C-level
                # count. Anything else takes the loop below, which gives the same runs.
                k = min(n - i, GSO_MAX_SEGMENTS, self.gso_max // size)
                if k > 1 and lens[i : i + k].count(size) == k:
                    j = i + k
                    if (
                        j < n
                        and k < GSO_MAX_SEGMENTS
                        and lens[j] < size
                        and k * size + lens[j] <= self.gso_max
                    ):
                        j += 1
            if self.gso and j == i + 1:
                total = size
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    m = lens[j]
                    if m > size or total + m > self.gso_max:
                        break
                    total += m
                    j += 1
                    if m < size:
                        break  # only the last segment may be shorter
            try:
                if j - i > 1:
                    try:
                        sock.sendmsg(
                            datagrams[i:j], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr
                        )
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.EIO, errno.EMSGSIZE):
                            raise
                        self.gso = False  # the route or device cannot take it: one by one
                        continue
                else:
                    sock.sendto(first, addr)
            except (BlockingIOError, InterruptedError):
                return datagrams[i:]
            except OSError as exc:
                if exc.errno in (errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                 errno.ENETUNREACH, errno.EPERM):  # fmt: skip
                    # Transient or the path is gone: a datagram is lost, as on the wire.
                    i = j
                    continue
                raise
            self.send_calls += 1
            self.sent += j - i
            i = j
        return []

    def receive(self, limit: int = 64) -> list[tuple[Address, list[memoryview]]]:
        """Read up to `limit` times without blocking; see the module docstring."""
        out: list[tuple[Address, list[memoryview]]] = []
        sock = self.sock
        gro = self.gro
        for _ in range(limit):
            try:
                if gro:
                    data, anc, _, addr = sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
                else:
                    data, addr = sock.recvfrom(RECV_SIZE)
                    anc = ()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error queued on the socket: not a datagram
                raise
            self.recv_calls += 1
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    (seg,) = _INT.unpack_from(value)
            view = memoryview(data)
            n = len(data)
            parts = [view[k : k + seg] for k in range(0, n, seg)] if seg and n > seg else [view]
            self.received += len(parts)
            host = addr[0]
            if self.v6 and host.startswith("::ffff:") and "." in host:
                host = host[7:]
            out.append(((host, addr[1]), parts))
        return out

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._queue.clear()
        with contextlib.suppress(OSError):
            self.sock.close()


class UdpLink:
    """One session's view of a UDP endpoint: where its peer is now (see the module docstring)."""

    def __init__(self, endpoint: UdpEndpoint, addr: Address, owned: bool) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.owned = owned
        self.peer = _text(addr)

    def move(self, addr: Address) -> None:
        """The peer was heard, authenticated, from a new address: send there from now on."""
        self.addr = addr
        self.peer = _text(addr)

    def fileno(self) -> int:
        return self.endpoint.fileno()

    def send(self, datagrams: list[bytes]) -> None:
        self.endpoint.send(datagrams, self.addr)

    def write(self, data: bytes) -> None:  # the Carrier interface; datagrams go through send()
        raise TypeError("a UDP link sends datagrams (UdpLink.send), not a byte stream")

    def flush(self) -> bool:
        return self.endpoint.flush()

    @property
    def pending(self) -> bool:
        return self.endpoint.pending

    def close(self) -> None:
        if self.owned:
            self.endpoint.close()


def _plain(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _text(addr: Address) -> str:
    """`host:port`, `[v6]:port` for IPv6."""
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
