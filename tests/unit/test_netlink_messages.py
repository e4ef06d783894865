"""rtnetlink message encoding and decoding (pure: no socket), checked against the kernel's
struct layouts byte for byte and against crafted kernel answers."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd_runtime.io import netlink as nl

net = ipaddress.ip_network
addr = ipaddress.ip_address


def attrs_of(body: bytes, header: struct.Struct) -> dict[int, bytes]:
    return nl.parse_attrs(body[header.size :])


def test_attr_is_padded_to_four_bytes() -> None:
    assert nl.pack_attr(3, b"ab") == struct.pack("=HH", 6, 3) + b"ab\0\0"
    assert nl.pack_attr(4, struct.pack("=I", 1400)) == struct.pack("=HHI", 8, 4, 1400)
    assert nl.pack_attr(1, b"") == struct.pack("=HH", 4, 1)


@given(st.dictionaries(st.integers(1, 0x3FFF), st.binary(max_size=40), max_size=8))
def test_attrs_round_trip(attrs: dict[int, bytes]) -> None:
    packed = b"".join(nl.pack_attr(k, v) for k, v in attrs.items())
    assert len(packed) % 4 == 0
    assert nl.parse_attrs(packed) == attrs


def test_attr_running_past_the_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="bad length 12"):
        nl.parse_attrs(struct.pack("=HH", 12, 1) + b"abcd")
    with pytest.raises(ValueError, match="bad length 2"):
        nl.parse_attrs(struct.pack("=HH", 2, 1))


def test_message_header_and_split() -> None:
    one = nl.pack_message(nl.RTM_NEWROUTE, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 7, b"\1\2\3\4")
    assert one == struct.pack("=IHHII", 20, 24, 5, 7, 0) + b"\1\2\3\4"
    odd = nl.pack_message(nl.NLMSG_DONE, 0, 8, b"\5") + b"\0\0\0"  # padded as the kernel does
    assert list(nl.parse_messages(one + odd)) == [(24, 5, 7, b"\1\2\3\4"), (3, 0, 8, b"\5")]
    with pytest.raises(ValueError, match="bad length"):
        list(nl.parse_messages(one[:-1]))


def test_link_request_sets_mtu_and_up() -> None:
    body = nl.link_request(5, mtu=1400, up=True)
    family, _type, index, flags, change = nl.IFINFOMSG.unpack_from(body)
    assert (family, index, flags, change) == (socket.AF_UNSPEC, 5, nl.IFF_UP, nl.IFF_UP)
    assert attrs_of(body, nl.IFINFOMSG) == {nl.IFLA_MTU: struct.pack("=I", 1400)}
    # MTU alone changes no flag; down clears IFF_UP.
    assert nl.IFINFOMSG.unpack_from(nl.link_request(5, mtu=9000))[3:] == (0, 0)
    assert nl.IFINFOMSG.unpack_from(nl.link_request(5, up=False))[3:] == (0, nl.IFF_UP)


def test_point_to_point_address_request() -> None:
    body = nl.addr_request(9, addr("198.19.0.2"), 32, peer=addr("198.19.0.1"))
    assert nl.IFADDRMSG.unpack_from(body) == (socket.AF_INET, 32, 0, 0, 9)
    assert attrs_of(body, nl.IFADDRMSG) == {
        nl.IFA_LOCAL: bytes([198, 19, 0, 2]),
        nl.IFA_ADDRESS: bytes([198, 19, 0, 1]),
    }
    # Byte for byte: ifaddrmsg (8) + two 8-byte attributes.
    assert body == (
        struct.pack("=BBBBi", 2, 32, 0, 0, 9)
        + struct.pack("=HH4s", 8, 2, bytes([198, 19, 0, 2]))
        + struct.pack("=HH4s", 8, 1, bytes([198, 19, 0, 1]))
    )


def test_ipv6_address_request_without_peer() -> None:
    body = nl.addr_request(3, addr("fd00::1"), 64)
    assert nl.IFADDRMSG.unpack_from(body) == (socket.AF_INET6, 64, 0, 0, 3)
    attrs = attrs_of(body, nl.IFADDRMSG)
    assert attrs[nl.IFA_LOCAL] == attrs[nl.IFA_ADDRESS] == addr("fd00::1").packed


def test_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match="different"):
        nl.addr_request(3, addr("fd00::1"), 64, peer=addr("198.19.0.1"))
    with pytest.raises(ValueError, match="different"):
        nl.route_request(net("198.19.8.0/24"), 3, addr("fd00::1"))


def test_route_via_gateway_is_universe_scope() -> None:
    body = nl.route_request(net("198.19.8.0/24"), 4, addr("198.19.0.1"))
    assert nl.RTMSG.unpack_from(body) == (
        socket.AF_INET, 24, 0, 0, nl.RT_TABLE_MAIN, nl.RTPROT_BOOT,
        nl.RT_SCOPE_UNIVERSE, nl.RTN_UNICAST, 0,
    )  # fmt: skip
    assert attrs_of(body, nl.RTMSG) == {
        nl.RTA_TABLE: struct.pack("=I", 254),
        nl.RTA_DST: bytes([198, 19, 8, 0]),
        nl.RTA_OIF: struct.pack("=i", 4),
        nl.RTA_GATEWAY: bytes([198, 19, 0, 1]),
    }


def test_route_without_gateway_is_link_scope_and_delete_matches_any() -> None:
    body = nl.route_request(net("198.19.9.0/24"), 4)
    assert nl.RTMSG.unpack_from(body)[6] == nl.RT_SCOPE_LINK
    assert nl.RTA_GATEWAY not in attrs_of(body, nl.RTMSG)
    gone = nl.route_request(net("198.19.9.0/24"), 4, delete=True)
    _f, _d, _s, _t, _tab, proto, scope, kind, _fl = nl.RTMSG.unpack_from(gone)
    assert (proto, scope, kind) == (nl.RTPROT_UNSPEC, nl.RT_SCOPE_NOWHERE, nl.RTN_UNSPEC)


def test_ipv6_route_and_big_table() -> None:
    body = nl.route_request(net("fd00:1::/48"), 2, addr("fd00::2"), table=1000)
    assert nl.RTMSG.unpack_from(body)[:2] == (socket.AF_INET6, 48)
    assert nl.RTMSG.unpack_from(body)[4] == 1000 & 0xFF  # the real id is in RTA_TABLE
    attrs = attrs_of(body, nl.RTMSG)
    assert attrs[nl.RTA_TABLE] == struct.pack("=I", 1000)
    assert attrs[nl.RTA_DST] == addr("fd00:1::").packed
    assert attrs[nl.RTA_GATEWAY] == addr("fd00::2").packed


def test_getroute_request_asks_for_a_host() -> None:
    body = nl.getroute_request(addr("198.18.1.1"))
    assert nl.RTMSG.unpack_from(body)[:2] == (socket.AF_INET, 32)
    assert attrs_of(body, nl.RTMSG) == {nl.RTA_DST: bytes([198, 18, 1, 1])}
    assert nl.RTMSG.unpack_from(nl.getroute_request(addr("fd00::9")))[:2] == (10, 128)


def test_parse_route_answer() -> None:
    # What the kernel answers to RTM_GETROUTE 198.18.200.7: via 198.18.1.1 dev 3 src .2
    body = nl.RTMSG.pack(2, 32, 0, 0, 254, 3, 0, 1, 0x200) + b"".join(
        (
            nl.pack_attr(nl.RTA_TABLE, struct.pack("=I", 254)),
            nl.pack_attr(nl.RTA_DST, bytes([198, 18, 200, 7])),
            nl.pack_attr(nl.RTA_OIF, struct.pack("=i", 3)),
            nl.pack_attr(nl.RTA_PREFSRC, bytes([198, 18, 1, 2])),
            nl.pack_attr(nl.RTA_GATEWAY, bytes([198, 18, 1, 1])),
            nl.pack_attr(0x8000 | 25, b"\0" * 12),  # RTA_CACHEINFO-like, nested flag set
        )
    )
    route = nl.parse_route(body)
    assert route == nl.RouteInfo(
        family=2, dst_len=32, table=254, kind=nl.RTN_UNICAST,
        dst=addr("198.18.200.7"), gateway=addr("198.18.1.1"), oif=3,
        prefsrc=addr("198.18.1.2"),
    )  # fmt: skip
    direct = nl.parse_route(nl.RTMSG.pack(10, 128, 0, 0, 254, 2, 0, 1, 0))
    assert (direct.gateway, direct.oif, direct.dst) == (None, None, None)


def test_parse_error_plain_ack_and_extended_ack() -> None:
    request = nl.pack_message(nl.RTM_NEWROUTE, 5, 1, b"x" * 12)
    # An ACK: error 0, the request echoed in full.
    assert nl.parse_error(0, struct.pack("=i", 0) + request) == (0, None)
    # EEXIST, no ext-ack.
    assert nl.parse_error(0, struct.pack("=i", -errno.EEXIST) + request) == (errno.EEXIST, None)
    # Capped (header only) + TLVs carrying the kernel's message.
    capped = struct.pack("=i", -errno.EINVAL) + request[: nl.NLMSGHDR.size]
    capped += nl.pack_attr(nl.NLMSGERR_ATTR_MSG, b"Nexthop has invalid gateway\0")
    flags = nl.NLM_F_CAPPED | nl.NLM_F_ACK_TLVS
    assert nl.parse_error(flags, capped) == (errno.EINVAL, "Nexthop has invalid gateway")
    # Not capped: the whole request (with its length) precedes the TLVs.
    full = struct.pack("=i", -errno.EINVAL) + request + nl.pack_attr(1, b"bad\0")
    assert nl.parse_error(nl.NLM_F_ACK_TLVS, full) == (errno.EINVAL, "bad")


def test_error_messages_say_what_why_and_a_hint() -> None:
    text = nl.describe_error("adding route 198.19.8.0/24", errno.EPERM)
    assert text == "adding route 198.19.8.0/24: Operation not permitted (needs root: CAP_NET_ADMIN)"
    text = nl.describe_error(
        "adding route x", errno.EINVAL, "Invalid prefix for given prefix length"
    )
    assert text == "adding route x: Invalid argument (Invalid prefix for given prefix length)"
    assert "exists" in nl.describe_error("x", errno.EEXIST)


def test_a_tun_route_via_its_far_end_is_onlink_so_it_needs_no_route_to_the_gateway_yet() -> None:
    # The far end's own IPv6 route appears only after the kernel's DAD work item has run:
    # `onlink` makes a route via it valid at once (on a loaded host it failed with EHOSTUNREACH)
    body = nl.route_request(net("fd00:1::/48"), 4, addr("fd00::1"), onlink=True)
    assert nl.RTMSG.unpack_from(body)[8] == nl.RTNH_F_ONLINK
    # Only for a route with a gateway, never on a delete (which matches any flags)
    assert nl.RTMSG.unpack_from(nl.route_request(net("fd00:1::/48"), 4, onlink=True))[8] == 0
    gone = nl.route_request(net("fd00:1::/48"), 4, addr("fd00::1"), delete=True, onlink=True)
    assert nl.RTMSG.unpack_from(gone)[8] == 0
