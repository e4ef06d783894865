"""The peer table (keys, admission, longest-prefix routing) and the hub's per-packet rules."""

from __future__ import annotations

import ipaddress
import os
import struct

from hypothesis import given
from hypothesis import strategies as st

from vpnd_runtime import datapath
from vpnd_runtime.config import Route
from vpnd_runtime.peers import Peer, PeerTable, Router
from vpnd_runtime.proto.kdf import key_id

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network
HDR = 10


def peer(name: str, address: str, key: bytes, *routes: str) -> Peer:
    return Peer(
        name=name,
        address=IP(address),
        key=key,
        fingerprint=name,
        routes=tuple(
            Route(i + 1, NET(r).network_address, NET(r).netmask, IP(address))
            for i, r in enumerate(routes)
        ),
    )


def packet(src: str, dst: str, hdr: int = HDR) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 1, 0, IP(src).packed, IP(dst).packed)
    return bytes(hdr) + ip


KA, KB, SHARED = os.urandom(32), os.urandom(32), os.urandom(32)


def table() -> PeerTable:
    return PeerTable(
        [
            peer("a", "198.19.1.10", KA, "198.18.40.0/24", "198.18.0.0/16"),
            peer("b", "198.19.1.11", KB),
            peer("c", "198.19.1.12", SHARED),
            peer("d", "198.19.1.13", SHARED),
        ],
        hub=True,
    )


def test_keys_by_id_and_admission_by_key_and_address() -> None:
    t = table()
    assert t.keys_for(key_id(KA)) == [KA]
    assert t.keys_for(key_id(SHARED)) == [SHARED]  # one key, however many holders
    assert t.keys_for(b"\0\0\0\0") == ()
    assert t.admit(KA, IP("198.19.1.10")).name == "a"
    assert t.admit(KA, IP("198.19.1.11")) is None  # b's address with a's key
    assert t.admit(SHARED, IP("198.19.1.13")).name == "d"
    assert t.admit(KB, None).name == "b"  # no address: fine when the key is b's alone
    assert t.admit(SHARED, None) is None  # ...but not for a shared key
    assert t.admit(KA, ipaddress.IPv6Address("2001:db8::1")) is None


def test_longest_prefix_routing_and_allowed_sources() -> None:
    t = table()
    route = lambda a: t.route(int(IP(a)))  # noqa: E731
    assert route("198.19.1.11").name == "b"
    assert route("198.18.40.7").name == "a"  # /24 behind a
    assert route("198.18.41.7").name == "a"  # /16 behind a
    assert route("198.19.1.99") is None
    assert t.allows(t.by_name["a"], int(IP("198.18.40.1")))
    assert not t.allows(t.by_name["b"], int(IP("198.18.40.1")))  # a's network, from b
    assert not t.allows(t.by_name["b"], int(IP("198.19.1.10")))  # a's address, from b


def test_point_to_point_table_sends_everything_to_its_peer_and_filters_nothing() -> None:
    only = peer("link", "198.19.0.2", KA)
    t = PeerTable([only], hub=False)
    assert t.route(int(IP("8.8.8.8"))) is only
    assert t.allows(only, int(IP("203.0.113.9")))


def test_route_outbound_groups_by_client_and_counts_what_goes_nowhere() -> None:
    t = table()
    drops: dict[str, int] = {}
    batch = [
        packet("198.19.1.1", "198.19.1.10"),
        packet("198.19.1.1", "198.19.1.11"),
        packet("198.19.1.1", "198.18.40.9"),
        packet("198.19.1.1", "198.19.1.200"),
        bytes(HDR) + b"\x60" + bytes(39),  # IPv6
        b"short",
    ]
    groups = {p.name: pkts for p, pkts in datapath.route_outbound(batch, HDR, t, drops)}
    assert {k: len(v) for k, v in groups.items()} == {"a": 2, "b": 1}
    assert groups["a"] == [batch[0], batch[2]]  # order kept within a client
    assert drops == {"no_route": 1, "not_ipv4": 1, "malformed": 1}


def test_admit_inbound_drops_spoofed_sources_and_optionally_client_to_client() -> None:
    t = table()
    a = t.by_name["a"]
    pkts = [
        packet("198.19.1.10", "198.19.1.1"),  # a -> hub
        packet("198.18.40.5", "198.19.1.1"),  # from a's network
        packet("198.19.1.11", "198.19.1.1"),  # b's address: spoofed
        packet("198.19.1.10", "198.19.1.11"),  # a -> b
    ]
    assert datapath.admit_inbound(pkts, HDR, a, t, clienttoclient=True) == [
        pkts[0],
        pkts[1],
        pkts[3],
    ]
    assert a.drops == {"spoofed_source": 1}
    a.drops.clear()
    assert datapath.admit_inbound(pkts, HDR, a, t, clienttoclient=False) == pkts[:2]
    assert a.drops == {"spoofed_source": 1, "client_to_client": 1}


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), min_size=1, max_size=30),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50),
)
def test_router_matches_a_brute_force_longest_prefix_match(
    prefixes: list[tuple[int, int]], probes: list[int]
) -> None:
    router = Router()
    nets: dict[NET, int] = {}
    for i, (addr, plen) in enumerate(prefixes):
        net = NET((addr, plen), strict=False)
        router.add(net, i)
        nets[net] = i  # a later add of the same network replaces it
    for probe in [*probes, *(int(n.network_address) for n in nets)]:
        holders = [n for n in nets if IP(probe) in n]
        expected = nets[max(holders, key=lambda n: n.prefixlen)] if holders else None
        assert router.lookup(probe) == expected
