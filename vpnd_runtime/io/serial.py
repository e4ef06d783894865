"""The serial line as a non-blocking byte transport for the daemon's selector loop.

Theory of operation
-------------------
``open_serial`` opens the device with pyserial (which sets raw 8N1 termios, the baud rate and
RTS/CTS) and takes an exclusive lock (TIOCEXCL + flock), so a second vpnd or a stray getty cannot
share the line. pyserial opens the descriptor with O_NONBLOCK and keeps it that way; the
transport reads and writes the descriptor directly with ``os.read``/``os.write`` so that the
daemon's selector, not pyserial's internal select, decides when to wait.

``SerialTransport`` is the daemon's view of the line:

* ``read()`` returns whatever bytes are waiting (``b""`` when none). A read that returns EOF
  (the far side of a PTY closed, or the kernel hung the tty up) or fails with EIO/ENXIO means the
  line is gone and raises ``LineDown``. The transport sets VMIN=1/VTIME=0 so that "nothing
  waiting" is EAGAIN rather than a 0-byte read; should anyone reset VMIN to 0 (pyserial does
  when its ``timeout`` is assigned, e.g. by the chat), an empty read is checked with poll()
  for POLLHUP, so the answer stays right either way.
* ``write(data)`` queues bytes and writes as much as the line accepts; a short write or EAGAIN
  leaves the rest in an internal buffer. ``pending()`` says how many bytes wait; the daemon asks
  the selector for EVENT_WRITE while ``pending()`` is non-zero and then calls ``flush()``.
  EIO on write also raises ``LineDown``.
* ``check_carrier()`` raises ``LineDown`` when DCD has dropped (a modem hung up). The daemon
  calls it on its timer tick; with ``localline`` the modem lines are ignored.

Modem lines and PTYs: a pseudo-terminal has no modem control lines; TIOCMGET fails with ENOTTY
(Linux) or EINVAL. ``carrier_ok`` treats that as "no carrier information" and reports the line
as up, so tests over socat PTY pairs work with or without ``localline``; a PTY's line-down is
seen by ``read()`` instead (EOF when the peer end closes). On a real port with a modem, leave
``localline`` off so a hangup (DCD dropping) takes the link down; on a direct null-modem cable
without DCD wired, set ``localline``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import termios
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyserial is imported by open_serial only: TCP links never load it (memory)
    import serial

# Errors that mean the device or its far end is gone, not "try again".
_LINE_GONE = {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF, errno.EPIPE}
_NO_MODEM_LINES = {errno.ENOTTY, errno.EINVAL}
_READ_SIZE = 65536


class LineDown(ConnectionError):
    """The serial line was cut: EOF or EIO from the device, or the modem dropped carrier."""


def open_serial(device: str, speed: int, rtscts: bool, localline: bool) -> serial.Serial:
    """Open `device` raw 8N1 at `speed`, exclusively, non-blocking; RTS/CTS when `rtscts`.

    `localline` is recorded on the port (attribute ``vpnd_localline``) for ``carrier_ok``.
    Raises ``serial.SerialException`` naming the device when it cannot be opened or locked.
    """
    import serial  # noqa: PLC0415 - lazy: only serial links pay for pyserial (~1 MB, ~10 ms)

    try:
        port = serial.Serial(
            port=device,
            baudrate=speed,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            rtscts=rtscts,
            xonxoff=False,
            timeout=0,
            write_timeout=0,
            exclusive=True,
        )
    except (ValueError, OSError) as exc:
        # pyserial raises ValueError for an unsupported speed, SerialException (an OSError)
        # for open/lock failures; name the device either way.
        raise serial.SerialException(f"{device}: cannot open serial line: {exc}") from exc
    port.vpnd_localline = localline  # type: ignore[attr-defined]
    return port


def modem_lines(fd: int) -> int | None:
    """Return the TIOCM_* modem-line bits of `fd`, or None when the device has none (a PTY)."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCMGET, struct.pack("I", 0))
    except OSError as exc:
        if exc.errno in _NO_MODEM_LINES:
            return None
        raise
    return int(struct.unpack("I", raw)[0])


