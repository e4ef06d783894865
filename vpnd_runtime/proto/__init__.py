"""Sans-I/O tunnel protocol core of vpnd: framing, Noise NNpsk0 handshake, sessions, timers.

Nothing here opens a socket, starts a thread, reads a clock or draws global randomness: the
caller passes bytes, `now` and `rng`.  See `connection.py` for the theory of operation.
"""

from .connection import Connection, Params, State, Stats
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import Closed, Event, KeepaliveRtt, LinkUp, Packets, PeerDead, Rekeyed
from .framing import MAX_MESSAGE, FrameDecoder, LengthFramer, encode_frame
from .handshake import ReplayGuard

__all__ = [
    "MAX_MESSAGE",
    "Closed",
    "Connection",
    "Event",
    "FrameDecoder",
    "KeepaliveRtt",
    "LengthFramer",
    "LinkUp",
    "LocalProtocolError",
    "Packets",
    "Params",
    "PeerDead",
    "ProtocolError",
    "Rekeyed",
    "RemoteProtocolError",
    "ReplayGuard",
    "State",
    "Stats",
    "encode_frame",
]
