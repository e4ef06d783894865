"""A small rtnetlink client: the few messages vpnd needs to give a TUN its addresses and routes.

Theory of operation
-------------------
vpnd used pyroute2 for four things: bring a link up with an MTU, add a point-to-point address,
add/remove routes, and look up the route to the carrier's peer (autoroute). Importing pyroute2
alone cost ~32 MB of RSS and ~100 ms, more than the rest of the daemon together, so this module
speaks the kernel's rtnetlink protocol itself, standard library only.

The module has two layers:

* **Pure encoding/decoding** (no socket, unit-tested): `pack_message`/`parse_messages` for the
  `nlmsghdr` framing, `pack_attr`/`parse_attrs` for the 4-byte aligned `rtattr` TLVs, and one
  builder per request (`link_request`, `addr_request`, `route_request`, `getroute_request`) plus
  `parse_route` and `parse_error` for the answers. IPv4 and IPv6 are both encoded (the family
  follows the address objects), so an IPv6 tunnel can reuse them.
* **`RtNetlink`**, a NETLINK_ROUTE socket that sends one request at a time with NLM_F_ACK and
  waits (bounded by a timeout) for the answer carrying its sequence number. A negative errno in
  the kernel's NLMSG_ERROR answer is raised as `NetlinkError` (an OSError with that errno),
  whose message says what was asked, the errno's meaning, the kernel's own extended-ack text
  when it sent one (NETLINK_EXT_ACK), and a hint for the common cases (EPERM: not root).

Every request is synchronous and tiny; nothing here runs on the data path.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# Message types (linux/rtnetlink.h, linux/netlink.h).
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

# nlmsghdr flags.
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: only the request's header was echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1

# Attributes.
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_UNSPEC = 0
RTPROT_BOOT = 3  # what `ip route add` records by default
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # on delete: match any scope
RTN_UNSPEC = 0
RTN_UNICAST = 1
#: rtm_flags: the gateway is on the link (`ip route ... onlink`), not looked up
RTNH_F_ONLINK = 4

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTATTR = struct.Struct("=HH")  # len, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
#: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
NLMSGERR = struct.Struct("=i")

#: What an errno usually means for these requests, appended to the kernel's own wording.
HINTS = {
    errno.EPERM: "needs root: CAP_NET_ADMIN",
    errno.EACCES: "needs root: CAP_NET_ADMIN",
    errno.EEXIST: "it already exists",
    errno.ENODEV: "no such interface: was it removed?",
    errno.ESRCH: "no such route",
    errno.EADDRNOTAVAIL: "no such address on the interface",
    errno.ENETUNREACH: "is the gateway on a connected network?",
}


class NetlinkError(OSError):
    """The kernel refused a request (errno set) or did not answer; the message says which."""


@dataclass(frozen=True)
class RouteInfo:
    """The parts of an RTM_NEWROUTE answer the daemon uses."""

    family: int
    dst_len: int
    table: int
    kind: int = RTN_UNICAST  # rtm_type: RTN_LOCAL for the host's own addresses
    dst: IPAddress | None = None
    gateway: IPAddress | None = None
    oif: int | None = None
    prefsrc: IPAddress | None = None


# ------------------------------------------------------------------------ pure encoding
def _align(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(kind: int, payload: bytes) -> bytes:
    """One rtattr: header, payload, zero padding to a multiple of 4 bytes."""
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + bytes(_align(length) - length)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """The rtattrs in `data` as {type: payload} (nested/repeated ones: the last wins).

    Raises ValueError on an attribute whose length runs past the buffer.
    """
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            raise ValueError(f"rtattr at offset {offset}: bad length {length}")
        attrs[kind & 0x3FFF] = data[offset + RTATTR.size : offset + length]  # drop NLA_F_* bits
        offset += _align(length)
    return attrs


def pack_message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: nlmsghdr (pid 0: the kernel fills our port id in) + body."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def parse_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Split one datagram into (type, flags, seq, body) messages.

    Raises ValueError on a truncated or malformed header.
    """
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"netlink message at offset {offset}: bad length {length}")
        yield kind, flags, seq, data[offset + NLMSGHDR.size : offset + length]
        offset += _align(length)


