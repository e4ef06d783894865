"""Events returned by `Connection.receive_data` and `Connection.tick`.

They are small frozen dataclasses, as in h11: the caller dispatches on their type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinkUp:
    """Both sides proved knowledge of the key and confirmed the session: traffic may flow.

    `key_id` is the 8-hex-digit id of the link key (equal on both ends); `session_id` is a short
    hex digest of the Noise handshake hash, equal on both ends and unique per session (useful in
    logs to match the two ends of one session).
    """

    key_id: str
    session_id: str = ""

    @property
    def peer_key_id(self) -> str:
        """Alias of `key_id`: the id of the key the peer authenticated with."""
        return self.key_id


@dataclass(frozen=True, slots=True)
class Packets:
    """Packets received from the peer, in order, exactly as the peer passed them to send_packets."""

    packets: list[bytes]


@dataclass(frozen=True, slots=True)
class KeepaliveRtt:
    """Our keepalive PING was answered after `rtt` seconds (caller's clock)."""

    rtt: float


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """This side now sends with the keys of `epoch` (fresh X25519 exchange, forward secrecy)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class PeerDead:
    """A timer says the peer is gone: no answer, an answer too late, or no handshake in time."""

    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer said goodbye with `reason`."""

    reason: str


Event = LinkUp | Packets | KeepaliveRtt | Rekeyed | PeerDead | Closed
