"""The peer table: who may connect, with which key, and where each packet goes.

A daemon serves a table of peers. A point-to-point link has one (the far end); a hub has one per
client. The table answers the three questions the daemon asks on every handshake and packet:

* **Which key?** `keys_for(key_id)` — the key id in the clear part of message 1 selects the
  candidate keys in O(1) (several only when two distinct keys' 4-byte ids collide).
* **Which client?** `admit(psk, address)` — the tunnel address the client announced inside the
  authenticated message 1, checked against the clients holding that key. Several clients may share
  one key (the seed's style); each still proves the key and is known by its address.
* **Which peer for this packet?** `route(dst)` — longest-prefix match over every client's address
  (/32) and the networks behind it (WireGuard's allowed IPs), and `allows(peer, src)` — a packet
  from a client must come from its own address or a network behind it.

Pure: no I/O. The daemon keeps each peer's session and counters on the `Peer` objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

from vpnd_runtime.config import Route
from vpnd_runtime.proto.kdf import key_id as derive_key_id

#: Peer states as shown in the status record.
WAITING, UP, DOWN = "waiting", "up", "down"


@dataclass(eq=False)
class Peer:
    """One far end: its identity (name, address, key, routes) and its live state."""

    name: str
    address: IPv4Address | None
    key: bytes = field(repr=False)
    fingerprint: str
    routes: tuple[Route, ...] = ()
    #: A second key also accepted from this peer (`nextkey`: hitless rotation), and its print.
    next_key: bytes | None = field(default=None, repr=False)
    next_fingerprint: str | None = None
    client_host: str = "0.0.0.0"
    client_port: int = 0
    # --- live state, owned by the daemon
    session: Any = None
    state: str = WAITING
    since: float = field(default_factory=time.time)
    reason: str | None = None
    endpoint: str | None = None
    session_started: float | None = None
    last_handshake: float | None = None
    rekeys: int = 0
    epoch: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_rtt: float | None = None
    drops: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    links_up: int = 0
    session_fingerprint: str | None = None  # the key the current session was opened with

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every key this peer may prove: `key`, and `next_key` while a rotation is under way."""
        return (self.key,) if self.next_key is None else (self.key, self.next_key)

    def fingerprint_of(self, key_id_hex: str) -> str | None:
        """The fingerprint of this peer's key whose key id is `key_id_hex`."""
        if self.next_key is not None and derive_key_id(self.next_key).hex() == key_id_hex:
            return self.next_fingerprint
        return self.fingerprint

    @property
    def networks(self) -> tuple[IPv4Network, ...]:
        """The peer's address (/32) and the networks behind it."""
        own = (IPv4Network(f"{self.address}/32"),) if self.address is not None else ()
        return own + tuple(r.network for r in self.routes)

    def identity(self) -> tuple[Any, ...]:
        """What a reload compares: a peer whose identity changed is cut and re-admitted."""
        return (
            self.name,
            self.address,
            self.key,
            self.next_key,
            self.routes,
            self.client_host,
            self.client_port,
        )

    def set_state(self, state: str, reason: str | None = None) -> None:
        """Move to `state` (recording since when) unless already there with the same reason."""
        if state != self.state or reason != self.reason:
            self.state, self.reason, self.since = state, reason, time.time()

    def count_drop(self, why: str, n: int = 1) -> None:
        """Count `n` packets dropped for reason `why`."""
        self.drops[why] = self.drops.get(why, 0) + n


class Router:
    """Longest-prefix match of IPv4 destinations (as ints) to values.

    One dict per prefix length, probed from the longest length down: a lookup costs at most
    as many dict probes as there are distinct prefix lengths (typically two: /32 and /24).
    """

    def __init__(self) -> None:
        self._by_len: dict[int, dict[int, Any]] = {}
        self._lengths: list[tuple[int, int]] = []  # (prefix length, mask), longest first

    def add(self, network: IPv4Network, value: Any) -> None:
        """Route `network` to `value` (a later add of the same network replaces it)."""
        plen = network.prefixlen
        if plen not in self._by_len:
            self._by_len[plen] = {}
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            self._lengths = sorted([*self._lengths, (plen, mask)], reverse=True)
        self._by_len[plen][int(network.network_address)] = value

    def lookup(self, address: int) -> Any:
        """The value of the longest prefix holding `address`, or None."""
        by_len = self._by_len
        for plen, mask in self._lengths:
            hit = by_len[plen].get(address & mask)
            if hit is not None:
                return hit
        return None


class PeerTable:
    """The peers of one daemon, indexed for the handshake (KeyRing) and the data path."""

    def __init__(self, peers: Iterable[Peer], *, hub: bool) -> None:
        self.hub = hub
        self.peers: list[Peer] = sorted(peers, key=lambda p: p.name)
        self.by_name: dict[str, Peer] = {p.name: p for p in self.peers}
        self._keys: dict[bytes, list[bytes]] = {}
        self._by_key: dict[bytes, list[Peer]] = {}
        self._by_key_address: dict[tuple[bytes, IPv4Address | None], Peer] = {}
        self._router = Router()
        self._only: Peer | None = self.peers[0] if len(self.peers) == 1 else None
        for peer in self.peers:
            for key in peer.keys:
                kid = derive_key_id(key)
                keys = self._keys.setdefault(kid, [])
                if key not in keys:
                    keys.append(key)
                self._by_key.setdefault(key, []).append(peer)
                self._by_key_address[(key, peer.address)] = peer
            for net in peer.networks:
                self._router.add(net, peer)

    def __len__(self) -> int:
        return len(self.peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self.peers)

    # ------------------------------------------------------------------ KeyRing (handshake)
    def keys_for(self, key_id: bytes) -> Sequence[bytes]:
        """The distinct keys with this key id (usually one; empty when no client has it)."""
        return self._keys.get(key_id, ())

    def admit(self, psk: bytes, address: IPv4Address | IPv6Address | None) -> Peer | None:
        """The peer holding `psk` that announced `address`; a client that announced no address
        (the protocol's first version) is admitted only when its key names one peer."""
        if address is None or not self.hub:  # a point-to-point server: the key is enough
            holders = self._by_key.get(psk, ())
            return holders[0] if len(holders) == 1 else None
        if address.version != 4:
            return None
        return self._by_key_address.get((psk, address))

    # ------------------------------------------------------------------ data path
    def route(self, dst: int) -> Peer | None:
        """The peer that packets to `dst` (an IPv4 address as int) go to, or None."""
        if self._only is not None and not self.hub:
            return self._only  # a point-to-point link sends everything to its one peer
        return self._router.lookup(dst)

    def allows(self, peer: Peer, src: int) -> bool:
        """True when `peer` may send packets from `src` (its address or a network behind it)."""
        if not self.hub:
            return True
        return self._router.lookup(src) is peer