def parse_error(flags: int, body: bytes) -> tuple[int, str | None]:
    """An NLMSG_ERROR body as (errno, kernel's extended-ack text or None); errno 0 is an ACK."""
    (code,) = NLMSGERR.unpack_from(body)
    text = None
    if flags & NLM_F_ACK_TLVS:
        # After the error code comes the request: its header only when capped, else all of it.
        if flags & NLM_F_CAPPED:
            echoed = NLMSGHDR.size
        else:
            (echoed,) = struct.unpack_from("=I", body, NLMSGERR.size)
        tlvs = body[NLMSGERR.size + _align(echoed) :]
        with_msg = parse_attrs(tlvs).get(NLMSGERR_ATTR_MSG)
        if with_msg:
            text = with_msg.rstrip(b"\0").decode(errors="replace")
    return -code, text


def _family(address: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def link_request(index: int, mtu: int | None = None, up: bool | None = None) -> bytes:
    """RTM_NEWLINK body: set the MTU and/or the IFF_UP flag of interface `index`."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
    if mtu is not None:
        body += pack_attr(IFLA_MTU, struct.pack("=I", mtu))
    return body


def addr_request(
    index: int, local: IPAddress, prefixlen: int, peer: IPAddress | None = None
) -> bytes:
    """RTM_NEWADDR/RTM_DELADDR body: `local` on `index`, point-to-point to `peer` if given."""
    if peer is not None and peer.version != local.version:
        raise ValueError(f"address {local} and peer {peer} are of different families")
    body = IFADDRMSG.pack(_family(local), prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += pack_attr(IFA_LOCAL, local.packed)
    return body + pack_attr(IFA_ADDRESS, (peer or local).packed)


def route_request(
    network: IPNetwork,
    oif: int | None = None,
    gateway: IPAddress | None = None,
    table: int = RT_TABLE_MAIN,
    *,
    delete: bool = False,
    onlink: bool = False,
) -> bytes:
    """RTM_NEWROUTE/RTM_DELROUTE body for `network` out of `oif`, via `gateway` if given.

    `onlink` (``ip route ... onlink``) tells the kernel the gateway is on `oif`'s link without
    looking it up: true of a point-to-point TUN's far end, whose own IPv6 route the kernel adds
    asynchronously (after its DAD work item, even on a NOARP device), so a route via it added
    right after the address could fail with EHOSTUNREACH on a loaded host.

    Without a gateway the route is scope link (the destination is on the link itself, as for
    a point-to-point TUN). A delete leaves protocol, scope and type unspecified, as `ip route
    del` does, so it matches the route whoever added it.
    """
    if gateway is not None and gateway.version != network.version:
        raise ValueError(f"route {network} via {gateway}: different address families")
    if delete:
        proto, scope, kind = RTPROT_UNSPEC, RT_SCOPE_NOWHERE, RTN_UNSPEC
    else:
        scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
        proto, kind = RTPROT_BOOT, RTN_UNICAST
    flags = RTNH_F_ONLINK if onlink and gateway is not None and not delete else 0
    body = RTMSG.pack(
        _family(network), network.prefixlen, 0, 0, table & 0xFF, proto, scope, kind, flags
    )
    body += pack_attr(RTA_TABLE, struct.pack("=I", table))
    body += pack_attr(RTA_DST, network.network_address.packed)
    if oif is not None:
        body += pack_attr(RTA_OIF, struct.pack("=i", oif))
    if gateway is not None:
        body += pack_attr(RTA_GATEWAY, gateway.packed)
    return body


def getroute_request(dst: IPAddress) -> bytes:
    """RTM_GETROUTE body: which route would the kernel use for a packet to `dst`?"""
    body = RTMSG.pack(_family(dst), dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    return body + pack_attr(RTA_DST, dst.packed)


def _address(family: int, raw: bytes | None) -> IPAddress | None:
    if raw is None:
        return None
    if family == socket.AF_INET and len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if family == socket.AF_INET6 and len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ValueError(f"address of {len(raw)} bytes in family {family}")


def parse_route(body: bytes) -> RouteInfo:
    """An RTM_NEWROUTE body (the answer to RTM_GETROUTE, or a dump entry) as a RouteInfo."""
    family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = RTMSG.unpack_from(body)
    attrs = parse_attrs(body[RTMSG.size :])
    if RTA_TABLE in attrs:
        (table,) = struct.unpack("=I", attrs[RTA_TABLE])
    oif = struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    return RouteInfo(
        family=family,
        dst_len=dst_len,
        table=table,
        kind=kind,
        dst=_address(family, attrs.get(RTA_DST)),
        gateway=_address(family, attrs.get(RTA_GATEWAY)),
        oif=oif,
        prefsrc=_address(family, attrs.get(RTA_PREFSRC)),
    )


def describe_error(what: str, code: int, kernel_text: str | None = None) -> str:
    """`what: strerror (kernel text; hint)` — the message a NetlinkError carries."""
    extra = [t for t in (kernel_text, HINTS.get(code)) if t]
    detail = f" ({'; '.join(extra)})" if extra else ""
    return f"{what}: {os.strerror(code)}{detail}"


# ------------------------------------------------------------------------ the socket
class RtNetlink:
    """A NETLINK_ROUTE socket sending one acknowledged request at a time.

    Use as a context manager; every method raises NetlinkError naming the request on failure.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self.sock.settimeout(timeout)
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                # Older kernels lack these: plain errno answers, still correct.
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(SOL_NETLINK, option, 1)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        """Send one request with NLM_F_ACK; return the (type, body) answers before the ACK.

        Raises NetlinkError with `what` in its message when the kernel answers an errno, or
        when no answer comes within the socket's timeout.
        """
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        try:
            self.sock.send(pack_message(kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, body))
        except OSError as exc:
            raise NetlinkError(exc.errno, describe_error(what, exc.errno or errno.EIO)) from exc
        answers: list[tuple[int, bytes]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise NetlinkError(errno.ETIMEDOUT, f"{what}: no answer from the kernel") from exc
            except OSError as exc:
                code = exc.errno or errno.EIO
                raise NetlinkError(code, describe_error(what, code)) from exc
            for mkind, mflags, mseq, mbody in parse_messages(data):
                if mseq != seq:
                    continue  # an answer to an earlier request that timed out
                if mkind == NLMSG_ERROR:
                    code, text = parse_error(mflags, mbody)
                    if code:
                        raise NetlinkError(code, describe_error(what, code, text))
                    return answers
                if mkind == NLMSG_DONE:
                    return answers
                answers.append((mkind, mbody))

    def set_link(self, index: int, mtu: int | None = None, up: bool | None = None) -> None:
        """Set interface `index`'s MTU and/or bring it up (True) or down (False)."""
        parts = ([f"mtu {mtu}"] if mtu is not None else []) + (
            [] if up is None else ["up" if up else "down"]
        )
        self.request(
            RTM_NEWLINK,
            0,
            link_request(index, mtu, up),
            f"setting ifindex {index} {' '.join(parts)}",
        )

    def add_address(
        self, index: int, local: IPAddress, prefixlen: int, peer: IPAddress | None = None
    ) -> None:
        """Add `local/prefixlen` (point-to-point to `peer` if given) to interface `index`."""
        what = f"adding address {local}" + (f" peer {peer}" if peer else "") + f"/{prefixlen}"
        self.request(
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            addr_request(index, local, prefixlen, peer),
            f"{what} on ifindex {index}",
        )

    def del_address(
        self, index: int, local: IPAddress, prefixlen: int, peer: IPAddress | None = None
    ) -> None:
        """Remove an address added by `add_address` (same arguments)."""
        self.request(
            RTM_DELADDR,
            0,
            addr_request(index, local, prefixlen, peer),
            f"removing address {local}/{prefixlen} from ifindex {index}",
        )

    def add_route(
        self,
        network: IPNetwork,
        oif: int | None = None,
        gateway: IPAddress | None = None,
        table: int = RT_TABLE_MAIN,
        onlink: bool = False,
    ) -> None:
        """Add a route to `network` out of `oif` (via `gateway` if given; `onlink`: see
        `route_request`); EEXIST if present."""
        self.request(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            route_request(network, oif, gateway, table, onlink=onlink),
            f"adding route {network}" + (f" via {gateway}" if gateway else "")
            + (f" dev ifindex {oif}" if oif is not None else ""),
        )  # fmt: skip

    def del_route(
        self,
        network: IPNetwork,
        oif: int | None = None,
        gateway: IPAddress | None = None,
        table: int = RT_TABLE_MAIN,
    ) -> None:
        """Remove the route to `network` (narrowed by `oif`/`gateway` when given); ESRCH if none."""
        self.request(
            RTM_DELROUTE,
            0,
            route_request(network, oif, gateway, table, delete=True),
            f"removing route {network}" + (f" via {gateway}" if gateway else ""),
        )

    def get_route(self, dst: IPAddress) -> RouteInfo | None:
        """The route the kernel would use to reach `dst`; None when it has none (unreachable)."""
        try:
            answers = self.request(RTM_GETROUTE, 0, getroute_request(dst), f"route lookup {dst}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                return None
            raise
        for kind, body in answers:
            if kind == RTM_NEWROUTE:
                return parse_route(body)
        return None
