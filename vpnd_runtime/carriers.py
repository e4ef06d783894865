"""The carriers a link rides on besides TCP (io/tcp.py): the serial line, and the randomness source.

`SerialCarrier` gives a serial line the same interface as `tcp.TcpCarrier`, so the daemon's
loop treats both alike; `run_modemchat` dials the modem before a line link starts.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from typing import TYPE_CHECKING

from vpnd_runtime.linequeue import Pacer

if TYPE_CHECKING:
    from vpnd_runtime.config import Config
    from vpnd_runtime.io.serial import SerialTransport

log = logging.getLogger("vpnd")


class Jitter:
    """Uniform floats from os.urandom, for backoff and handshake-timeout jitter: `random` would
    cost the daemon ~0.3 MiB of RSS (with math, bisect, _sha512) for these two calls."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        """A float in [low, high)."""
        return low + (high - low) * (int.from_bytes(os.urandom(7), "big") / (1 << 56))


class RandomDev:
    """Key material from `randomdev` (vpnd's directive); short reads are completed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISCHR(os.fstat(self._fd).st_mode):  # a regular file gives predictable keys
            os.close(self._fd)
            raise OSError(errno.EINVAL, f"randomdev {path} is not a character device")

    def __call__(self, n: int) -> bytes:
        chunks = []
        left = n
        while left:
            chunk = os.read(self._fd, left)
            if not chunk:
                raise OSError(errno.EIO, f"randomdev {self.path} gave too few bytes")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self._fd)


class SerialCarrier:
    """The serial line seen through the daemon's Carrier interface (io/tcp.py), with a model of
    the line's speed (`pacer`) so the daemon feeds it no faster than it carries bytes."""

    def __init__(self, transport: SerialTransport, device: str, speed: int) -> None:
        self.transport = transport
        self.peer = device
        self.pacer = Pacer(speed)

    def fileno(self) -> int:
        return self.transport.fileno()

    def read(self) -> bytes:
        """Bytes waiting; LineDown (an OSError) when the line is gone."""
        data = self.transport.read()
        if not data:
            raise BlockingIOError
        return data

    def write(self, data: bytes) -> None:
        self.pacer.sent(len(data), time.monotonic())
        self.transport.write(data)

    def flush(self) -> bool:
        return self.transport.flush() == 0

    @property
    def pending(self) -> bool:
        """Bytes wait in our buffer, or a UART's driver still holds more than the pacer's lead
        (TIOCOUTQ; a PTY always answers 0, and then the pacer alone keeps the lead small)."""
        return self.transport.pending() > 0 or self._device_backlog() > self.pacer.lead_bytes

    def _device_backlog(self) -> int:
        import termios  # noqa: PLC0415 - lazy: serial links only (io/serial.py has it loaded)

        try:
            raw = fcntl.ioctl(self.transport.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", raw)[0])

    def check_carrier(self) -> None:
        """LineDown when the modem dropped carrier (never with localline)."""
        self.transport.check_carrier()

    def close(self) -> None:
        self.transport.close()


def run_modemchat(config: Config, transport: SerialTransport) -> tuple[bool, str]:
    """Run the `modemchat` script on the open line before the link starts."""
    from vpnd_runtime.io.chat import load_chat_script, run_chat  # noqa: PLC0415 — serial only

    assert config.modemchat is not None  # noqa: S101 — checked by the caller
    try:
        script = load_chat_script(config.modemchat)
    except (OSError, ValueError) as exc:
        return False, str(exc)
    result = run_chat(script, transport.port, on_step=lambda line: log.info("modemchat: %s", line))
    return result.ok, result.reason
