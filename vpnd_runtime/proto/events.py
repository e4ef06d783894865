"""Events returned by `Connection.receive_data` and `Connection.tick`.

They are small frozen dataclasses, as in h11: the caller dispatches on their type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from vpnd_runtime.compat import SLOTS


@dataclass(frozen=True, **SLOTS)
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


@dataclass(frozen=True)
class Packets:
    """Packets received from the peer, in order, exactly as the peer passed them to send_packets."""

    __slots__ = ("packets",)  # slotted on every Python (slots=True needs 3.10)
    packets: list[bytes]


@dataclass(frozen=True)
class KeepaliveRtt:
    """Our keepalive PING was answered after `rtt` seconds (caller's clock)."""

    __slots__ = ("rtt",)  # slotted on every Python (slots=True needs 3.10)
    rtt: float


@dataclass(frozen=True)
class Rekeyed:
    """This side now sends with the keys of `epoch` (fresh X25519 exchange, forward secrecy)."""

    __slots__ = ("epoch",)  # slotted on every Python (slots=True needs 3.10)
    epoch: int


@dataclass(frozen=True)
class PeerDead:
    """A timer says the peer is gone: no answer, an answer too late, or no handshake in time."""

    __slots__ = ("reason",)  # slotted on every Python (slots=True needs 3.10)
    reason: str


@dataclass(frozen=True)
class Closed:
    """The peer said goodbye with `reason`."""

    __slots__ = ("reason",)  # slotted on every Python (slots=True needs 3.10)
    reason: str


Event = Union[LinkUp, Packets, KeepaliveRtt, Rekeyed, PeerDead, Closed]
