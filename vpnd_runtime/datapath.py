"""A hub's per-packet rules: which client a packet goes to, and what a client may send.

Packets here are as the TUN gives and takes them: `hdr` bytes of virtio-net header (0 or 10)
followed by the IP packet. Only the IPv4 header's source and destination are read; a TCP
super-packet (GSO) is one packet here, so a bulk flow costs one lookup per 64 KiB.

Outbound (TUN -> clients): `route_outbound` groups a batch by the client whose address or
networks hold the destination (longest prefix); packets to no client are dropped and counted.

Inbound (client -> TUN): `admit_inbound` keeps only packets whose source belongs to the client
they came from (WireGuard's allowed-IPs rule: a spoofed source is dropped and counted, never
forwarded) and, when the hub does not forward between clients, drops packets addressed to another
client.
"""

from __future__ import annotations

from collections.abc import Iterator

from vpnd_runtime.peers import Peer, PeerTable

_from_bytes = int.from_bytes


def _count(drops: dict[str, int], why: str, n: int = 1) -> None:
    drops[why] = drops.get(why, 0) + n


def route_outbound(
    batch: list[bytes], hdr: int, table: PeerTable, drops: dict[str, int]
) -> Iterator[tuple[Peer, list[bytes]]]:
    """(peer, packets) for each client that packets of `batch` go to, in first-seen order.

    Packets that are not IPv4, too short, or to no client are counted in `drops`
    (`not_ipv4`, `malformed`, `no_route`)."""
    groups: dict[Peer, list[bytes]] = {}
    route = table.route
    for packet in batch:
        if len(packet) < hdr + 20:
            _count(drops, "malformed")
            continue
        if packet[hdr] >> 4 != 4:
            _count(drops, "not_ipv4")
            continue
        peer = route(_from_bytes(packet[hdr + 16 : hdr + 20], "big"))
        if peer is None:
            _count(drops, "no_route")
            continue
        group = groups.get(peer)
        if group is None:
            groups[peer] = [packet]
        else:
            group.append(packet)
    return iter(groups.items())


def admit_inbound(
    packets: list[bytes], hdr: int, peer: Peer, table: PeerTable, clienttoclient: bool
) -> list[bytes]:
    """The packets from `peer` that may enter the hub; the rest are counted on the peer
    (`spoofed_source`, `client_to_client`, `not_ipv4`, `malformed`)."""
    kept: list[bytes] = []
    allows = table.allows
    route = table.route
    for packet in packets:
        if len(packet) < hdr + 20:
            peer.count_drop("malformed")
            continue
        if packet[hdr] >> 4 != 4:
            peer.count_drop("not_ipv4")
            continue
        if not allows(peer, _from_bytes(packet[hdr + 12 : hdr + 16], "big")):
            peer.count_drop("spoofed_source")
            continue
        if not clienttoclient:
            other = route(_from_bytes(packet[hdr + 16 : hdr + 20], "big"))
            if other is not None and other is not peer:
                peer.count_drop("client_to_client")
                continue
        kept.append(packet)
    return kept
