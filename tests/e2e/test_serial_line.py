"""Two vpnd serial ends over a socat PTY pair: SLIP frames both ways, noise, xfilter, a cut line.

Each test narrates a cable: socat joins two PTYs, each end opens its PTY as a serial port
(`open_serial`) and drives it through a `SerialTransport` and a `SlipFramer` from one selector
loop, the way the daemon will. Messages carry their own digest, standing in for the AEAD tag the
real protocol core checks, so the tests can tell real messages from junk that noise produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import selectors
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import serial

from tests.conftest import require_tools
from tests.helpers.pty import PtyPair, pty_pair, wait_until
from vpnd_runtime.io.serial import (
    LineDown,
    SerialTransport,
    carrier_ok,
    modem_lines,
    open_serial,
)
from vpnd_runtime.proto.slip import XOFF, XON, SlipFramer

TAG = "vpnd-serline"
DIGEST = 8


def seal(body: bytes) -> bytes:
    """A message that can check itself (the stand-in for an AEAD tag)."""
    return hashlib.sha256(body).digest()[:DIGEST] + body


def unseal(msg: bytes) -> bytes | None:
    body = msg[DIGEST:]
    return (
        body
        if len(msg) > DIGEST and hashlib.sha256(body).digest()[:DIGEST] == msg[:DIGEST]
        else None
    )


@dataclass
class End:
    """One end of the cable: transport, framer and what it received."""

    name: str
    transport: SerialTransport
    framer: SlipFramer
    received: list[bytes] = field(default_factory=list)
    junk: int = 0

    def send(self, msg: bytes) -> None:
        self.transport.write(self.framer.encode(msg))

    def take(self, data: bytes) -> None:
        for msg in self.framer.decode(data):
            body = unseal(msg)
            if body is None:
                self.junk += 1
            else:
                self.received.append(body)


@pytest.fixture
def cable() -> Iterator[PtyPair]:
    require_tools("socat")
    with pty_pair(TAG) as pair:
        yield pair


def open_end(name: str, path: str, xfilter: bool = False) -> End:
    port = open_serial(path, 115200, rtscts=False, localline=True)
    return End(name, SerialTransport(port), SlipFramer(xfilter=xfilter))


def pump(ends: list[End], done, timeout: float) -> None:
    """Run the selector loop the daemon will run until `done()` holds (bounded by `timeout`)."""
    sel = selectors.DefaultSelector()
    try:
        for end in ends:
            sel.register(end.transport, selectors.EVENT_READ, end)
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"serial pump did not finish within {timeout} s")
            for end in ends:
                events = selectors.EVENT_READ
                if end.transport.pending():
                    events |= selectors.EVENT_WRITE
                sel.modify(end.transport, events, end)
            for key, mask in sel.select(min(remaining, 0.5)):
                end = key.data
                if mask & selectors.EVENT_WRITE:
                    end.transport.flush()
                if mask & selectors.EVENT_READ:
                    end.take(end.transport.read())
    finally:
        sel.close()


def random_messages(rng: random.Random, total: int, largest: int = 1500) -> list[bytes]:
    out, left = [], total
    while left > 0:
        n = min(left, rng.randint(1, largest))
        out.append(rng.randbytes(n))
        left -= n
    return out


def test_a_megabyte_crosses_the_line_both_ways_intact(cable: PtyPair) -> None:
    # Both ends open their PTY as a serial port and queue 1 MB of SLIP frames at once.
    a, b = open_end("a", cable.a), open_end("b", cable.b)
    try:
        rng = random.Random(1055)
        a_to_b, b_to_a = random_messages(rng, 1 << 20), random_messages(rng, 1 << 20)
        started = time.monotonic()
        for msg in a_to_b:
            a.send(seal(msg))
        for msg in b_to_a:
            b.send(seal(msg))
        # The PTY cannot take a megabyte at once: the rest waits in the transport's buffer.
        assert a.transport.pending() > 0
        want_a, want_b = len(b_to_a), len(a_to_b)
        pump([a, b], lambda: len(a.received) >= want_a and len(b.received) >= want_b, 60)
        elapsed = time.monotonic() - started
        # Every message arrived once, in order, and the byte streams hash the same.
        assert (
            hashlib.sha256(b"".join(b.received)).digest()
            == hashlib.sha256(b"".join(a_to_b)).digest()
        )
        assert b.received == a_to_b
        assert a.received == b_to_a
        assert a.junk == b.junk == 0
        assert sum(a.framer.errors.values()) + sum(b.framer.errors.values()) == 0
        assert a.transport.pending() == b.transport.pending() == 0
        mbit = 2 * 8 * (1 << 20) / elapsed / 1e6
        print(f"\nserial PTY pair: 2 x 1 MiB SLIP in {elapsed:.2f} s = {mbit:.1f} Mbit/s payload")
    finally:
        a.transport.close()
        b.transport.close()


def test_noise_between_frames_is_survived_and_counted(cable: PtyPair) -> None:
    a, b = open_end("a", cable.a), open_end("b", cable.b)
    try:
        rng = random.Random(7)
        msgs = random_messages(rng, 64 * 1024, largest=400)
        # Line noise between frames: invalid escapes, stray ENDs, a run of garbage.
        noises = [b"\xdb\x01", b"\xc0\xc0", b"\xdb\xdb\xc0", rng.randbytes(40), b"\x7f\xdb"]
        for i, msg in enumerate(msgs):
            a.send(seal(msg))
            a.transport.write(noises[i % len(noises)])
        pump([a, b], lambda: len(b.received) >= len(msgs), 30)
        # Every real message survived, in order; the noise was dropped and counted.
        assert b.received == msgs
        assert b.framer.errors["bad_escape"] > 0
        assert b.framer.errors["bad_escape"] + b.junk >= len(msgs) // len(noises)
    finally:
        a.transport.close()
        b.transport.close()


def test_a_frame_hit_by_noise_is_lost_alone(cable: PtyPair) -> None:
    a, b = open_end("a", cable.a), open_end("b", cable.b)
    try:
        msgs = [bytes([i]) * 200 for i in range(1, 21)]
        for i, msg in enumerate(msgs):
            frame = bytearray(a.framer.encode(seal(msg)))
            if i == 5:
                frame[100] ^= 0x40  # a flipped bit: the "tag" catches it downstream
            if i == 9:
                frame[50:50] = b"\xdb\x00"  # an invalid escape: SLIP drops the frame
            a.transport.write(bytes(frame))
        pump([a, b], lambda: len(b.received) >= len(msgs) - 2, 30)
        assert b.received == [m for i, m in enumerate(msgs) if i not in (5, 9)]
        assert b.junk == 1
        assert b.framer.errors["bad_escape"] == 1
    finally:
        a.transport.close()
        b.transport.close()


def test_xfilter_keeps_raw_xon_and_xoff_off_the_line(cable: PtyPair) -> None:
    # End a sends with xfilter; the far PTY is read raw, as a modem would see the line.
    a = open_end("a", cable.a, xfilter=True)
    raw_fd = os.open(cable.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        rng = random.Random(17)
        msgs = [bytes(rng.choice(b"\x11\x13\xc0\xdbab") for _ in range(300)) for _ in range(50)]
        encoded = b"".join(a.framer.encode(m) for m in msgs)
        a.transport.write(encoded)
        line = bytearray()

        def drained() -> bool:
            a.transport.flush()
            with contextlib.suppress(BlockingIOError):
                line.extend(os.read(raw_fd, 65536))
            return len(line) >= len(encoded)

        wait_until(drained, 10, "the xfilter frames on the raw line")
        assert XON not in line
        assert XOFF not in line
        assert bytes(line) == encoded
        assert SlipFramer().decode(bytes(line)) == msgs  # a receiver without xfilter copes too
    finally:
        os.close(raw_fd)
        a.transport.close()


def test_without_xfilter_flow_control_bytes_do_reach_the_line(cable: PtyPair) -> None:
    a = open_end("a", cable.a, xfilter=False)
    raw_fd = os.open(cable.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        a.send(b"\x11\x13")
        line = bytearray()

        def got_frame() -> bool:
            with contextlib.suppress(BlockingIOError):
                line.extend(os.read(raw_fd, 64))
            return len(line) >= 4

        wait_until(got_frame, 5, "the frame on the raw line")
        assert bytes(line) == b"\xc0\x11\x13\xc0"
    finally:
        os.close(raw_fd)
        a.transport.close()


def test_cutting_the_line_raises_line_down_and_restoring_it_carries_traffic(
    cable: PtyPair,
) -> None:
    a, b = open_end("a", cable.a), open_end("b", cable.b)
    try:
        a.send(seal(b"before the cut"))
        pump([a, b], lambda: b.received == [b"before the cut"], 10)
        # Cut the cable: socat goes away and both masters close.
        cable.cut()
        sel = selectors.DefaultSelector()
        sel.register(a.transport, selectors.EVENT_READ)
        try:
            assert sel.select(5), "a cut line must wake the selector"
        finally:
            sel.close()
        with pytest.raises(LineDown, match="line down"):
            a.transport.read()
        with pytest.raises(LineDown):
            b.transport.write(b"\xc0into the void\xc0")
    finally:
        a.transport.close()
        b.transport.close()
    # Restore the cable; both ends reopen their devices, as the daemon does on reconnect.
    cable.restore()
    a, b = open_end("a", cable.a), open_end("b", cable.b)
    try:
        b.send(seal(b"after the restore"))
        pump([a, b], lambda: a.received == [b"after the restore"], 10)
    finally:
        a.transport.close()
        b.transport.close()


def test_a_line_in_use_cannot_be_opened_twice(cable: PtyPair) -> None:
    port = open_serial(cable.a, 115200, rtscts=False, localline=False)
    try:
        with pytest.raises(serial.SerialException, match=cable.a):
            open_serial(cable.a, 115200, rtscts=False, localline=False)
    finally:
        port.close()


def test_a_pty_has_no_modem_lines_so_carrier_is_never_reported_lost(cable: PtyPair) -> None:
    port = open_serial(cable.a, 115200, rtscts=True, localline=False)
    try:
        assert modem_lines(port.fileno()) is None
        assert carrier_ok(port)
        assert carrier_ok(port, localline=True)
        SerialTransport(port).check_carrier()  # does not raise
    finally:
        port.close()


def test_closing_a_transport_twice_is_harmless(cable: PtyPair) -> None:
    end = open_end("a", cable.a)
    end.transport.close()
    end.transport.close()
    with pytest.raises(LineDown, match="closed transport"):
        end.transport.write(b"x")


def test_a_tunnel_over_the_line_loses_only_the_frame_that_noise_damaged(cable: PtyPair) -> None:
    # The real protocol core on both ends, SLIP-framed, lossy (serial) mode.
    from vpnd_runtime.proto.connection import Connection, Params
    from vpnd_runtime.proto.events import LinkUp, Packets

    psk = bytes(range(32))
    params = Params(lossy=True)
    t0 = time.monotonic()
    ends = {}
    for name, path, role in (("a", cable.a, "initiator"), ("b", cable.b, "responder")):
        port = open_serial(path, 115200, rtscts=False, localline=True)
        conn = Connection(role, psk, params, os.urandom, t0, framer=SlipFramer(), wall=time.time())
        ends[name] = (SerialTransport(port), conn, [])
    try:
        ta, ca, events_a = ends["a"]
        _, cb, events_b = ends["b"]
        ca.start(t0, time.time())

        def step() -> None:
            for transport, conn, events in ends.values():
                transport.write(conn.data_to_send())
                transport.flush()
                events.extend(conn.receive_data(transport.read(), time.monotonic()))
                transport.write(conn.data_to_send())

        def up() -> bool:
            step()
            return any(isinstance(e, LinkUp) for e in events_a) and any(
                isinstance(e, LinkUp) for e in events_b
            )

        wait_until(up, 10, "the handshake over the serial line")
        # Twenty packets, one frame each; noise flips a bit inside the eighth frame.
        packets = [bytes([i]) * 300 for i in range(20)]
        for i, packet in enumerate(packets):
            ca.send_packets([packet], time.monotonic())
            frame = bytearray(ca.data_to_send())
            if i == 7:
                at = next(k for k in range(len(frame) // 2, len(frame)) if 0x20 <= frame[k] < 0xC0)
                frame[at] ^= 0x01
            ta.write(bytes(frame))

        def delivered() -> bool:
            step()
            got = [p for e in events_b if isinstance(e, Packets) for p in e.packets]
            return len(got) >= len(packets) - 1

        wait_until(delivered, 10, "the undamaged packets")
        got = [p for e in events_b if isinstance(e, Packets) for p in e.packets]
        assert got == packets[:7] + packets[8:]
        assert cb.stats.drops == {"bad_tag": 1}
        assert cb.state.value == "established"
    finally:
        for transport, _, _ in ends.values():
            transport.close()


def test_an_idle_line_reads_empty_and_only_a_hangup_is_line_down(cable: PtyPair) -> None:
    end = open_end("a", cable.a)
    try:
        assert end.transport.read() == b""
        # pyserial resets VMIN to 0 whenever its timeout is assigned (the chat does this):
        # an empty read must still not be mistaken for a hangup.
        end.transport.port.timeout = 0.2
        assert end.transport.read() == b""
        assert termios.tcgetattr(end.transport.fileno())[6][termios.VMIN] == 1  # re-asserted
        cable.cut()
        with pytest.raises(LineDown):
            end.transport.read()
    finally:
        end.transport.close()
