"""The TUN side of the tunnel: a point-to-point interface with the kernel's GSO offload switched on.

Contract (what the daemon relies on):
- `Tun.open(name, offload=True)` creates the interface with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`
  and `TUNSETOFFLOAD(CSUM | TSO4 | TSO6)`. Every `read()` then returns one *virtio-net header*
  (10 bytes) followed by one packet of up to ~64 KiB: a TCP super-packet the kernel did not segment.
  The far end, opened the same way, writes those bytes back unchanged; its kernel segments them and
  completes the partial checksums. Both ends must use the offload (the protocol carries the header
  opaquely), so the daemon always opens the TUN this way.
- `configure()` sets the point-to-point address (`local peer remote/32`, plus `local6 peer
  remote6/128` for a dual-stack link, given as `extra`), the MTU and brings the link up through
  rtnetlink (vpnd_runtime.io.netlink, no `ip` subprocess, no pyroute2). The
  kernel then owns the host route to `remote`; extra routes go through `add_route` (via a
  gateway, or straight out of the TUN without one) and `remove_route`/`remove_routes`.
- The fd is non-blocking: the daemon's selector loop decides when to read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Union

from vpnd_runtime.io import netlink

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

VNET_HDR_LEN = 10
#: A batch up to this many bytes, arriving while the TUN writer is idle, is written inline.
INLINE_MAX = 4096
#: One read can return a 64 KiB GSO super-packet plus its virtio header.
READ_SIZE = 65535 + VNET_HDR_LEN

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class TunError(OSError):
    """The TUN interface could not be created or configured (message names the interface)."""


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[netlink.RtNetlink]:
    """An rtnetlink socket whose failures surface as TunError saying `what` was being done."""
    try:
        with netlink.RtNetlink() as nl:
            yield nl
    except OSError as exc:
        if isinstance(exc, TunError):
            raise
        raise TunError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}") from exc


@dataclass
class Route:
    """A route through the tunnel: `network` via `gateway`, or out of the TUN itself (None)."""

    network: Network
    gateway: Address | None = None


@dataclass
class Tun:
    """An open TUN device; `fd` is non-blocking. With offload every packet read or written
    carries a `hdr_len`-byte virtio-net header (0 without offload)."""

    name: str
    fd: int
    hdr_len: int = VNET_HDR_LEN
    index: int = 0
    _routes: list[Route] = field(default_factory=list)
    _peers: frozenset[Address] = frozenset()  # the far ends `configure` gave this link
    _pinned: list[tuple[Network, int | None, Address | None]] = field(default_factory=list)
    _poller: select.poll | None = field(default=None, repr=False, compare=False)

    def readable(self) -> bool:
        """Whether a packet waits to be read now (poll, never blocks). A reader that got one
        packet asks this instead of reading until EAGAIN: the BlockingIOError of that failing
        read costs a lone packet ~30 µs more than this poll when the caches are cold (issue 15;
        bench_core's lone-packet table shows what cold caches do)."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    @classmethod
    def open(cls, name: str, offload: bool = True) -> Tun:
        """Create the interface `name`, with IFF_VNET_HDR and TSO/checksum offload if `offload`.

        Without offload (serial lines) the kernel segments to the MTU itself: a slow line must
        not be handed 64 KiB super-packets that take seconds to cross it.
        """
        if not name or len(name) > 15:
            raise TunError(errno.EINVAL, f"interface name {name!r}: 1 to 15 characters")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if offload:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN {name}: {exc.strerror}") from exc
        return cls(name=name, fd=fd, hdr_len=VNET_HDR_LEN if offload else 0)

    def configure(
        self,
        local: Address,
        remote: Address | None,
        mtu: int,
        extra: tuple[tuple[Address, Address | None], ...] = (),
    ) -> None:
        """Give the link its addresses and MTU, and bring it up: point-to-point `local` ->
        `remote`, or, for a hub (`remote` None), `local` alone (its clients get routes).
        `extra` holds further (local, remote) pairs, e.g. the IPv6 pair of a dual-stack link."""
        what = f"configuring {self.name} ({local} peer {remote or '-'}, mtu {mtu})"
        self._peers = frozenset(p for p in (remote, *(peer for _, peer in extra)) if p is not None)
        try:
            self.index = socket.if_nametoindex(self.name)
        except OSError as exc:
            raise TunError(
                errno.ENODEV, f"{what}: TUN {self.name} vanished before configuration"
            ) from exc
        with _netlink(what) as nl:
            nl.set_link(self.index, mtu=mtu)
            # IPv6 addresses go on once the link is up: one added while it is down gets, when
            # the link comes up, a prefix route for its own address instead of for its peer.
            pairs = [(local, remote), *extra]
            for address, peer in pairs:
                if address.version == 4:
                    nl.add_address(self.index, address, address.max_prefixlen, peer=peer)
            nl.set_link(self.index, up=True)
            for address, peer in pairs:
                if address.version == 6:
                    nl.add_address(self.index, address, address.max_prefixlen, peer=peer)

    def add_route(self, network: Network, gateway: Address | None = None) -> None:
        """Route `network` through the tunnel, via `gateway` or (None) straight out of the TUN.

        Remembered so `remove_route`/`remove_routes` can undo it.
        """
        # Via the far end: onlink, as it is by construction (its IPv6 route may not exist yet).
        onlink = gateway is not None and gateway in self._peers
        with _netlink(f"TUN {self.name}") as nl:
            nl.add_route(network, oif=self.index, gateway=gateway, onlink=onlink)
        self._routes.append(Route(network, gateway))

    def remove_route(self, network: Network) -> bool:
        """Remove the route to `network` this object added; False when there was none to remove
        (never added here, or the kernel already dropped it). Raises TunError otherwise."""
        mine = [r for r in self._routes if r.network == network]
        if not mine:
            return False
        route = mine[-1]
        self._routes.remove(route)
        try:
            with _netlink(f"TUN {self.name}") as nl:
                nl.del_route(network, oif=self.index, gateway=route.gateway)
        except TunError as exc:
            if exc.errno in (errno.ESRCH, errno.ENODEV):
                return False
            raise
        return True

    def pin_route(self, dst: Address) -> str | None:
        """Pin a host route to `dst` (the carrier's peer) along its current path.

        Routes through the tunnel (route1..9) may cover the server's own address; the pinned /32
        keeps the carrier's packets off the tunnel (no routing loop). Returns a description of
        the path, or None when `dst` has no route, is local, or is already pinned (nothing to
        undo).
        """
        with _netlink(f"pinning the route to {dst}") as nl:
            found = nl.get_route(dst)
            if (
                found is None
                or found.kind != netlink.RTN_UNICAST
                or found.oif in (None, self.index)
            ):
                return None
            host = ipaddress.ip_network(f"{dst}/{dst.max_prefixlen}")
            try:
                nl.add_route(host, oif=found.oif, gateway=found.gateway)
            except netlink.NetlinkError as exc:
                if exc.errno == errno.EEXIST:
                    return None
                raise
        self._pinned.append((host, found.oif, found.gateway))
        return f"{dst} via {found.gateway or 'direct'} (ifindex {found.oif})"

    def remove_routes(self) -> list[str]:
        """Remove the routes this object added; returns the problems met (never raises)."""
        problems: list[str] = []
        specs = [
            (f"route {r.network}", r.network, self.index, r.gateway) for r in reversed(self._routes)
        ] + [(f"pinned route {net}", net, oif, gw) for net, oif, gw in self._pinned]
        self._routes.clear()
        self._pinned.clear()
        if not specs:
            return problems
        try:
            with netlink.RtNetlink() as nl:
                for what, network, oif, gateway in specs:
                    try:
                        nl.del_route(network, oif=oif, gateway=gateway)
                    except netlink.NetlinkError as exc:
                        if exc.errno not in (errno.ESRCH, errno.ENODEV):
                            problems.append(f"{what}: {exc.strerror or exc}")
        except OSError as exc:
            problems.append(f"netlink: {exc}")
        return problems

    def close(self) -> None:
        """Close the fd: the kernel deletes the (non-persistent) interface and its routes."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TunWriter:
    """Writes packets to the TUN on a thread of its own.

    Writing a 64 KiB super-packet makes the kernel do the receive work (segmentation, the inner
    TCP stack, waking the application) inside our write() call, with the GIL released. On its own
    thread that work overlaps with receiving and decrypting the next frame on the loop's thread.
    The writer owns a duplicate of the TUN fd, so closing the Tun never hands a recycled fd number
    to a write still in flight. The backlog is bounded in bytes: past `max_bytes` queued, packets
    are dropped and counted, as a full NIC queue would (the inner TCP then slows down).
    """

    def __init__(self, fd: int, hdr_len: int = VNET_HDR_LEN, max_bytes: int = 2 << 20) -> None:
        self.fd = os.dup(fd)
        self.hdr_len = hdr_len
        self.max_bytes = max_bytes
        # Each thread counts on its own (no lost updates); the properties add them up. So for
        # the backlog: bytes handed to the thread, and bytes it has written.
        self._packets = self._inline_packets = 0
        self._bytes = self._inline_bytes = 0  # IP bytes, virtio headers excluded
        self._queued = self._written = 0
        self.drops: dict[str, int] = {}
        self._inline_drops: dict[str, int] = {}
        self._stop = False
        self._queue: queue.SimpleQueue[tuple[list[bytes], int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vpnd-tun-writer", daemon=True)
        self._thread.start()

    def put(self, packets: list[bytes], inline: bool = False) -> None:
        """Queue a batch for writing (never blocks).

        A small batch (pings, ACKs, a keystroke) arriving while nothing is queued or being
        written is written at once on the caller's thread instead: waking the writer thread
        costs more than the write itself, and the latency of a lone packet is what such traffic
        feels. Order is kept: only with an empty backlog, and the backlog drops only after the
        writer has written a batch.

        `inline=True` writes any batch at once the same way (the UDP carrier's receive path):
        a caller that keeps the GIL busy for milliseconds at a time (per-datagram decryption)
        starves the writer thread, which needs the GIL back after every write() and gets it
        only at the interpreter's switch interval (5 ms); its backlog then overflowed and
        dropped super-packets (measured: ~1,000 inner TCP retransmits in 5 s on a clean veth,
        none inline, for less CPU per byte)."""
        if len(packets) == 1 and self._queued == self._written:
            pkt = packets[0]  # a lone packet (issue 15): `_write_inline` without its loop
            if inline or len(pkt) <= INLINE_MAX:
                try:
                    os.write(self.fd, pkt)
                except OSError as exc:
                    reason = "tun_full" if exc.errno == errno.EAGAIN else "tun_write"
                    self._inline_drops[reason] = self._inline_drops.get(reason, 0) + 1
                    return
                self._inline_packets += 1
                self._inline_bytes += len(pkt) - self.hdr_len
                return
        size = sum(map(len, packets))
        if self._queued == self._written and (inline or size <= INLINE_MAX):
            self._write_inline(packets)
            return
        if self.backlog + size > self.max_bytes:
            self._count("tun_backlog", len(packets))
            return
        self._queued += size
        self._queue.put((packets, size))

    @property
    def backlog(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        return self._queued - self._written

    def _write_inline(self, packets: list[bytes]) -> None:
        n = nbytes = 0
        for pkt in packets:
            try:
                os.write(self.fd, pkt)
            except OSError as exc:
                reason = "tun_full" if exc.errno == errno.EAGAIN else "tun_write"
                self._inline_drops[reason] = self._inline_drops.get(reason, 0) + 1
                continue
            n += 1
            nbytes += len(pkt) - self.hdr_len
        self._inline_packets += n
        self._inline_bytes += nbytes

    @property
    def packets(self) -> int:
        """Packets written, by either thread."""
        return self._packets + self._inline_packets

    @property
    def bytes(self) -> int:
        """IP bytes written (virtio headers excluded), by either thread."""
        return self._bytes + self._inline_bytes

    def close(self, timeout: float = 2.0) -> dict[str, int]:
        """Stop the thread, dropping what is still queued (the link is going away), and close
        our fd; returns the final drop counts, read after the thread has ended."""
        self._stop = True
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self.fd)
        return self.drop_counts()

    def drop_counts(self) -> dict[str, int]:
        """Packets dropped so far, by reason, by either thread (the status shows them live)."""
        drops = dict(self.drops)  # one C-level copy: atomic against the writer thread
        for reason, n in self._inline_drops.items():
            drops[reason] = drops.get(reason, 0) + n
        return drops

    def _count(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def _run(self) -> None:
        write = os.write
        fd = self.fd
        hdr = self.hdr_len
        get = self._queue.get
        while (item := get()) is not None:
            packets, size = item
            if self._stop:
                self._written += size
                continue
            n = nbytes = 0
            for pkt in packets:
                try:
                    write(fd, pkt)
                except OSError as exc:
                    self._count("tun_full" if exc.errno == errno.EAGAIN else "tun_write")
                    continue
                n += 1
                nbytes += len(pkt) - hdr
            self._packets += n
            self._bytes += nbytes
            self._written += size  # only now: an inline write may not overtake this batch