def carrier_ok(port: serial.Serial, localline: bool | None = None) -> bool:
    """True unless the modem has dropped carrier (DCD low).

    Always True with `localline` (modem lines ignored) and on devices without modem lines
    (PTYs: ENOTTY/EINVAL from TIOCMGET is "no carrier information", not "carrier lost").
    When `localline` is None the value recorded by ``open_serial`` is used.
    """
    if localline is None:
        localline = bool(getattr(port, "vpnd_localline", False))
    if localline:
        return True
    try:
        bits = modem_lines(port.fileno())
    except OSError as exc:
        if exc.errno in _LINE_GONE:
            return False
        raise
    return bits is None or bool(bits & termios.TIOCM_CAR)


class SerialTransport:
    """Non-blocking read/write over an open serial port, for a selector-driven loop."""

    def __init__(self, port: serial.Serial, localline: bool | None = None) -> None:
        self.port = port
        self.localline = (
            bool(getattr(port, "vpnd_localline", False)) if localline is None else localline
        )
        self._fd = port.fileno()
        self._out = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        # pyserial keeps O_NONBLOCK, but make the contract explicit for ports opened elsewhere.
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._set_vmin()

    def _set_vmin(self) -> None:
        """VMIN=1, VTIME=0: with O_NONBLOCK an idle line is EAGAIN and 0 bytes means hangup.

        pyserial (timeout=0) leaves VMIN=0, VTIME=0, where a read with nothing waiting returns
        0 bytes, indistinguishable from a hangup.
        """
        try:
            attrs = termios.tcgetattr(self._fd)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        except termios.error:
            pass  # not a tty (a test double): read() falls back to asking poll()

    @classmethod
    def open(
        cls, device: str, speed: int, rtscts: bool = True, localline: bool = False
    ) -> SerialTransport:
        """Open `device` with ``open_serial`` and wrap it."""
        return cls(open_serial(device, speed, rtscts, localline), localline)

    def fileno(self) -> int:
        """The descriptor to register with a selector."""
        return self._fd

    def read(self) -> bytes:
        """Return the bytes waiting on the line (``b""`` if none); ``LineDown`` if it is gone."""
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return b""
        except InterruptedError:
            return b""
        except OSError as exc:
            if exc.errno in _LINE_GONE:
                raise LineDown(f"{self.port.port}: line down ({os.strerror(exc.errno)})") from exc
            raise
        if not data:
            if self._hung_up():
                raise LineDown(f"{self.port.port}: line down (hangup: far end closed)")
            # VMIN was 0 (pyserial reconfigured the port, e.g. after the chat): no data yet.
            self._set_vmin()
            return b""
        self.bytes_in += len(data)
        return data

    def _hung_up(self) -> bool:
        """After an empty read: does the tty report a hangup (POLLHUP/POLLERR)?"""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        for _, revents in poller.poll(0):
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
        return False

    def write(self, data: bytes) -> int:
        """Queue `data` and write what the line accepts now; return the bytes still pending."""
        if self.closed:
            raise LineDown(f"{self.port.port}: write on a closed transport")
        self._out += data
        return self.flush()

    def flush(self) -> int:
        """Write queued bytes until the line would block; return the bytes still pending."""
        while self._out:
            try:
                n = os.write(self._fd, self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _LINE_GONE:
                    raise LineDown(
                        f"{self.port.port}: line down ({os.strerror(exc.errno)})"
                    ) from exc
                raise
            if n <= 0:
                break
            del self._out[:n]
            self.bytes_out += n
        return len(self._out)

    def pending(self) -> int:
        """Bytes queued but not yet accepted by the line (ask for EVENT_WRITE while non-zero)."""
        return len(self._out)

    def check_carrier(self) -> None:
        """Raise ``LineDown`` if the modem dropped carrier (never with localline or on PTYs)."""
        if not carrier_ok(self.port, self.localline):
            raise LineDown(f"{self.port.port}: carrier lost (DCD dropped)")

    def close(self) -> None:
        """Drop queued output and close the port (idempotent; releases the exclusive lock)."""
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        # Closing a device whose far end vanished can fail; the descriptor is gone anyway.
        with contextlib.suppress(OSError):
            self.port.close()
