"""RFC 1055 SLIP framing for the serial line, with optional XON/XOFF escaping.

Theory of operation
-------------------
A serial line is a byte stream with no message boundaries and no error detection: bytes can be
lost, damaged or invented by line noise. SLIP marks boundaries with a reserved byte and escapes
that byte (and the escape byte itself) inside a message:

    END      0xC0   frame delimiter
    ESC      0xDB   escape introducer
    ESC_END  0xDC   ESC ESC_END  stands for a data byte 0xC0
    ESC_ESC  0xDD   ESC ESC_ESC  stands for a data byte 0xDB

With ``xfilter`` (the vpnd directive of that name) the software flow-control characters are also
kept off the line, for modems and links that treat them as flow control and swallow them:

    XON      0x11   sent as ESC 0xDE
    XOFF     0x13   sent as ESC 0xDF

Every encoded frame *begins and ends* with END (``END payload END``). The leading END flushes
whatever noise the line produced since the last frame, so noise between frames can never be glued
onto the front of the next message. Empty frames (two ENDs in a row) carry nothing and are skipped
silently; that is also why an empty message cannot be sent.

Resynchronisation: the decoder never raises on line bytes. A frame with an invalid escape
(ESC followed by anything but 0xDC..0xDF, including ESC END) or a frame longer than
``max_message`` is discarded up to the next END and counted in ``errors``:

    errors["bad_escape"]      frames dropped for an invalid escape sequence
    errors["oversize"]        frames dropped for exceeding max_message
    errors["flow_control"]    raw XON/XOFF bytes dropped from the line (xfilter only)

With xfilter a raw XON/XOFF on the line cannot be data (the encoder never emits one), so the
decoder drops it: a modem that passes flow-control bytes through, or injects them, does not damage
frames. The decoder accepts the ESC 0xDE / ESC 0xDF escapes whether or not its own xfilter is set,
so a side with xfilter talks to a side without it in one direction without losing frames.

There is deliberately no checksum here: every message carried is an AEAD-sealed frame, so damage
that survives the SLIP layer shows up as a bad tag in the protocol core and is dropped and
counted there (``Params(lossy=True)``). Noise can still produce short junk "messages" between two
ENDs; they are handed upward like any other frame and die at the tag check.

The framer is sans-I/O: ``decode`` takes whatever chunk the line delivered, keeps a partial frame
across calls, and returns the complete messages; any chunking of the same bytes gives the same
messages and the same counters. Memory per framer is bounded by about ``2 * max_message``.
"""

from __future__ import annotations

import re

from .framing import MAX_MESSAGE

END = 0xC0
ESC = 0xDB
ESC_END = 0xDC
ESC_ESC = 0xDD
XON = 0x11
XOFF = 0x13
ESC_XON = 0xDE
ESC_XOFF = 0xDF

# The same cap as the TCP length framer: the largest sealed frame the connection builds
# (a batch of up to 256 KiB of packets plus frame and AEAD headers).
DEFAULT_MAX_MESSAGE = MAX_MESSAGE

_END_B = bytes([END])
_ESC_B = bytes([ESC])
_FLOW_B = bytes([XON, XOFF])
# An ESC not followed by one of the four escape codes (or at the end of a frame) is invalid.
_BAD_ESCAPE = re.compile(rb"\xdb(?![\xdc-\xdf])")


class SlipFramer:
    """Encode messages as SLIP frames and decode a noisy byte stream back into messages.

    ``xfilter`` escapes XON/XOFF on encode and drops raw XON/XOFF on decode.
    ``max_message`` caps the decoded length of one message; longer frames are dropped and
    counted on decode and refused (``ValueError``) on encode.
    """

    def __init__(self, xfilter: bool = False, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError(f"max_message must be at least 1, got {max_message}")
        self.xfilter = xfilter
        self.max_message = max_message
        self.errors: dict[str, int] = {"bad_escape": 0, "oversize": 0, "flow_control": 0}
        # Bytes of the frame in progress (still escaped), after the last END seen.
        self._partial = bytearray()
        # True while discarding an over-long frame up to the next END.
        self._skipping = False
        # An escaped frame can be at most twice its decoded length.
        self._max_escaped = 2 * max_message

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, msg: bytes) -> bytes:
        """Return ``END escaped(msg) END``; refuse empty or over-long messages (our misuse)."""
        if not msg:
            raise ValueError("SLIP cannot carry an empty message (empty frames are skipped)")
        if len(msg) > self.max_message:
            raise ValueError(
                f"message of {len(msg)} bytes exceeds the SLIP max_message of {self.max_message}"
            )
        # ESC first, so the ESC bytes introduced by the later replacements are not re-escaped.
        body = bytes(msg).replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
        if self.xfilter:
            body = body.replace(b"\x11", b"\xdb\xde").replace(b"\x13", b"\xdb\xdf")
        return _END_B + body + _END_B

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> list[bytes]:
        """Feed line bytes; return the messages completed by them, in order. Never raises."""
        if self.xfilter and (XON in data or XOFF in data):
            cleaned = bytes(data).translate(None, _FLOW_B)
            self.errors["flow_control"] += len(data) - len(cleaned)
            data = cleaned
        if not data:
            return []
        pieces = bytes(data).split(_END_B)
        messages: list[bytes] = []
        # Every piece but the last was terminated by an END in this chunk.
        for piece in pieces[:-1]:
            if self._skipping:
                # The END that closes an over-long frame: resynchronised, drop what is left.
                self._skipping = False
                self._partial.clear()
                continue
            if self._partial:
                self._partial += piece
                frame = bytes(self._partial)
                self._partial.clear()
            else:
                frame = piece
            message = self._unescape(frame)
            if message:
                messages.append(message)
        tail = pieces[-1]
        if self._skipping:
            return messages
        self._partial += tail
        if len(self._partial) > self._max_escaped:
            # Even fully escaped this cannot fit in max_message: drop it now, bound memory.
            self.errors["oversize"] += 1
            self._partial.clear()
            self._skipping = True
        return messages

    def _unescape(self, frame: bytes) -> bytes | None:
        """Decode one complete frame body; count and return None when it must be dropped."""
        if not frame:
            return None
        if len(frame) > self._max_escaped:
            # Checked first so the verdict does not depend on how the frame was chunked.
            self.errors["oversize"] += 1
            return None
        if _ESC_B in frame:
            if _BAD_ESCAPE.search(frame):
                self.errors["bad_escape"] += 1
                return None
            # Every ESC is now a valid escape lead and the byte after it is a code (never ESC),
            # so sequential replacement is exact provided the one yielding ESC runs last.
            frame = (
                frame.replace(b"\xdb\xdc", b"\xc0")
                .replace(b"\xdb\xde", b"\x11")
                .replace(b"\xdb\xdf", b"\x13")
                .replace(b"\xdb\xdd", b"\xdb")
            )
        if len(frame) > self.max_message:
            self.errors["oversize"] += 1
            return None
        return frame

    def pending(self) -> int:
        """Bytes of an unfinished frame held between ``decode`` calls (for tests and stats)."""
        return len(self._partial)

    def overhead(self, msg: bytes) -> int:
        """Bytes added by framing ``msg`` (escapes plus the two ENDs)."""
        return len(self.encode(msg)) - len(msg)
