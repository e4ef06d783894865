"""The TUN side of the tunnel: a point-to-point interface with the kernel's GSO offload switched on.

Contract (what the daemon relies on):
- `Tun.open(name, offload=True)` creates the interface with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`
  and `TUNSETOFFLOAD(CSUM | TSO4 | TSO6)`. Every `read()` then returns one *virtio-net header*
  (10 bytes) followed by one packet of up to ~64 KiB: a TCP super-packet the kernel did not segment.
  The far end, opened the same way, writes those bytes back unchanged; its kernel segments them and
  completes the partial checksums. Both ends must use the offload (the protocol carries the header
  opaquely), so the daemon always opens the TUN this way.
- `configure()` sets the point-to-point address (`local peer remote/32`), the MTU and brings the
  link up through pyroute2 (netlink, no `ip` subprocess). The kernel then owns the host route to
  `remote`; extra routes go through `add_route`/`del_route`.
- The fd is non-blocking: the daemon's selector loop decides when to read.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import queue
import struct
import threading
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
#: One read can return a 64 KiB GSO super-packet plus its virtio header.
READ_SIZE = 65535 + VNET_HDR_LEN
#: A virtio header for a plain packet: no GSO, no checksum offload pending.
PLAIN_VNET_HDR = bytes(VNET_HDR_LEN)


class TunError(OSError):
    """The TUN interface could not be created or configured (message names the interface)."""


@dataclass
class Route:
    """A route through the tunnel: `dest` network via the far end."""

    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address


@dataclass
class Tun:
    """An open TUN device with virtio-net headers; `fd` is non-blocking."""

    name: str
    fd: int
    index: int = 0
    _routes: list[Route] = field(default_factory=list)
    _pinned: list[dict[str, object]] = field(default_factory=list)

    @classmethod
    def open(cls, name: str) -> Tun:
        """Create the interface `name` with IFF_VNET_HDR and TSO/checksum offload."""
        if not name or len(name) > 15:
            raise TunError(errno.EINVAL, f"interface name {name!r}: 1 to 15 characters")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN {name}: {exc.strerror}") from exc
        return cls(name=name, fd=fd)

    def configure(
        self, local: ipaddress.IPv4Address, remote: ipaddress.IPv4Address, mtu: int
    ) -> None:
        """Give the link its point-to-point addresses and MTU, and bring it up."""
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.name)
            if not links:
                raise TunError(errno.ENODEV, f"TUN {self.name} vanished before configuration")
            self.index = links[0]
            try:
                ipr.link("set", index=self.index, mtu=mtu)
                ipr.addr(
                    "add", index=self.index, local=str(local), address=str(remote), prefixlen=32
                )
                ipr.link("set", index=self.index, state="up")
            except NetlinkError as exc:
                raise TunError(exc.code, f"configuring {self.name}: {exc}") from exc

    def add_route(self, network: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address) -> None:
        """Route `network` through the tunnel; remembered so `remove_routes` can undo it."""
        with IPRoute() as ipr:
            try:
                ipr.route("add", dst=str(network), gateway=str(gateway), oif=self.index)
            except NetlinkError as exc:
                raise TunError(exc.code, f"route {network} via {gateway}: {exc}") from exc
        self._routes.append(Route(network, gateway))

    def pin_route(self, dst: ipaddress.IPv4Address) -> str | None:
        """Pin a host route to `dst` (the carrier's peer) along its current path.

        Routes through the tunnel (route1..9) may cover the server's own address; the pinned /32
        keeps the carrier's packets off the tunnel (no routing loop). Returns a description of
        the path, or None when `dst` has no route or is already pinned (nothing to undo).
        """
        with IPRoute() as ipr:
            try:
                found = ipr.route("get", dst=str(dst))
            except NetlinkError as exc:
                raise TunError(exc.code, f"no route to {dst}: {exc}") from exc
            if not found:
                return None
            gateway = found[0].get_attr("RTA_GATEWAY")
            oif = found[0].get_attr("RTA_OIF")
            if oif == self.index:
                return None
            spec = {"dst": f"{dst}/32", "oif": oif}
            if gateway:
                spec["gateway"] = gateway
            try:
                ipr.route("add", **spec)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    return None
                raise TunError(exc.code, f"pinning route to {dst}: {exc}") from exc
        self._pinned.append(spec)
        return f"{dst} via {gateway or 'direct'} (ifindex {oif})"

    def remove_routes(self) -> list[str]:
        """Remove the routes this object added; returns the problems met (never raises)."""
        problems: list[str] = []
        with IPRoute() as ipr:
            for route in reversed(self._routes):
                try:
                    ipr.route(
                        "del", dst=str(route.network), gateway=str(route.gateway), oif=self.index
                    )
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENODEV):
                        problems.append(f"route {route.network}: {exc}")
            for spec in self._pinned:
                try:
                    ipr.route("del", **spec)
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENODEV):
                        problems.append(f"pinned route {spec['dst']}: {exc}")
        self._routes.clear()
        self._pinned.clear()
        return problems

    @property
    def routes(self) -> list[Route]:
        """The routes currently installed through this interface by us."""
        return list(self._routes)

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
    The backlog is bounded: past `max_batches` queued batches, packets are dropped and counted, as
    a full NIC queue would (the inner TCP then slows down).
    """

    def __init__(self, fd: int, max_batches: int = 512) -> None:
        self.fd = fd
        self.max_batches = max_batches
        self.packets = 0
        self.bytes = 0  # IP bytes, virtio headers excluded
        self.drops: dict[str, int] = {}
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vpnd-tun-writer", daemon=True)
        self._thread.start()

    def put(self, packets: list[bytes]) -> None:
        """Queue a batch for writing (never blocks)."""
        if self._queue.qsize() >= self.max_batches:
            self.drops["tun_backlog"] = self.drops.get("tun_backlog", 0) + len(packets)
            return
        self._queue.put(packets)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread (the caller closes the fd afterwards)."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        write = os.write
        fd = self.fd
        get = self._queue.get
        while (packets := get()) is not None:
            n = size = 0
            for pkt in packets:
                try:
                    write(fd, pkt)
                except OSError as exc:
                    reason = "tun_full" if exc.errno == errno.EAGAIN else "tun_write"
                    self.drops[reason] = self.drops.get(reason, 0) + 1
                    continue
                n += 1
                size += len(pkt)
            self.packets += n
            self.bytes += size - n * VNET_HDR_LEN
