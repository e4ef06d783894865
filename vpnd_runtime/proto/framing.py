"""Stream framing for TCP: each message is preceded by its length as a u32 big-endian.

A byte stream arrives in arbitrary chunks; `LengthFramer.decode` buffers a partial header or body
and returns only complete messages, so any chunking of the same stream yields the same messages.
The announced length is checked against `max_message` as soon as the 4 header bytes are there,
before any buffer is sized for the body: a peer claiming 4 GiB costs us nothing.  The cap can be
changed between calls (`set_cap`): `Connection` keeps it small (`HANDSHAKE_MAX_MESSAGE`) while the
peer is unauthenticated and widens it once the handshake completes, decoding one message at a
time meanwhile (`decode(data, limit=1)`) so the frames behind the handshake get the full cap.

The framer is pluggable: `Connection` only needs `decode(data) -> list[bytes]` and
`encode(msg) -> bytes`.  The serial transport passes a SLIP framer with the same interface.
"""

from __future__ import annotations

import struct
from typing import Protocol

from .errors import RemoteProtocolError

#: Largest message accepted by default: a 256 KiB sealed batch plus header and tag room.
MAX_MESSAGE = 262144 + 64
#: Cap before the handshake completes: messages 1 and 2 and the CONFIRM are under 100 bytes.
HANDSHAKE_MAX_MESSAGE = 1024

_HEADER = struct.Struct(">I")


class Framer(Protocol):
    """What `Connection` needs from a framer (length prefix over TCP, SLIP over serial)."""

    def decode(self, data: bytes) -> list[bytes]:
        """Feed received bytes; return the complete messages they finish, in order."""
        ...

    def encode(self, msg: bytes) -> bytes:
        """Return the wire form of one message."""
        ...


class LengthFramer:
    """u32 big-endian length + message.  Length 0 or above the cap is a RemoteProtocolError."""

    __slots__ = ("_buf", "_cap_note", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if max_message < 1 or max_message > 0xFFFFFFFF:
            raise ValueError(f"max_message must be 1..{0xFFFFFFFF}, got {max_message}")
        self.max_message = max_message
        self._cap_note = ""
        self._buf = bytearray()

    def set_cap(self, max_message: int, note: str = "") -> None:
        """Change the cap for the frames not yet decoded; `note` ends the over-cap error message
        (e.g. "before the handshake completes") so the operator sees which cap was hit."""
        if max_message < 1 or max_message > 0xFFFFFFFF:
            raise ValueError(f"max_message must be 1..{0xFFFFFFFF}, got {max_message}")
        self.max_message = max_message
        self._cap_note = f" {note}" if note else ""

    def _too_long(self, n: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"frame length {n} exceeds the cap of {self.max_message} bytes{self._cap_note}"
        )

    @staticmethod
    def encode(msg: bytes) -> bytes:
        """Prefix `msg` with its length.  Raises ValueError for an empty or oversized message."""
        n = len(msg)
        if n == 0 or n > 0xFFFFFFFF:
            raise ValueError(f"message length {n} cannot be framed")
        return _HEADER.pack(n) + msg

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return len(self._buf)

    def decode(self, data: bytes, limit: int | None = None) -> list[bytes]:
        """Return every complete message in the stream so far; keep the partial tail buffered.

        With `limit`, return at most that many messages and keep the rest buffered (a later
        call, even with b"", returns them, checked against the cap in force then).
        """
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        out: list[bytes] = []
        pos = 0
        end = len(view)
        cap = self.max_message
        while end - pos >= 4:
            if limit is not None and len(out) >= limit:
                break
            (n,) = _HEADER.unpack_from(view, pos)
            if n == 0:
                raise RemoteProtocolError("frame with length 0")
            if n > cap:
                raise self._too_long(n)
            if end - pos - 4 < n:
                break
            out.append(bytes(view[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if view is buf:
            del buf[:pos]
        elif pos < end:
            buf += memoryview(data)[pos:]
        return out

    def decode_views(self, data: bytes) -> list[bytes | memoryview]:
        """Like `decode`, but complete messages of an immutable `bytes` chunk come back as
        zero-copy memoryviews into it (the receive hot path of `Connection`; valid as long as
        the chunk, which `bytes` keeps immutable)."""
        if self._buf or type(data) is not bytes:
            return list(self.decode(data))
        view = memoryview(data)
        out: list[bytes | memoryview] = []
        pos = 0
        end = len(data)
        cap = self.max_message
        unpack_from = _HEADER.unpack_from
        while end - pos >= 4:
            (n,) = unpack_from(data, pos)
            if n == 0:
                raise RemoteProtocolError("frame with length 0")
            if n > cap:
                raise self._too_long(n)
            if end - pos - 4 < n:
                break
            out.append(view[pos + 4 : pos + 4 + n])
            pos += 4 + n
        if pos < end:
            self._buf += view[pos:]
        return out


# Names used by docs/architecture.md.
FrameDecoder = LengthFramer


def encode_frame(msg: bytes) -> bytes:
    """Length-prefix one message (same as `LengthFramer.encode`)."""
    return LengthFramer.encode(msg)
