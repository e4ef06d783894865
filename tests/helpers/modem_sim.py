"""A small Hayes (AT command set) modem simulator on one end of a PTY pair, run in a thread.

It answers the way a modem in verbose mode does (`\\r\\nOK\\r\\n`): `AT`, `ATZ`, `AT&F`, `ATE0/1`,
`ATH` and any other `AT…` command get OK; `ATD…` (ATDT/ATDP) gets the configured dial result
(`CONNECT 115200`, `BUSY`, `NO CARRIER`, or None for silence, a modem that never answers); a line
not starting with AT gets ERROR. After CONNECT it is "online" and records data instead of
parsing commands. Commands are terminated by CR, as modems expect; LF is ignored.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import tty
from collections.abc import Iterator


class ModemSim:
    """Simulated modem on the PTY slave at `path`; start() runs it, stop() joins it."""

    def __init__(
        self,
        path: str,
        dial_result: str | None = "CONNECT 115200",
        echo: bool = False,
        dial_delay: float = 0.0,
    ) -> None:
        self.path = path
        self.dial_result = dial_result
        self.echo = echo
        self.dial_delay = dial_delay
        self.commands: list[str] = []
        self.online = False
        self.data_received = bytearray()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        self._thread = threading.Thread(target=self._run, name=f"modem-sim {path}", daemon=True)

    def start(self) -> ModemSim:
        """Start answering in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (bounded join), close the PTY end; re-raise any error it hit."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._thread.is_alive():
            raise RuntimeError("modem simulator thread did not stop")
        if self.error is not None:
            raise self.error

    # -- the modem ----------------------------------------------------------------------------

    def _send(self, text: str) -> None:
        data = text.encode("ascii")
        while data:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                select.select([], [self._fd], [], 0.05)
                continue
            data = data[n:]

    def _result(self, word: str) -> None:
        self._send(f"\r\n{word}\r\n")

    def _command(self, line: str) -> None:
        self.commands.append(line)
        cmd = line.strip().upper()
        if not cmd.startswith("AT"):
            self._result("ERROR")
            return
        body = cmd[2:]
        if body.startswith("D"):
            if self.dial_delay and self._stop.wait(self.dial_delay):
                return
            if self.dial_result is None:
                return  # silence: the line rings out and the modem never reports
            self._result(self.dial_result)
            if self.dial_result.startswith("CONNECT"):
                self.online = True
            return
        if "E0" in body:
            self.echo = False
        elif "E1" in body:
            self.echo = True
        self._result("OK")

    def _run(self) -> None:
        line = bytearray()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._fd, self._wake_r], [], [], 1.0)
                if self._wake_r in ready:
                    return
                if self._fd not in ready:
                    continue
                try:
                    chunk = os.read(self._fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # the line was cut
                if not chunk:
                    return
                if self.online:
                    self.data_received += chunk
                    continue
                if self.echo:
                    self._send(chunk.decode("latin-1"))
                for byte in chunk:
                    if byte == 0x0D:
                        if line:
                            self._command(line.decode("latin-1"))
                        line.clear()
                    elif byte != 0x0A:
                        line.append(byte)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc


@contextlib.contextmanager
def modem_sim(path: str, **options: object) -> Iterator[ModemSim]:
    """Run a ModemSim on `path` for the duration of the block; always stop it."""
    sim = ModemSim(path, **options)  # type: ignore[arg-type]
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
