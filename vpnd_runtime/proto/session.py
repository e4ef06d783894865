"""Session layer: per-direction AEAD with counter nonces, epochs, and the inner messages.

Theory of operation
-------------------
After the handshake each direction has its own key.  Every DATA message is::

    0x03 | epoch u32 BE | counter u64 BE | AEAD(inner message)   (AD = the 13-byte header)

with nonce = 4 zero bytes + counter as u64 little-endian (as WireGuard).  Counters start at 0 in
each epoch and strictly increase.  A receiver keeps at most two epochs: the current one and, during
a rekey, the next one (or the previous one, until the peer's first frame of the new epoch arrives).
Over a reliable stream the next counter must be exactly last + 1; on a lossy link (serial) it only
has to be greater; over datagrams (UDP), where packets are lost and reordered, a sliding window of
`REPLAY_WINDOW` (2,048) counters (`ReplayWindow`, RFC 6479's ring of bitmap words, WireGuard's size)
accepts each counter at most once, in any order, as long as it is not older than the window.
The counter check happens after the tag check, so forged headers cannot move it.

Inner messages (the plaintext) start with a type byte::

    0x01 PACKETS     flags u8 | body; body = (u32 BE length | packet)*
                     every packet is at least 1 byte; an empty body (no packet at all) is valid:
                     the initiator sends one to open a new epoch after a rekey.  Flags bit 1
                     (PACKETS_PER_PACKET): a length with bit 31 set announces a packet that is
                     raw-deflate compressed on its own (the low 31 bits are its compressed size).
                     Bit 0 (a whole body compressed together, vpnd before issue 14) is refused.
    0x02 PING        id u64
    0x03 PONG        id u64
    0x04 REKEY_INIT  target epoch u32 | e[32]
    0x05 REKEY_RESP  target epoch u32 | e[32]
    0x06 CONFIRM     (empty): the initiator's first message, it completes the handshake
    0x07 CLOSE       reason (UTF-8, at most 200 bytes)

Compression (zlib's raw deflate, optional) is applied to each packet on its own and only kept for
a packet when it shrinks it.  Compressing the whole batch together made one packet's compressed
size depend on the other packets of the frame: an attacker who injects guesses into one flow could
read a secret of another flow from frame lengths (CRIME across flows).  Per packet, what is still
leaked is each packet's compressed size, i.e. how well that packet compresses on its own
(docs/directives.md, `compress`).  Decompression is bounded: a packet to MAX_PACKET bytes, the
whole batch to MAX_BODY; a bomb is a RemoteProtocolError.

Rekey keys: new_ck, k_i2r, k_r2i = HKDF(chaining key, X25519(e_init, e_resp), 3).
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag

from .errors import LocalProtocolError, RemoteProtocolError
from .kdf import hkdf

try:
    # The Rust classes themselves: cryptography's aead module only re-exports them, and
    # importing it first imports the whole `ciphers` package (algorithms, modes, the legacy
    # "decrepit" ciphers), ~0.2 MiB of a daemon's RSS for nothing vpnd uses.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    AESGCM = _rust_openssl.aead.AESGCM
    ChaCha20Poly1305 = _rust_openssl.aead.ChaCha20Poly1305
except (ImportError, AttributeError):  # a cryptography laid out otherwise: the public module
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

MSG_INIT = 0x01
MSG_RESP = 0x02
MSG_DATA = 0x03

INNER_PACKETS = 0x01
INNER_PING = 0x02
INNER_PONG = 0x03
INNER_REKEY_INIT = 0x04
INNER_REKEY_RESP = 0x05
INNER_CONFIRM = 0x06
INNER_CLOSE = 0x07

#: PACKETS flag of vpnd before per-packet compression: the whole body deflated together (refused).
PACKETS_COMPRESSED = 0x01
#: PACKETS flag: some packets are compressed on their own, marked by bit 31 of their length.
PACKETS_PER_PACKET = 0x02
PACKET_COMPRESSED_BIT = 0x8000_0000

HEADER = struct.Struct(">BIQ")
HEADER_LEN = HEADER.size  # 13
FRAMED_HEADER = struct.Struct(">IBIQ")  # u32 frame length + HEADER
_PREFIXED_HEADER = struct.Struct(">4sBIQ")  # datagram: receiver index + HEADER
TAG_LEN = 16
NONCE = struct.Struct("<4xQ")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
REKEY = struct.Struct(">I32s")

#: Largest packet accepted by send_packets: 10-byte virtio-net header + 65,535-byte IP packet.
MAX_PACKET = 65545
#: Largest PACKETS body (after decompression); also the cap on one batch.
MAX_BODY = 262144
MAX_REASON = 200
#: Never let a counter get near wrap-around, whatever rekey_after_messages says.
COUNTER_LIMIT = 2**63

#: cipher name -> (wire id, AEAD class, key length)
CIPHERS: dict[str, tuple[int, Any, int]] = {
    "chacha20-poly1305": (1, ChaCha20Poly1305, 32),
    "aes-256-gcm": (2, AESGCM, 32),
    "aes-128-gcm": (3, AESGCM, 16),
}
CIPHER_NAMES = {cid: name for name, (cid, _, _) in CIPHERS.items()}


def make_aead(cipher: str, key: bytes) -> Any:
    """Build the AEAD object for `cipher` from a 32-byte session key."""
    _, cls, keylen = CIPHERS[cipher]
    return cls(key[:keylen])


def rekey_keys(chaining_key: bytes, shared: bytes) -> tuple[bytes, bytes, bytes]:
    """New chaining key and the initiator->responder and responder->initiator keys of an epoch."""
    ck, k_i2r, k_r2i = hkdf(chaining_key, shared, 3)
    return ck, k_i2r, k_r2i


class FrameRejected(RemoteProtocolError):
    """A frame that failed before or at authentication.

    On a lossy link (serial) such a frame is dropped and counted under `drop`; over TCP it is
    fatal like any other RemoteProtocolError.
    """

    def __init__(self, reason: str, drop: str) -> None:
        super().__init__(reason)
        self.drop = drop


class SendState:
    """The sending half of one epoch: AEAD, epoch number, next counter."""

    __slots__ = ("aead", "counter", "epoch", "started")

    def __init__(self, aead: Any, epoch: int, started: float) -> None:
        self.aead = aead
        self.epoch = epoch
        self.counter = 0
        self.started = started

    def seal(self, inner: bytes) -> bytes:
        """Return a DATA message carrying `inner`."""
        c = self.counter
        if c >= COUNTER_LIMIT:
            raise LocalProtocolError("send counter exhausted: the session must be rekeyed")
        self.counter = c + 1
        hdr = HEADER.pack(MSG_DATA, self.epoch, c)
        return hdr + self.aead.encrypt(NONCE.pack(c), inner, hdr)

    def seal_prefixed(self, prefix: bytes, inner: bytes) -> bytes:
        """`prefix + self.seal(inner)` (the UDP hot path: the prefix is the receiver's 4-byte
        session index), header and prefix packed in one call."""
        c = self.counter
        if c >= COUNTER_LIMIT:
            raise LocalProtocolError("send counter exhausted: the session must be rekeyed")
        self.counter = c + 1
        hdr = _PREFIXED_HEADER.pack(prefix, MSG_DATA, self.epoch, c)
        return hdr + self.aead.encrypt(NONCE.pack(c), inner, hdr[4:])

    def seal_framed(self, inner: bytes) -> bytes:
        """`LengthFramer.encode(self.seal(inner))` with one copy fewer (the TCP hot path)."""
        c = self.counter
        if c >= COUNTER_LIMIT:
            raise LocalProtocolError("send counter exhausted: the session must be rekeyed")
        self.counter = c + 1
        prefix = FRAMED_HEADER.pack(HEADER_LEN + len(inner) + TAG_LEN, MSG_DATA, self.epoch, c)
        return prefix + self.aead.encrypt(NONCE.pack(c), inner, prefix[4:])


#: Counters a datagram receiver still accepts behind the highest one seen (WireGuard's 2,048).
REPLAY_WINDOW = 2048
_WORD = 64
RING_WORDS = REPLAY_WINDOW // _WORD + 1  # one spare word, as RFC 6479: the window slides by words
_FULL = (1 << _WORD) - 1


class ReplayWindow:
    """RFC 6479 anti-replay window: a ring of 64-bit words over the newest `REPLAY_WINDOW` counters.

    `check(c)` says whether `c` may be accepted (new and not too old) without changing anything;
    `mark(c)` records it (call it only after the frame authenticated, so a forged counter cannot
    slide the window).  Sliding forward clears whole words, so any jump costs at most
    `RING_WORDS` word writes.
    """

    __slots__ = ("_ring", "top")

    def __init__(self) -> None:
        self._ring = [0] * RING_WORDS
        #: The highest counter marked so far (-1: none).
        self.top = -1

    def check(self, counter: int) -> str | None:
        """None when `counter` is acceptable, else the reason ("replay" or "too_old")."""
        top = self.top
        if counter > top:
            return None
        if top - counter >= REPLAY_WINDOW:
            return "too_old"
        if (self._ring[(counter // _WORD) % RING_WORDS] >> (counter % _WORD)) & 1:
            return "replay"
        return None

    def mark(self, counter: int) -> None:
        """Record `counter` as received (after `check` accepted it and the tag verified)."""
        ring = self._ring
        top = self.top
        block = counter >> 6
        if counter > top:
            top_block = top >> 6 if top >= 0 else -1
            if block != top_block:
                for i in range(1, min(block - top_block, RING_WORDS) + 1):
                    ring[(top_block + i) % RING_WORDS] = 0
            self.top = counter
        ring[block % RING_WORDS] |= 1 << (counter & 63)


class RecvState:
    """The receiving half of one epoch: AEAD and the lowest counter still acceptable (streams),
    or the replay window (datagrams)."""

    __slots__ = ("aead", "epoch", "next_counter", "started", "window")

    def __init__(self, aead: Any, epoch: int, started: float, datagram: bool = False) -> None:
        self.aead = aead
        self.epoch = epoch
        self.next_counter = 0
        self.started = started
        self.window = ReplayWindow() if datagram else None

    def open(self, msg: bytes, counter: int, lossy: bool) -> bytes:
        """Authenticate and decrypt; then enforce the counter rule.  Raises RemoteProtocolError."""
        window = self.window
        if window is not None:
            # Datagrams: refuse a replay before spending the decryption on it; mark the counter
            # only once the tag verified (a forged header must not move the window).
            why = window.check(counter)
            if why is not None:
                raise FrameRejected(f"{why} data frame (counter {counter})", "replay")
            try:
                pt = self.aead.decrypt(
                    NONCE.pack(counter), memoryview(msg)[HEADER_LEN:], msg[:HEADER_LEN]
                )
            except InvalidTag:
                raise FrameRejected("bad authentication tag on a data frame", "bad_tag") from None
            window.mark(counter)
            if counter >= self.next_counter:
                self.next_counter = counter + 1
            return pt
        try:
            pt = self.aead.decrypt(
                NONCE.pack(counter), memoryview(msg)[HEADER_LEN:], msg[:HEADER_LEN]
            )
        except InvalidTag:
            raise FrameRejected("bad authentication tag on a data frame", "bad_tag") from None
        expected = self.next_counter
        if counter != expected and (not lossy or counter < expected):
            if counter < expected:
                raise FrameRejected(
                    f"replayed or reordered data frame (counter {counter}, expected {expected})",
                    "replay",
                )
            raise FrameRejected(
                f"gap in data frames (counter {counter}, expected {expected})", "gap"
            )
        self.next_counter = counter + 1
        return pt


def packets_inner(parts: list[bytes], compress: bool, level: int) -> bytes:
    """Join a PACKETS inner message from `parts` = [b"\\x01\\x00", len, packet, len, packet, ...].

    With `compress`, each packet is raw-deflated on its own and sent so only when that makes it
    smaller (its length then carries PACKET_COMPRESSED_BIT); the others travel as they are.
    """
    if not compress:
        return b"".join(parts)
    from vpnd_runtime.compat import zlib_compress  # noqa: PLC0415 - lazy, as zlib

    out = [b"\x01\x00"]
    any_packed = False
    pack = U32.pack
    deflate = zlib_compress()  # zlib.compress, whose wbits argument needs 3.11
    for k in range(2, len(parts), 2):
        p = parts[k]
        packed = deflate(p, level, -15)
        if len(packed) < len(p):
            out.append(pack(PACKET_COMPRESSED_BIT | len(packed)))
            out.append(packed)
            any_packed = True
        else:
            out.append(parts[k - 1])
            out.append(p)
    if any_packed:
        out[0] = bytes([INNER_PACKETS, PACKETS_PER_PACKET])
    return b"".join(out)


def decode_packets(inner: bytes) -> list[bytes]:
    """Parse a PACKETS inner message (type byte included).

    Raises RemoteProtocolError for a malformed body, including a zero-length packet (no sender
    of ours produces one: it would only be a way to make us do work for nothing).
    """
    if len(inner) < 2:
        raise RemoteProtocolError("truncated PACKETS message")
    flags = inner[1]
    if flags & PACKETS_COMPRESSED:
        raise RemoteProtocolError(
            "whole-batch compressed PACKETS body (the format of an older vpnd); "
            "upgrade both ends of the link"
        )
    if flags & ~PACKETS_PER_PACKET:
        raise RemoteProtocolError(f"unknown PACKETS flags 0x{flags:02x}")
    if flags:
        return _decode_per_packet(inner)
    body = inner
    out: list[bytes] = []
    end = len(body)
    pos = 2
    unpack_from = U32.unpack_from
    while pos < end:
        if end - pos < 4:
            raise RemoteProtocolError("truncated packet length in PACKETS body")
        (n,) = unpack_from(body, pos)
        pos += 4
        if n > end - pos:
            raise RemoteProtocolError(f"packet length {n} runs past the PACKETS body")
        if n == 0:
            raise RemoteProtocolError(
                f"zero-length packet in a PACKETS body (packet {len(out) + 1} of the batch)"
            )
        out.append(body[pos : pos + n])
        pos += n
    return out


def _nth(out: list[bytes]) -> str:
    return f"packet {len(out) + 1} of the batch"


def _decode_per_packet(inner: bytes) -> list[bytes]:
    """The PACKETS_PER_PACKET body: some lengths carry PACKET_COMPRESSED_BIT."""
    import zlib  # noqa: PLC0415 - lazy: only links with `compress` load it

    out: list[bytes] = []
    end = len(inner)
    pos = 2
    budget = MAX_BODY  # what the batch may expand to, counted as the sender counts it
    view = memoryview(inner)
    while pos < end:
        if end - pos < 4:
            raise RemoteProtocolError("truncated packet length in PACKETS body")
        (n,) = U32.unpack_from(inner, pos)
        pos += 4
        packed = bool(n & PACKET_COMPRESSED_BIT)
        n &= ~PACKET_COMPRESSED_BIT
        if n > end - pos:
            raise RemoteProtocolError(f"packet length {n} runs past the PACKETS body ({_nth(out)})")
        if n == 0:
            raise RemoteProtocolError(f"zero-length packet in a PACKETS body ({_nth(out)})")
        cap = min(MAX_PACKET, budget - 4)
        if packed:
            d = zlib.decompressobj(-15)
            try:
                pkt = d.decompress(view[pos : pos + n], max(cap, 0) + 1)
            except zlib.error:
                raise RemoteProtocolError(f"corrupt compressed packet ({_nth(out)})") from None
            if len(pkt) > cap or d.unconsumed_tail:
                if cap < MAX_PACKET:
                    raise RemoteProtocolError(
                        f"compressed PACKETS body expands beyond {MAX_BODY} bytes ({_nth(out)})"
                    )
                raise RemoteProtocolError(
                    f"compressed packet expands beyond {MAX_PACKET} bytes ({_nth(out)})"
                )
            if not d.eof or d.unused_data:
                raise RemoteProtocolError(f"truncated or padded compressed packet ({_nth(out)})")
            if not pkt:
                raise RemoteProtocolError(f"zero-length packet in a PACKETS body ({_nth(out)})")
        else:
            if n > budget - 4:
                raise RemoteProtocolError(f"PACKETS body holds more than {MAX_BODY} bytes")
            pkt = inner[pos : pos + n]
        budget -= len(pkt) + 4
        out.append(pkt)
        pos += n
    return out


def encode_close(reason: str) -> bytes:
    """CLOSE inner message; the reason is cut to MAX_REASON bytes."""
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return bytes([INNER_CLOSE]) + raw


def decode_close(inner: bytes) -> str:
    """Reason of a CLOSE inner message, made printable."""
    raw = inner[1 : 1 + MAX_REASON]
    text = raw.decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)
