"""The vpnd tunnel protocol as a sans-I/O state machine (h11 style).

Theory of operation
-------------------
A `Connection` is one end of one tunnel session.  It never touches a socket, a thread, a clock or
global randomness: the caller feeds it received bytes (`receive_data`), the time (`now`, monotonic
seconds) and randomness (`rng(n) -> n bytes`), and drains the bytes it must write
(`data_to_send`).  Timers run when the caller calls `tick(now)` at or after `next_deadline()`.

States::

    HANDSHAKE --(initiator: message 2 ok / responder: CONFIRM ok)--> ESTABLISHED
    HANDSHAKE | ESTABLISHED --(close() / peer CLOSE / PeerDead)--> CLOSED
    any --(RemoteProtocolError from the peer's bytes)--> ERROR   (terminal)

Wire protocol (every message is framed by the framer: u32 length over TCP, SLIP on serial).
Until ESTABLISHED the u32 length framer accepts frames of at most `HANDSHAKE_MAX_MESSAGE` (1 KiB;
the handshake messages are under 100 bytes), checked from the length alone before any buffer is
sized: an unauthenticated peer cannot make us buffer 256 KiB.  Meanwhile frames are decoded one
at a time, so frames that follow the handshake in the same read already get the full cap.

1. Handshake, Noise ``NNpsk0_25519_ChaChaPoly_BLAKE2s`` with prologue ``b"vpnd/1"`` (see
   `handshake.py`)::

       initiator -> 0x01 | key_id[4] | e[32] | AEAD_psk(timestamp u64 ns | cipher id | flags)
       responder <- 0x02 | e[32] | AEAD(empty)                       (after the ee DH)
       initiator -> DATA(epoch 0, counter 0, CONFIRM)                (then packets may follow)

   The responder checks, in this order and before any DH: message shape, key id ("peer uses
   another key"), the psk AEAD tag, cipher and compression agreement, and the replay guard
   (timestamp strictly newer than the last accepted for this key, within `max_skew` of our wall
   clock).  It declares `LinkUp` only on CONFIRM (on a lossy link: on any frame authenticated
   with the session keys, which proves the same), so a replayed message 1 opens no session.
   The initiator declares `LinkUp` when message 2 authenticates.  No `LinkUp` within
   `handshake_timeout` of creation: `tick` returns `PeerDead`.

2. Data: ``0x03 | epoch u32 | counter u64 | AEAD(inner)``, header as associated data, nonce =
   counter (see `session.py`), one key per direction from Noise Split().  `send_packets` batches
   packets into frames of at most `sendbuf` bytes (a bigger packet travels alone); with compress,
   each packet is deflated on its own when that shrinks it (never the batch as a whole: that
   let one flow's frame lengths reveal another flow's bytes).  Over TCP (`lossy=False`) any bad
   tag, gap, reorder or replay is a RemoteProtocolError; with `lossy=True` (serial) a frame that
   fails before authentication is dropped and counted in `stats.drops[reason]`, and counters only
   have to increase.  A frame with a bad tag never produces a `Packets` event.  Once a frame has
   authenticated, a malformed inner message is the keyed peer's fault and a RemoteProtocolError
   in both modes; in particular a zero-length packet inside a PACKETS batch (`send_packets`
   refuses to send one).  A batch with no packet at all is valid (see rekey).

3. Rekey (forward secrecy per epoch, no packet lost; key confirmation as in WireGuard): the
   initiator starts it when its epoch is `keyttl` old or a counter of the epoch reaches
   `rekey_after_messages`.  It sends REKEY_INIT(n+1, e') in epoch n; the responder answers
   REKEY_RESP(n+1, f') in epoch n, installs the receive key of n+1 and keeps *sending* in epoch n.
   The initiator switches its sending to n+1 on REKEY_RESP (`Rekeyed`) and at once sends an empty
   PACKETS message (no packet) in n+1.  The responder switches its sending to n+1 (`Rekeyed`) only
   when the first frame of n+1 from the initiator authenticates, which proves the initiator got
   REKEY_RESP: a lost REKEY_RESP can never leave the responder sending in an epoch the initiator
   cannot read.  The keys of n+1 are HKDF(chaining key of n, X25519(e', f')).  A receiver keeps
   the old epoch's key until the first frame of the new epoch authenticates, so frames still in
   flight are accepted; over TCP the order is strict, so every frame of n arrives before the first
   of n+1 and nothing is lost, reordered or accepted twice.  On a lossy link the initiator repeats
   REKEY_INIT every `keepalive` until answered (the responder repeats the same answer, in epoch
   n); if the empty frame of n+1 is lost, the initiator's next frame (at the latest its next PING)
   completes the switch.  Until the responder has switched, the initiator starts no new rekey on
   the responder's message count.  The responder gives up (`PeerDead`) when its sending epoch is
   older than 2 x keyttl + handshake_timeout + keepalive (counted from the REKEY_INIT that created
   it): the initiator must renew keys, and complete the switch, well before that.

4. Keepalive: each side sends PING every `keepalive` seconds once established; the peer answers
   PONG at once (`KeepaliveRtt`, `stats.last_rtt`).  At each keepalive instant, if nothing
   authenticated arrived since the previous PING, `stats.missed_keepalives` grows; any
   authenticated inbound message resets it.  When it reaches `noanswer`, `tick` returns
   `PeerDead`.  A link cut silently at time T is therefore declared dead after more than
   keepalive x noanswer and at most keepalive x (noanswer + 1) seconds.  With `maxdelay`, a
   PING unanswered for longer than `maxdelay` (or a PONG arriving later) is `PeerDead` too.

5. Goodbye: `close(reason)` queues CLOSE(reason) when established; the peer gets `Closed`.

6. Datagrams (UDP, `Params.datagram`): each message travels alone in one datagram, no framer, no
   message ever spans two datagrams, and every datagram starts with the *receiver's* session index
   (u32, WireGuard's receiver index) so one socket can serve many clients and a client may change
   address (the server follows the newest source whose datagram authenticated)::

       message 1:  0 u32 | message 1 | initiator index u32                (87 bytes)
       message 2:  initiator index u32 | message 2 | responder index u32  (57 bytes: smaller than
                   message 1, so a responder never amplifies, and it answers only after the psk
                   tag of message 1 verified)
       data:       receiver index u32 | 0x03 | epoch | counter | AEAD(inner)

   The caller strips the leading index (it chose the session by it) and hands the rest to
   `receive_datagrams`; `datagrams_to_send` returns whole datagrams, index included.  Loss and
   reordering are normal: frames failing before authentication are dropped and counted (as on a
   lossy line), and the counter check is a sliding window of 2,048 (`session.ReplayWindow`): a
   replayed or too old frame is dropped and counted under "replay".  The initiator retransmits
   message 1 (a fresh one: new ephemeral key and timestamp, so the replay guard accepts it) after
   `HS_RETRY` seconds, doubling up to `HS_RETRY_MAX`, until message 2 authenticates or the
   handshake deadline passes; a message 2 that fails (an answer to an older message 1) leaves the
   handshake state untouched.  Until an authenticated frame from the responder arrives, the
   initiator pings every `HS_RETRY` seconds, so a lost CONFIRM is made good at once.  REKEY_INIT
   is retransmitted the same way (backoff from `HS_RETRY` up to `keepalive`), and a receiver keeps
   the previous epoch's key after switching, so frames of epoch n that arrive after the first of
   n+1 (reordering) still open: a rekey loses no packet.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import LocalProtocolError, RemoteProtocolError
from .events import Closed, Event, KeepaliveRtt, LinkUp, Packets, PeerDead, Rekeyed
from .framing import HANDSHAKE_MAX_MESSAGE, Framer, LengthFramer
from .handshake import (
    FLAG_COMPRESS,
    FLAG_COMPRESS_BATCH,
    MSG1_BODY_LEN,
    MSG1_BODY_LEN_V0,
    MSG2_BODY_LEN,
    InitPayload,
    NoiseHandshake,
    ReplayGuard,
    SessionKeys,
    dh,
    encode_address,
    generate_keypair,
)
from .kdf import key_id as derive_key_id
from .session import (
    CIPHER_NAMES,
    CIPHERS,
    COUNTER_LIMIT,
    FRAMED_HEADER,
    HEADER,
    HEADER_LEN,
    INNER_CLOSE,
    INNER_CONFIRM,
    INNER_PACKETS,
    INNER_PING,
    INNER_PONG,
    INNER_REKEY_INIT,
    INNER_REKEY_RESP,
    MAX_BODY,
    MAX_PACKET,
    MSG_DATA,
    MSG_INIT,
    MSG_RESP,
    NONCE,
    REKEY,
    RING_WORDS,
    TAG_LEN,
    U32,
    U64,
    FrameRejected,
    RecvState,
    SendState,
    decode_close,
    decode_packets,
    encode_close,
    make_aead,
    packets_inner,
    rekey_keys,
)

Role = Literal["initiator", "responder"]

#: Datagram mode: first retransmission delay of handshake and rekey messages, and its cap.
HS_RETRY = 1.0
HS_RETRY_MAX = 8.0
#: Size of the session index that starts every datagram.
INDEX_LEN = 4
_ZERO_INDEX = bytes(INDEX_LEN)


class KeyRing(Protocol):
    """A hub's keys, for a responder that serves many clients (see `Connection`'s keyring)."""

    def keys_for(self, key_id: bytes) -> Sequence[bytes]:
        """The distinct psks whose key id is `key_id` (usually one, empty when unknown)."""
        ...

    def admit(self, psk: bytes, address: IPv4Address | IPv6Address | None) -> Any:
        """The client that holds `psk` and announced `address`, or None to refuse."""
        ...


class State(enum.Enum):
    """Where a Connection is in its life (see the module docstring)."""

    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True)
class Params:
    """Tunables of one connection; both ends must agree on `cipher` and `compress`.

    sendbuf: most bytes of packets gathered into one sealed frame (compressed packet by packet);
    capped at 262,144.  keyttl: session key lifetime in seconds.  maxdelay: drop the link when a
    keepalive answer takes longer (None: never).  lossy: the transport may destroy frames
    (serial): damaged frames are dropped and counted instead of ending the connection.
    datagram: each message is one datagram (UDP): lossy, reordered, with a replay window and
    session indexes (see the module docstring, section 6); `sendbuf` is then the most bytes of
    packets per datagram.
    """

    cipher: str = "chacha20-poly1305"
    compress: bool = False
    compress_level: int = 1
    keepalive: float = 10.0
    noanswer: int = 3
    keyttl: float = 120.0
    rekey_after_messages: int = 2**40
    maxdelay: float | None = None
    handshake_timeout: float = 10.0
    sendbuf: int = 65536
    lossy: bool = False
    datagram: bool = False

    def __post_init__(self) -> None:
        if self.cipher not in CIPHERS:
            raise ValueError(
                f"Params.cipher: unknown cipher {self.cipher!r} (choose from {', '.join(CIPHERS)})"
            )
        if not 1 <= self.compress_level <= 9:
            raise ValueError(f"Params.compress_level must be 1..9, got {self.compress_level}")
        for name in ("keepalive", "keyttl", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Params.{name} must be positive, got {getattr(self, name)}")
        if self.noanswer < 1:
            raise ValueError(f"Params.noanswer must be at least 1, got {self.noanswer}")
        if self.rekey_after_messages < 1:
            raise ValueError(
                f"Params.rekey_after_messages must be at least 1, got {self.rekey_after_messages}"
            )
        if self.maxdelay is not None and not self.maxdelay > 0:
            raise ValueError(f"Params.maxdelay must be positive or None, got {self.maxdelay}")
        if self.sendbuf < 1:
            raise ValueError(f"Params.sendbuf must be positive, got {self.sendbuf}")


@dataclass
class Stats:
    """Counters of one connection, updated in place (the daemon copies them to its status).

    bytes_in/out are sums of packet lengths as given to/returned by the API; wire_bytes_* count
    transport bytes; frames_* count framed messages; drops counts discarded frames by reason
    (lossy mode only).
    """

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    wire_bytes_in: int = 0
    wire_bytes_out: int = 0
    rekeys: int = 0
    epoch: int = 0
    last_rtt: float | None = None
    missed_keepalives: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    established_at: float | None = None


_MSG1_LEN = 1 + 4 + MSG1_BODY_LEN
_MSG1_LEN_V0 = 1 + 4 + MSG1_BODY_LEN_V0
_MSG2_LEN = 1 + MSG2_BODY_LEN
_MIN_DATA = HEADER_LEN + TAG_LEN
_FRAMED_LEN = 4 + HEADER_LEN  # a data frame's u32 length and header
_CONFIRM = bytes([INNER_CONFIRM])
#: A PACKETS message with no packet: the initiator's first frame of a new epoch (key confirmation).
_EMPTY_PACKETS = bytes([INNER_PACKETS, 0])
#: The head of an uncompressed PACKETS message.
_PACKETS_PLAIN = b"\x01\x00"


class Connection:
    """One end of a vpnd tunnel session; see the module docstring for the protocol.

    `wall` (optional) is the caller's wall-clock time (`time.time()`) at `now`; the initiator
    needs it (here or in `start`) for the handshake timestamp, the responder uses it to refuse
    handshakes whose timestamp is more than the guard's `max_skew` away.  `replay_guard` should be
    shared by all responder connections of a process; without one a private guard is used (a
    replayed message 1 still opens no session, but costs the responder a DH).
    """

    def __init__(
        self,
        role: Role,
        psk: bytes | None,
        params: Params,
        rng: Callable[[int], bytes],
        now: float,
        *,
        framer: Framer | None = None,
        replay_guard: ReplayGuard | None = None,
        wall: float | None = None,
        announce: IPv4Address | IPv6Address | None = None,
        keyring: KeyRing | None = None,
        index: int = 0,
    ) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', got {role!r}")
        if keyring is not None and role != "responder":
            raise ValueError("only a responder picks its key from a keyring")
        if psk is None and keyring is None:
            raise ValueError("a psk is required (or, for a responder, a keyring)")
        if psk is not None and len(psk) != 32:
            raise ValueError(f"psk must be 32 bytes, got {len(psk)}")
        self.role: Role = role
        self.params = params
        self.state = State.HANDSHAKE
        self.stats = Stats()
        self._initiator = role == "initiator"
        self._keyring = keyring
        self._psk = bytes(psk) if psk is not None else b""
        self._key_id = derive_key_id(self._psk) if psk is not None else b""
        self._peer_key_id: bytes | None = None
        self._announce = encode_address(announce)
        #: Responder: the initiator's announced tunnel address (None: not announced).
        self.peer_address: IPv4Address | IPv6Address | None = None
        #: Responder with a keyring: what `keyring.admit` returned for this peer.
        self.peer: Any = None
        self._rng = rng
        self._framer: Framer = framer if framer is not None else LengthFramer()
        self._length_framed = type(self._framer) is LengthFramer
        self._full_cap = 0
        if self._length_framed:
            lf: LengthFramer = self._framer  # type: ignore[assignment]
            self._full_cap = lf.max_message
            lf.set_cap(min(HANDSHAKE_MAX_MESSAGE, self._full_cap), "before the handshake completes")
        self._guard = replay_guard if replay_guard is not None else ReplayGuard()
        self._created = now
        self._wall0 = wall
        # The initiator's handshake between messages 1 and 2 only: dropped once the transport
        # keys are installed (it holds the chaining key and the ephemeral private key).
        self._hs: NoiseHandshake | None = None
        self._hs_deadline = now + params.handshake_timeout
        self._started = False
        self._awaiting_confirm = False
        self._last_drop: str | None = None
        self._session_id = ""
        self._out: list[bytes] = []
        self._dgram = params.datagram
        self._lossy = params.lossy or params.datagram
        if self._dgram and not 0 < index < 2**32:
            raise ValueError(f"a datagram connection needs a session index 1..2**32-1, got {index}")
        #: Datagram mode: our session index (the peer puts it first in what it sends us).
        self.index = index
        self._index_b = U32.pack(index) if self._dgram else b""
        self._peer_index_b = _ZERO_INDEX
        self._hs_retry_at: float | None = None
        self._hs_backoff = HS_RETRY
        self._heard = False  # datagram initiator: an authenticated frame came from the responder
        self._rekey_backoff = HS_RETRY
        self._cipher_id = CIPHERS[params.cipher][0]
        self._flags = FLAG_COMPRESS if params.compress else 0
        self._batch_limit = min(params.sendbuf, MAX_BODY)
        #: `send_one` / `receive_packets` apply: u32 length framing, no compression, reliable.
        self._lone_ok = self._length_framed and not params.compress and not self._lossy
        # session
        self._send: SendState | None = None
        # responder during a rekey: the sending half of epoch n+1, used once the initiator's
        # first frame of n+1 authenticates
        self._next_send: SendState | None = None
        self._recv: dict[int, RecvState] = {}
        self._recv_epoch = 0
        self._ck = b""
        # keepalive
        self._next_ping = 0.0
        self._ping_id = 0
        self._ping_sent_at: float | None = None
        self._ping_outstanding: int | None = None
        self._last_in = now
        # rekey (initiator: pending exchange; responder: last answer, for lossy retransmits)
        self._rekey_priv: X25519PrivateKey | None = None
        self._rekey_msg: bytes | None = None
        self._rekey_target = 0
        self._rekey_retry_at: float | None = None
        self._rekey_answer: tuple[bytes, bytes] | None = None  # (REKEY_INIT seen, REKEY_RESP sent)

    # ------------------------------------------------------------------ identity and status
    @property
    def key_id(self) -> str:
        """Hex id of our link key (8 digits)."""
        return self._key_id.hex()

    @property
    def peer_key_id(self) -> str | None:
        """Hex id of the key the peer used, once seen in a handshake."""
        return self._peer_key_id.hex() if self._peer_key_id is not None else None

    @property
    def session_id(self) -> str:
        """Short hex id of the session (equal on both ends), '' before the handshake."""
        return self._session_id

    def session_age(self, now: float) -> float:
        """Seconds since LinkUp (0.0 before)."""
        at = self.stats.established_at
        return 0.0 if at is None else max(0.0, now - at)

    def _wall_at(self, now: float) -> float | None:
        return None if self._wall0 is None else self._wall0 + (now - self._created)

    # ------------------------------------------------------------------ public API
    def start(self, now: float, wall: float | None = None) -> None:
        """Initiator: queue handshake message 1.  `wall` = time.time() unless given at creation."""
        if not self._initiator:
            raise LocalProtocolError("only the initiator starts the handshake")
        if self._started:
            raise LocalProtocolError("start() was already called")
        self._check_usable()
        if wall is None:
            wall = self._wall_at(now)
        if wall is None:
            raise LocalProtocolError(
                "start() needs the wall-clock time (wall=time.time()) for the handshake timestamp"
            )
        self._started = True
        self._send_message1(wall)
        if self._dgram:
            self._hs_retry_at = now + self._hs_backoff

    def _send_message1(self, wall: float) -> None:
        hs = NoiseHandshake(True, self._psk)
        stamp = int(wall * 1e9)
        payload = InitPayload(stamp, self._cipher_id, self._flags, self._announce).encode()
        body = hs.write_message1(self._rng, payload)
        self._hs = hs
        self._emit_handshake(bytes([MSG_INIT]) + self._key_id + body)

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the transport; return the events they complete, in order.

        Raises RemoteProtocolError (state becomes ERROR) when the peer's bytes are unacceptable;
        the events completed before the bad message are attached to it as `.events`.  After
        CLOSED, input is ignored.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("receive_data on a connection in ERROR state")
        if self.state is State.CLOSED:
            return []
        if self._dgram:
            return self.receive_datagrams([data], now)
        self.stats.wire_bytes_in += len(data)
        events: list[Event] = []
        msgs: Sequence[bytes | memoryview]
        try:
            if self._length_framed:
                framer: LengthFramer = self._framer  # type: ignore[assignment]
                if self.state is State.HANDSHAKE:
                    # One frame at a time under the small cap, until the handshake completes.
                    while self.state is State.HANDSHAKE:
                        msgs = framer.decode(data, 1)
                        data = b""
                        if not msgs:
                            return events
                        self._process(msgs, now, events)
                    if self.state is not State.ESTABLISHED:
                        return events
                msgs = framer.decode_views(data)
            else:
                msgs = self._framer.decode(data)
            self._process(msgs, now, events)
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            exc.events = events  # type: ignore[attr-defined]
            raise
        return events

    def receive_datagrams(self, msgs: Sequence[bytes | memoryview], now: float) -> list[Event]:
        """Datagram mode: feed received datagrams, each without its leading session index.

        Frames that fail before authentication are dropped and counted; RemoteProtocolError
        only for what an authenticated peer did wrong (state becomes ERROR, as `receive_data`).
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("receive_datagrams on a connection in ERROR state")
        if self.state is State.CLOSED:
            return []
        self.stats.wire_bytes_in += sum(map(len, msgs)) + INDEX_LEN * len(msgs)
        events: list[Event] = []
        try:
            if self.state is State.ESTABLISHED and not self._awaiting_confirm:
                self._fast_datagrams(msgs, now, events)
            else:
                self._process(msgs, now, events)
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            exc.events = events  # type: ignore[attr-defined]
            raise
        return events

    def _fast_datagrams(
        self, msgs: Sequence[bytes | memoryview], now: float, events: list[Event]
    ) -> None:
        """The established session's hot path: data frames of the current epoch whose inner
        message is PACKETS are opened here and their packets gathered into one `Packets` event;
        anything else goes through `_handle`, in order (pending packets are emitted first).

        An in-order frame (counter above the window's top, the common case) is checked and
        marked here with the window's state in locals (`ReplayWindow.mark` and `RecvState.open`
        inlined, the tag checked before the window moves); the state is written back before
        anything else (`RecvState.open` for an older counter, `_after_open`, `_handle`) runs
        and read again after it, so the window means exactly what it means there."""
        stats = self.stats
        stats.frames_in += len(msgs)
        epoch_now = self._recv_epoch
        rs = self._recv.get(epoch_now)
        unpack = HEADER.unpack_from
        nonce = NONCE.pack
        u32 = U32.unpack_from
        # rs.window is never None in datagram mode; wtop is its top while `rs` is bound here.
        window = rs.window if rs is not None else None
        ring = window._ring if window is not None else []
        wtop = window.top if window is not None else -1
        wblock = wtop >> 6 if wtop >= 0 else -1
        decrypt = rs.aead.decrypt if rs is not None else None
        packets: list[bytes] = []
        top = -1
        ok = 0
        for msg in msgs:
            if len(msg) >= _MIN_DATA and msg[0] == MSG_DATA and window is not None:
                _, epoch, counter = unpack(msg)
                if epoch == epoch_now:
                    if counter > wtop:
                        try:
                            inner = decrypt(nonce(counter), msg[HEADER_LEN:], msg[:HEADER_LEN])
                        except InvalidTag:
                            self._count_drop("bad_tag", "bad authentication tag on a data frame")
                            continue
                        block = counter >> 6
                        if block != wblock:
                            for k in range(1, min(block - wblock, RING_WORDS) + 1):
                                ring[(wblock + k) % RING_WORDS] = 0
                            wblock = block
                        ring[block % RING_WORDS] |= 1 << (counter & 63)
                        wtop = top = counter
                    else:
                        window.top = wtop
                        rs.next_counter = wtop + 1
                        try:
                            inner = rs.open(msg, counter, True)
                        except FrameRejected as exc:
                            self._count_drop(exc.drop, exc.reason)
                            continue
                        top = max(top, counter)
                    ok += 1
                    n = len(inner)
                    if n > 6 and inner[0] == INNER_PACKETS and inner[1] == 0:
                        if u32(inner, 2)[0] == n - 6:
                            packets.append(inner[6:])
                        else:
                            packets += decode_packets(inner)
                        continue
                    if packets:
                        self._fast_packets(packets, events)
                        packets = []
                    window.top = wtop
                    rs.next_counter = wtop + 1
                    self._after_open(inner, epoch, counter, now, events)
                    if self.state is not State.ESTABLISHED:
                        window = None  # written back above; nothing more to write
                        break
                    epoch_now, rs, window, ring, wtop, wblock, decrypt = self._fast_state()
                    continue
            if packets:
                self._fast_packets(packets, events)
                packets = []
            if window is not None:
                window.top = wtop
                rs.next_counter = wtop + 1
            try:
                self._handle(msg, now, events)  # type: ignore[arg-type]
            except FrameRejected as exc:
                self._count_drop(exc.drop, exc.reason)
            if self.state is not State.ESTABLISHED:
                window = None
                break
            epoch_now, rs, window, ring, wtop, wblock, decrypt = self._fast_state()
        if window is not None:
            window.top = wtop
            rs.next_counter = wtop + 1
        if packets:
            self._fast_packets(packets, events)
        if ok:
            self.accepted += ok
            self._heard = True
            self._last_in = now
            stats.missed_keepalives = 0
            if (
                self._initiator
                and top >= self.params.rekey_after_messages
                and self._rekey_priv is None
                and self.state is State.ESTABLISHED
            ):
                self._maybe_rekey(now)

    def _fast_state(self) -> tuple[int, Any, Any, list[int], int, int, Any]:
        """`_fast_datagrams`' locals for the current receive epoch (after a message that may
        have changed it): epoch, RecvState, window, its ring, top, top's word, decrypt."""
        epoch = self._recv_epoch
        rs = self._recv.get(epoch)
        if rs is None or rs.window is None:
            return epoch, rs, None, [], -1, -1, None
        window = rs.window
        wtop = window.top
        return (
            epoch,
            rs,
            window,
            window._ring,
            wtop,
            wtop >> 6 if wtop >= 0 else -1,
            rs.aead.decrypt,
        )

    def _fast_packets(self, packets: list[bytes], events: list[Event]) -> None:
        stats = self.stats
        stats.packets_in += len(packets)
        stats.bytes_in += sum(map(len, packets))
        events.append(Packets(packets))

    def datagrams_to_send(self) -> list[bytes]:
        """Datagram mode: drain the queued datagrams (each whole, index first)."""
        out = self._out
        if not out:
            return []
        self._out = []
        self.stats.wire_bytes_out += sum(map(len, out))
        return out

    #: Authenticated frames accepted so far (the daemon's roaming rule: a source whose datagram
    #: moved this counter is the peer's current address).
    accepted = 0

    def _process(self, msgs: Sequence[bytes | memoryview], now: float, events: list[Event]) -> None:
        """Handle decoded messages in order; in lossy mode count and skip the rejected ones."""
        self.stats.frames_in += len(msgs)
        for msg in msgs:
            try:
                if msg and msg[0] == MSG_DATA:
                    self._handle_data(msg, now, events)  # type: ignore[arg-type]
                else:
                    self._handle(msg, now, events)  # type: ignore[arg-type]
            except FrameRejected as exc:
                if not self._lossy:
                    raise
                self._count_drop(exc.drop, exc.reason)
            if self.state is not State.HANDSHAKE and self.state is not State.ESTABLISHED:
                break

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        """Seal `packets` into data frames (batches of at most `sendbuf` bytes) and queue them.

        Raises LocalProtocolError (nothing sent) for a packet above MAX_PACKET bytes or an empty
        one (the peer would refuse it as malformed).
        """
        if self.state is not State.ESTABLISHED:
            self._check_usable()
            raise LocalProtocolError(
                f"cannot send packets before the link is up (state {self.state.value})"
            )
        send = self._send
        if send is None:  # pragma: no cover - ESTABLISHED always has keys
            raise LocalProtocolError("no send key")
        limit = self._batch_limit
        compress = self.params.compress
        level = self.params.compress_level
        if self._dgram:
            prefix = self._peer_index_b
            seal_prefixed = send.seal_prefixed

            def seal(inner: bytes) -> bytes:
                return seal_prefixed(prefix, inner)

        elif self._length_framed:
            seal = send.seal_framed
        else:
            framer_encode = self._framer.encode
            send_seal = send.seal

            def seal(inner: bytes) -> bytes:
                return framer_encode(send_seal(inner))

        out = self._out
        pack = U32.pack
        parts: list[bytes] = [b"\x01\x00"]
        size = 0
        count = 0
        total = 0
        nbatch = 0
        stats = self.stats
        if packets:
            if (biggest := max(map(len, packets))) > MAX_PACKET:
                raise LocalProtocolError(
                    f"packet of {biggest} bytes exceeds the {MAX_PACKET}-byte limit (nothing sent)"
                )
            if not min(map(len, packets)):
                raise LocalProtocolError("zero-length packet (nothing sent)")
        if self._dgram and not compress:
            # Datagrams: each batch (one MTU's worth) sealed straight behind the peer's index.
            nbatch = send.seal_datagrams(self._peer_index_b, packets, limit, out)
            stats.packets_out += len(packets)
            stats.bytes_out += sum(map(len, packets))
            stats.frames_out += nbatch
            if self._initiator:
                self._maybe_rekey(now)
            return
        for p in packets:
            n = len(p)
            if count and size + n + 4 > limit:
                out.append(seal(packets_inner(parts, compress, level)))
                nbatch += 1
                parts = [b"\x01\x00"]
                size = 0
                count = 0
            parts.append(pack(n))
            parts.append(p)
            size += n + 4
            count += 1
            total += n
        if count:
            out.append(seal(packets_inner(parts, compress, level)))
            nbatch += 1
        stats.packets_out += len(packets)
        stats.bytes_out += total
        stats.frames_out += nbatch
        if self._initiator:
            self._maybe_rekey(now)

    def send_one(self, packet: bytes, now: float) -> bytes | None:
        """The lone-packet path (issue 15): seal one packet and return its whole frame, exactly
        what `send_packets([packet], now)` then `data_to_send()` return (same counter, header,
        inner message and stats), or None, having changed nothing, when this path does not
        apply: not established, compression, datagrams or a lossy line, output already queued
        (order), a packet of 0 or more than MAX_PACKET bytes, or (initiator) a rekey due by
        age or count, so the caller takes the general path, which does what is due. Sealing
        changes no timer, so the caller need not refile the connection's deadline."""
        send = self._send
        if (
            send is None
            or self.state is not State.ESTABLISHED
            or not self._lone_ok
            or self._out
            or not 0 < (n := len(packet)) <= MAX_PACKET
        ):
            return None
        c = send.counter
        if c + 1 >= COUNTER_LIMIT:
            return None
        if self._initiator:  # what `_maybe_rekey` checks after sealing: due, let it run
            p = self.params
            rs = self._recv.get(self._recv_epoch) if self._recv_epoch == send.epoch else None
            if (
                self._rekey_priv is not None
                or c + 1 >= p.rekey_after_messages
                or now - send.started >= p.keyttl
                or (rs is not None and rs.next_counter >= p.rekey_after_messages)
            ):
                return None
        send.counter = c + 1
        prefix = FRAMED_HEADER.pack(HEADER_LEN + 6 + n + TAG_LEN, MSG_DATA, send.epoch, c)
        frame = prefix + send.aead.encrypt(
            NONCE.pack(c), _PACKETS_PLAIN + U32.pack(n) + packet, prefix[4:]
        )
        stats = self.stats
        stats.packets_out += 1
        stats.bytes_out += n
        stats.frames_out += 1
        stats.wire_bytes_out += len(frame)
        return frame

    def receive_packets(self, data: bytes, now: float) -> list[bytes] | None:
        """The lone-frame path (issue 15): when `data` is exactly one whole data frame of the
        current epoch with the next counter, whose inner message is PACKETS, return its packets
        (the `Packets` event `receive_data(data, now)` would give, with the same stats and
        counters). None, having changed nothing, whenever the general path must run (anything
        else: partial or several frames, handshake, a new epoch, a bad tag, another inner
        message, a lossy line, compression): the caller then calls `receive_data(data, now)`.
        A malformed PACKETS body raises RemoteProtocolError as `receive_data` would (state
        ERROR). No timer changes here."""
        if self.state is not State.ESTABLISHED or self._awaiting_confirm or not self._lone_ok:
            return None
        n = len(data)
        if n < 4 + _MIN_DATA or type(data) is not bytes:
            return None
        framer: LengthFramer = self._framer  # type: ignore[assignment]
        length, kind, epoch, counter = FRAMED_HEADER.unpack_from(data)
        if (
            length + 4 != n
            or kind != MSG_DATA
            or epoch != self._recv_epoch
            or length > framer.max_message
            or framer._buf
        ):
            return None
        rs = self._recv.get(epoch)
        if (
            rs is None
            or counter != rs.next_counter
            or (self._initiator and counter >= self.params.rekey_after_messages)
        ):
            return None
        try:
            inner = rs.aead.decrypt(
                NONCE.pack(counter), memoryview(data)[_FRAMED_LEN:], data[4:_FRAMED_LEN]
            )
        except InvalidTag:
            return None  # the general path says why, and ends the session
        if len(inner) < 2 or inner[0] != INNER_PACKETS:
            return None  # PING, PONG, rekey, CLOSE: rare, the general path opens it again
        rs.next_counter = counter + 1
        stats = self.stats
        stats.wire_bytes_in += n
        stats.frames_in += 1
        self.accepted += 1
        self._heard = True
        self._last_in = now
        stats.missed_keepalives = 0
        m = len(inner)
        if m > 6 and not inner[1] and U32.unpack_from(inner, 2)[0] == m - 6:
            packets = [inner[6:]]
        else:
            try:
                packets = decode_packets(inner)
            except RemoteProtocolError as exc:
                self.state = State.ERROR
                exc.events = []  # type: ignore[attr-defined]
                raise
        if packets:
            stats.packets_in += len(packets)
            stats.bytes_in += sum(map(len, packets))
        return packets

    def tick(self, now: float) -> list[Event]:
        """Run the timers due at `now`: handshake deadline, keepalive/noanswer, maxdelay, rekey."""
        if self.state is not State.HANDSHAKE and self.state is not State.ESTABLISHED:
            return []
        events: list[Event] = []
        p = self.params
        if self.state is State.HANDSHAKE:
            if now >= self._hs_deadline:
                why = f"no handshake completed within {p.handshake_timeout:g} s"
                if self._last_drop:
                    why += f" (last frame dropped: {self._last_drop})"
                self._dead(why, events)
            elif (
                self._hs_retry_at is not None
                and now >= self._hs_retry_at
                and self._send is None
                and (wall := self._wall_at(now)) is not None
            ):
                # Datagram initiator: message 1 or 2 was lost; a fresh message 1 (new ephemeral
                # key, newer timestamp) rather than a copy, which the replay guard would refuse.
                self._send_message1(wall)
                self.stats.drops["handshake_retry"] = self.stats.drops.get("handshake_retry", 0) + 1
                self._hs_backoff = min(self._hs_backoff * 2, HS_RETRY_MAX)
                self._hs_retry_at = now + self._hs_backoff
            return events
        if (
            p.maxdelay is not None
            and self._ping_outstanding is not None
            and self._ping_sent_at is not None
            and now - self._ping_sent_at > p.maxdelay
        ):
            self._dead(f"keepalive not answered within maxdelay {p.maxdelay:g} s", events)
            return events
        send = self._send
        if not self._initiator and send is not None and now >= self._stale_deadline(send):
            self._dead("the peer did not renew the session key in time", events)
            return events
        if now >= self._next_ping:
            if self._ping_sent_at is not None and self._last_in < self._ping_sent_at:
                self.stats.missed_keepalives += 1
            else:
                self.stats.missed_keepalives = 0
            if self.stats.missed_keepalives >= p.noanswer:
                self._dead(
                    f"no answer from peer: {self.stats.missed_keepalives} keepalive intervals "
                    f"of {p.keepalive:g} s without a message",
                    events,
                )
                return events
            self._ping_id += 1
            self._ping_outstanding = self._ping_id
            self._ping_sent_at = now
            self._next_ping = now + p.keepalive
            if self._dgram and self._initiator and not self._heard:
                self._next_ping = now + min(p.keepalive, HS_RETRY)  # see section 6
            self._seal_inner(bytes([INNER_PING]) + U64.pack(self._ping_id))
        if self._initiator:
            self._maybe_rekey(now)
        return events

    def data_to_send(self) -> bytes:
        """Drain the bytes queued for the transport (b"" when none)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.stats.wire_bytes_out += len(data)
        return data

    def next_deadline(self) -> float | None:
        """The time at which `tick` must next be called (None: no timer is running)."""
        if self.state is State.HANDSHAKE:
            if self._hs_retry_at is not None and self._send is None:
                return min(self._hs_deadline, self._hs_retry_at)
            return self._hs_deadline
        if self.state is not State.ESTABLISHED:
            return None
        p = self.params
        deadlines = [self._next_ping]
        if (
            p.maxdelay is not None
            and self._ping_outstanding is not None
            and self._ping_sent_at is not None
        ):
            deadlines.append(self._ping_sent_at + p.maxdelay)
        send = self._send
        if send is not None:
            if self._initiator:
                if self._rekey_priv is None:
                    deadlines.append(send.started + p.keyttl)
                elif self._rekey_retry_at is not None:
                    deadlines.append(self._rekey_retry_at)
            else:
                deadlines.append(self._stale_deadline(send))
        return min(deadlines)

    def close(self, reason: str) -> None:
        """Queue a goodbye (when established) and move to CLOSED.  No-op when already over."""
        if self.state is State.ESTABLISHED and self._send is not None:
            self._seal_inner(encode_close(reason))
        if self.state is State.HANDSHAKE or self.state is State.ESTABLISHED:
            self.state = State.CLOSED

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection is in ERROR state")
        if self.state is State.CLOSED:
            raise LocalProtocolError("the connection is closed")

    def _emit(self, msg: bytes) -> None:
        self._out.append(self._framer.encode(msg))
        self.stats.frames_out += 1

    def _emit_handshake(self, msg: bytes) -> None:
        """A handshake message: framed, or (datagram) between the receiver's index and ours."""
        if self._dgram:
            self._out.append(self._peer_index_b + msg + self._index_b)
            self.stats.frames_out += 1
        else:
            self._emit(msg)

    def _seal_inner(self, inner: bytes) -> None:
        send = self._send
        if send is None:  # pragma: no cover - callers check
            raise LocalProtocolError("no send key")
        if self._dgram:
            self._out.append(send.seal_prefixed(self._peer_index_b, inner))
            self.stats.frames_out += 1
        else:
            self._emit(send.seal(inner))

    def _count_drop(self, kind: str, reason: str) -> None:
        self.stats.drops[kind] = self.stats.drops.get(kind, 0) + 1
        self._last_drop = reason

    def _dead(self, reason: str, events: list[Event]) -> None:
        self.state = State.CLOSED
        events.append(PeerDead(reason))

    def _stale_deadline(self, send: SendState) -> float:
        p = self.params
        return send.started + 2 * p.keyttl + p.handshake_timeout + p.keepalive

    def _handle(self, msg: bytes, now: float, events: list[Event]) -> None:
        if not msg:
            raise FrameRejected("empty message", "malformed")
        kind = msg[0]
        if kind == MSG_DATA:
            self._handle_data(msg, now, events)
        elif kind == MSG_INIT:
            self._handle_init(msg, now)
        elif kind == MSG_RESP:
            self._handle_resp(msg, now, events)
        else:
            raise FrameRejected(f"unknown message type 0x{kind:02x}", "malformed")

    def _handle_init(self, msg: bytes, now: float) -> None:
        if self._initiator or self._send is not None:
            raise FrameRejected("unexpected handshake message 1", "unexpected")
        trailer = INDEX_LEN if self._dgram else 0
        if len(msg) - trailer not in (_MSG1_LEN, _MSG1_LEN_V0):
            raise FrameRejected(f"handshake message 1 of {len(msg)} bytes", "malformed")
        if trailer:
            peer_index = bytes(msg[-INDEX_LEN:])
            if peer_index == _ZERO_INDEX:
                raise FrameRejected("handshake message 1 with session index 0", "malformed")
            msg = msg[:-INDEX_LEN]
        kid = bytes(msg[1:5])
        if self._keyring is not None:
            # A hub: the key id selects the candidate keys in O(1) (ids of distinct keys
            # collide only by chance, so there is almost always exactly one).
            candidates = self._keyring.keys_for(kid)
            if not candidates:
                raise FrameRejected(f"no client uses this key (key id {kid.hex()})", "other_key")
        elif kid != self._key_id:
            raise FrameRejected(
                f"peer uses another key (key id {kid.hex()}, ours {self.key_id})", "other_key"
            )
        else:
            candidates = (self._psk,)
        failure: RemoteProtocolError | None = None
        for psk in candidates:
            hs = NoiseHandshake(False, psk)
            try:
                raw = hs.read_message1(msg[5:])
            except RemoteProtocolError as exc:
                failure = exc
                continue
            break
        else:
            reason = failure.reason if failure is not None else "no key"
            raise FrameRejected(reason, "bad_handshake")
        payload = InitPayload.decode(raw)
        if payload.cipher_id != self._cipher_id:
            theirs = CIPHER_NAMES.get(payload.cipher_id, f"unknown cipher {payload.cipher_id}")
            raise RemoteProtocolError(
                f"cipher mismatch: peer uses {theirs}, we use {self.params.cipher}"
            )
        if payload.flags & FLAG_COMPRESS_BATCH:
            raise RemoteProtocolError(
                "compression mismatch: the peer is an older vpnd that compresses whole batches "
                "(a length oracle across flows); upgrade it"
            )
        if payload.flags & ~FLAG_COMPRESS:
            raise RemoteProtocolError(f"unknown handshake flags 0x{payload.flags:02x}")
        if payload.flags != self._flags:
            raise RemoteProtocolError(
                "compression mismatch: peer has compress "
                f"{'on' if payload.flags & FLAG_COMPRESS else 'off'}, "
                f"we have it {'on' if self.params.compress else 'off'}"
            )
        address = payload.announced
        if self._keyring is not None:
            peer = self._keyring.admit(psk, address)
            if peer is None:
                said = f"tunnel address {address}" if address is not None else "no address"
                raise RemoteProtocolError(f"no client with this key announces {said}")
            self.peer = peer
        # Clients sharing one key are told apart by their address: so are their timestamps.
        guard_id = kid + payload.address
        try:
            self._guard.check(guard_id, payload.timestamp_ns, self._wall_at(now))
        except RemoteProtocolError as exc:
            raise FrameRejected(exc.reason, "replay") from None
        body2 = hs.write_message2(self._rng)
        self._guard.record(guard_id, payload.timestamp_ns)
        self._psk = psk
        self._key_id = kid
        self.peer_address = address
        self._peer_key_id = kid
        self._install_keys(hs.keys(), now)  # `hs` (ck, ephemeral key) dies with this frame
        self._awaiting_confirm = True
        if trailer:
            self._peer_index_b = peer_index
        self._emit_handshake(bytes([MSG_RESP]) + body2)

    @property
    def authenticated(self) -> bool:
        """True once the peer proved the key (responder: message 1 opened; initiator: started).

        A server never evicts such a connection to make room for unauthenticated ones.
        """
        return self._hs is not None or self._send is not None

    def _handle_resp(self, msg: bytes, now: float, events: list[Event]) -> None:
        hs = self._hs
        if not self._initiator or hs is None or self._send is not None:
            raise FrameRejected("unexpected handshake message 2", "unexpected")
        trailer = INDEX_LEN if self._dgram else 0
        if len(msg) != _MSG2_LEN + trailer:
            raise FrameRejected(f"handshake message 2 of {len(msg)} bytes", "malformed")
        if trailer:
            peer_index = bytes(msg[-INDEX_LEN:])
            if peer_index == _ZERO_INDEX:
                raise FrameRejected("handshake message 2 with session index 0", "malformed")
            msg = msg[:-INDEX_LEN]
            # Try on a copy: an answer to an older message 1 must not spoil the current state.
            hs = copy.copy(hs)
            hs._ss = copy.copy(hs._ss)  # its fields are immutable values: a shallow copy is enough
        try:
            hs.read_message2(msg[1:])
        except RemoteProtocolError as exc:
            if self._dgram:
                raise FrameRejected(exc.reason, "bad_handshake") from None
            self._hs = None if self._lossy else hs  # a lossy retry cannot reuse the state
            if exc.reason.startswith("handshake authentication failed"):
                raise FrameRejected(exc.reason, "bad_handshake") from None
            raise
        if trailer:
            self._peer_index_b = peer_index
            self._hs = hs
            self._hs_retry_at = None
        self._peer_key_id = self._key_id
        self._install_keys(hs.keys(), now)
        self._hs = None  # forward secrecy: no chaining key or ephemeral key of the handshake kept
        self._seal_inner(_CONFIRM)
        self._link_up(now, events)

    def _install_keys(self, keys: SessionKeys, now: float) -> None:
        cipher = self.params.cipher
        self._send = SendState(make_aead(cipher, keys.send_key), 0, now)
        self._recv = {0: RecvState(make_aead(cipher, keys.recv_key), 0, now, self._dgram)}
        self._recv_epoch = 0
        self._ck = keys.chaining_key
        self._session_id = keys.handshake_hash[:8].hex()

    def _link_up(self, now: float, events: list[Event]) -> None:
        self.state = State.ESTABLISHED
        self._awaiting_confirm = False
        if self._length_framed:
            self._framer.set_cap(self._full_cap)  # type: ignore[attr-defined]
        self.stats.established_at = now
        self._last_in = now
        self._next_ping = now + self.params.keepalive
        if self._dgram and self._initiator:
            self._next_ping = now + min(self.params.keepalive, HS_RETRY)  # see section 6
        events.append(LinkUp(self.key_id, self._session_id))

    def _handle_data(self, msg: bytes, now: float, events: list[Event]) -> None:
        if len(msg) < _MIN_DATA:
            raise FrameRejected(f"data frame of {len(msg)} bytes is too short", "malformed")
        _, epoch, counter = HEADER.unpack_from(msg)
        rs = self._recv.get(epoch)
        if rs is None:
            raise FrameRejected(f"data frame for unknown key epoch {epoch}", "unknown_epoch")
        inner = rs.open(msg, counter, self._lossy)
        # Authenticated from here on: a violation is the (keyed) peer's fault, never a drop.
        self.accepted += 1
        self._heard = True
        self._last_in = now
        self.stats.missed_keepalives = 0
        if (
            self._initiator
            and counter >= self.params.rekey_after_messages
            and self._rekey_priv is None
            and self.state is State.ESTABLISHED
        ):
            self._maybe_rekey(now)  # the peer is the busy sender: renew by its count too
        self._after_open(inner, epoch, counter, now, events)

    def _after_open(
        self, inner: bytes, epoch: int, counter: int, now: float, events: list[Event]
    ) -> None:
        """What an authenticated frame's inner message does (epoch switch, then by type)."""
        if epoch > self._recv_epoch:
            # The peer's first frame of a new epoch: drop the old key (datagrams: keep the one
            # before, for frames still in flight); a responder now knows the initiator has the
            # new keys and switches its sending too.
            self._recv_epoch = epoch
            keep = epoch - 1 if self._dgram else epoch
            for old in [e for e in self._recv if e < keep]:
                del self._recv[old]
            self._rekey_answer = None
            nxt = self._next_send
            if nxt is not None and nxt.epoch == epoch:
                self._send = nxt
                self._next_send = None
                self._rekeyed(epoch, events)
        if not inner:
            raise RemoteProtocolError("empty inner message")
        kind = inner[0]
        if self._awaiting_confirm:
            if kind == INNER_CONFIRM:
                self._link_up(now, events)
                return
            if not self._lossy:
                raise RemoteProtocolError("the first data message was not CONFIRM")
            # Lossy link, CONFIRM lost: any frame sealed with the session keys proves the same.
            self._link_up(now, events)
        if kind == INNER_PACKETS:
            pkts = decode_packets(inner)
            if pkts:
                stats = self.stats
                stats.packets_in += len(pkts)
                stats.bytes_in += sum(map(len, pkts))
                events.append(Packets(pkts))
        elif kind == INNER_PING:
            if len(inner) != 9:
                raise RemoteProtocolError("malformed PING")
            self._seal_inner(bytes([INNER_PONG]) + inner[1:9])
        elif kind == INNER_PONG:
            if len(inner) != 9:
                raise RemoteProtocolError("malformed PONG")
            (pid,) = U64.unpack_from(inner, 1)
            if pid == self._ping_outstanding and self._ping_sent_at is not None:
                rtt = now - self._ping_sent_at
                self._ping_outstanding = None
                self.stats.last_rtt = rtt
                events.append(KeepaliveRtt(rtt))
                maxdelay = self.params.maxdelay
                if maxdelay is not None and rtt > maxdelay:
                    self._dead(
                        f"keepalive answered after {rtt:.3f} s > maxdelay {maxdelay:g} s", events
                    )
        elif kind == INNER_REKEY_INIT:
            self._on_rekey_init(inner, now, events)
        elif kind == INNER_REKEY_RESP:
            self._on_rekey_resp(inner, now, events)
        elif kind == INNER_CLOSE:
            self.state = State.CLOSED
            events.append(Closed(decode_close(inner)))
        elif kind == INNER_CONFIRM:
            if not self._dgram:
                raise RemoteProtocolError("CONFIRM after the session was confirmed")
            # Datagrams: the CONFIRM arrived after a later frame had confirmed the session.
        else:
            raise RemoteProtocolError(f"unknown inner message type 0x{kind:02x}")

    # ------------------------------------------------------------------ rekey
    def _maybe_rekey(self, now: float) -> None:
        send = self._send
        if send is None or self.state is not State.ESTABLISHED:
            return
        p = self.params
        if self._rekey_priv is not None:
            if self._rekey_retry_at is not None and now >= self._rekey_retry_at and self._rekey_msg:
                self._seal_inner(self._rekey_msg)
                if self._dgram:
                    self._rekey_backoff = min(self._rekey_backoff * 2, p.keepalive)
                    self._rekey_retry_at = now + self._rekey_backoff
                else:
                    self._rekey_retry_at = now + p.keepalive
            return
        # The peer's count only once it sends in our epoch: until the responder has switched
        # after the last rekey, its count is that of the old epoch.
        rs = self._recv.get(self._recv_epoch) if self._recv_epoch == send.epoch else None
        peer_count = rs.next_counter if rs is not None else 0
        if (
            now - send.started < p.keyttl
            and send.counter < p.rekey_after_messages
            and peer_count < p.rekey_after_messages
        ):
            return
        priv, pub = generate_keypair(self._rng)
        self._rekey_priv = priv
        self._rekey_target = send.epoch + 1
        self._rekey_msg = bytes([INNER_REKEY_INIT]) + REKEY.pack(self._rekey_target, pub)
        self._rekey_retry_at = now + p.keepalive if self._lossy else None
        if self._dgram:
            self._rekey_backoff = min(HS_RETRY, p.keepalive)
            self._rekey_retry_at = now + self._rekey_backoff
        self._seal_inner(self._rekey_msg)

    def _on_rekey_init(self, inner: bytes, now: float, events: list[Event]) -> None:
        if self._initiator:
            raise RemoteProtocolError("REKEY_INIT sent by the responder")
        if len(inner) != 1 + REKEY.size:
            raise RemoteProtocolError("malformed REKEY_INIT")
        send = self._send
        if send is None:  # pragma: no cover
            raise RemoteProtocolError("REKEY_INIT before keys")
        target, peer_pub = REKEY.unpack_from(inner, 1)
        answer = self._rekey_answer
        if answer is not None and self._next_send is not None:
            if answer[0] == inner:
                # The initiator repeats itself (lossy link): answer again, still in epoch n.
                self._seal_inner(answer[1])
                return
            raise RemoteProtocolError(
                f"another REKEY_INIT for epoch {target} while epoch "
                f"{self._next_send.epoch} is still being confirmed"
            )
        if target != send.epoch + 1:
            raise RemoteProtocolError(f"REKEY_INIT for epoch {target}, expected {send.epoch + 1}")
        priv, pub = generate_keypair(self._rng)
        ck, k_i2r, k_r2i = rekey_keys(self._ck, dh(priv, peer_pub))
        cipher = self.params.cipher
        resp = bytes([INNER_REKEY_RESP]) + REKEY.pack(target, pub)
        self._seal_inner(resp)
        self._ck = ck
        self._recv[target] = RecvState(make_aead(cipher, k_i2r), target, now, self._dgram)
        # Keep sending in epoch n until the initiator's first frame of n+1 (see _handle_data).
        self._next_send = SendState(make_aead(cipher, k_r2i), target, now)
        self._rekey_answer = (bytes(inner), resp)

    def _on_rekey_resp(self, inner: bytes, now: float, events: list[Event]) -> None:
        if not self._initiator:
            raise RemoteProtocolError("REKEY_RESP sent by the initiator")
        if len(inner) != 1 + REKEY.size:
            raise RemoteProtocolError("malformed REKEY_RESP")
        target, peer_pub = REKEY.unpack_from(inner, 1)
        priv = self._rekey_priv
        if priv is None or target != self._rekey_target:
            if self._lossy and self._send is not None and target == self._send.epoch:
                # A repeated answer to a rekey already done: our first frame of the epoch may
                # have been lost too, so confirm the new keys again.
                self._seal_inner(_EMPTY_PACKETS)
                return
            raise RemoteProtocolError(f"unexpected REKEY_RESP for epoch {target}")
        ck, k_i2r, k_r2i = rekey_keys(self._ck, dh(priv, peer_pub))
        cipher = self.params.cipher
        self._ck = ck
        self._recv[target] = RecvState(make_aead(cipher, k_r2i), target, now, self._dgram)
        self._send = SendState(make_aead(cipher, k_i2r), target, now)
        self._rekey_priv = None
        self._rekey_msg = None
        self._rekey_retry_at = None
        self._seal_inner(_EMPTY_PACKETS)  # lets the responder switch even when we are idle
        self._rekeyed(target, events)

    def _rekeyed(self, epoch: int, events: list[Event]) -> None:
        self.stats.rekeys += 1
        self.stats.epoch = epoch
        events.append(Rekeyed(epoch))
