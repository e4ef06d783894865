"""A socat PTY pair standing in for a serial cable, which tests can cut and restore.

`socat pty,raw,echo=0,link=<dir>/a pty,raw,echo=0,link=<dir>/b` creates two pseudo-terminals and
copies bytes between their master sides; each test opens the slave paths `a` and `b` as if they
were /dev/ttyS0 at both ends of a null-modem cable. Killing socat closes both masters: a process
holding a slave then reads EOF and gets EIO on write, which is how a cut line looks. PTYs ignore
the baud rate and have no modem lines (DCD, RTS/CTS): see vpnd_runtime/io/serial.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tests.helpers.wait import poll_until


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """`poll_until` under the name the serial tests use."""
    poll_until(predicate, timeout, what)


@dataclass
class PtyPair:
    """Two PTY slave paths joined by a socat process that this object owns (by PID)."""

    directory: str
    a: str
    b: str
    log: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 5.0) -> None:
        """Start socat and wait (bounded) until both links exist."""
        for path in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "socat",
                    "-d",
                    "-d",
                    f"pty,raw,echo=0,link={self.a}",
                    f"pty,raw,echo=0,link={self.b}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"socat exited with {proc.returncode}; see {self.log}")
            return os.path.exists(self.a) and os.path.exists(self.b)

        wait_until(ready, timeout, f"socat PTY links {self.a} and {self.b}")

    def cut(self, timeout: float = 5.0) -> None:
        """Cut the line: stop socat (by PID) so both masters close; the slaves see EOF/EIO."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        self.proc = None
        for path in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def restore(self, timeout: float = 5.0) -> None:
        """Restore the line: a fresh socat at the same paths (ends must reopen their devices)."""
        self.cut(timeout)
        self.start(timeout)

    @property
    def running(self) -> bool:
        """True while the socat process is alive."""
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def pty_pair(tag: str, timeout: float = 5.0) -> Iterator[PtyPair]:
    """Yield a started PtyPair in a temp dir prefixed with `tag`; always kill socat and clean up."""
    if shutil.which("socat") is None:
        raise RuntimeError("socat is not installed (apt-get install socat)")
    directory = tempfile.mkdtemp(prefix=f"{tag}-pty-")
    pair = PtyPair(
        directory=directory,
        a=os.path.join(directory, "a"),
        b=os.path.join(directory, "b"),
        log=os.path.join(directory, "socat.log"),
    )
    try:
        pair.start(timeout)
        yield pair
    finally:
        try:
            pair.cut(timeout)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class PacedLine:
    """A null-modem cable that carries bytes no faster than a real 8N1 line at `speed`.

    Two PTY pairs; a thread copies between their master sides through one token bucket per
    direction at speed/10 bytes per second (bursts of at most `burst` seconds of line time), so
    whatever the slaves are written faster waits in the PTYs' buffers, as it would in a UART's.
    `a` and `b` are the slave paths the two ends open. `carried` counts bytes each way.
    """

    def __init__(self, speed: int, burst: float = 0.02) -> None:
        self.rate = speed / 10.0
        self.burst = max(1.0, self.rate * burst)
        self._ma, self._sa = os.openpty()
        self._mb, self._sb = os.openpty()
        for fd in (self._sa, self._sb):
            import tty

            tty.setraw(fd)
        self.a, self.b = os.ttyname(self._sa), os.ttyname(self._sb)
        self.carried = {"a->b": 0, "b->a": 0}
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._pump, name="paced-line", daemon=True)

    def start(self) -> PacedLine:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for fd in (self._ma, self._sa, self._mb, self._sb):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _pump(self) -> None:
        import select
        import time

        ways = [(self._ma, self._mb, "a->b"), (self._mb, self._ma, "b->a")]
        tokens = {name: self.burst for _, _, name in ways}
        last = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            for _, _, name in ways:
                tokens[name] = min(self.burst, tokens[name] + (now - last) * self.rate)
            last = now
            want = [src for src, _, name in ways if tokens[name] >= 1]
            if not want:
                time.sleep(1 / self.rate)
                continue
            ready, _, _ = select.select(want, [], [], 0.002)
            for src, dst, name in ways:
                if src not in ready:
                    continue
                try:
                    data = os.read(src, int(tokens[name]))
                except OSError:
                    continue  # EIO while no one holds the slave open
                if data:
                    with contextlib.suppress(OSError):
                        os.write(dst, data)
                    tokens[name] -= len(data)
                    self.carried[name] += len(data)


@contextlib.contextmanager
def paced_line(speed: int) -> Iterator[PacedLine]:
    """A PacedLine, stopped and closed on exit."""
    line = PacedLine(speed).start()
    try:
        yield line
    finally:
        line.close()
