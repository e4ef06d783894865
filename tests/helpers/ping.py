"""A ping that runs in the background across an operation and proves no reply was lost.

``with RunningPing(argv) as ping:`` starts ``ping -n -i 0.05 ...`` (argv is the full command,
e.g. under ``ip netns exec``), waits (bounded) for its first reply, and on exit waits for one
reply sent after the block ended, then stops it with SIGINT: so the replies cover the whole
operation however fast it was. :meth:`lost` is every icmp_seq without a reply, except the one
request that may be in flight when ping is stopped.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from types import TracebackType

from tests.helpers.wait import poll_until

_REPLY = re.compile(r"icmp_seq=(\d+) ttl=")
_SENT = re.compile(r"(\d+) packets transmitted")


class RunningPing:
    """``ping`` in the background; its output gathered line by line."""

    def __init__(self, argv: list[str], *, timeout: float = 15.0) -> None:
        self.argv, self.timeout = argv, timeout
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def replies(self) -> set[int]:
        """The sequence numbers answered so far."""
        with self._lock:
            return {int(m.group(1)) for line in self.lines if (m := _REPLY.search(line))}

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    def __enter__(self) -> RunningPing:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        poll_until(lambda: self.replies() or self.proc.poll() is not None, self.timeout,
                   what="the first ping reply")  # fmt: skip
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.proc is not None and self._reader is not None
        try:
            if kind is None:  # a reply sent after the operation: the pings cover all of it
                last = max(self.replies(), default=0)
                poll_until(lambda: max(self.replies(), default=0) > last + 1, self.timeout,
                           what="ping replies after the operation")  # fmt: skip
        finally:
            self.proc.send_signal(signal.SIGINT)  # ping prints its summary
            self.proc.wait(timeout=30)
            self._reader.join(timeout=30)

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def sent(self) -> int:
        """Requests sent, from ping's summary (0 before it stopped)."""
        m = _SENT.search(self.output)
        return int(m.group(1)) if m else 0

    def lost(self) -> list[int]:
        """Requests never answered, but for the last one (in flight when ping was stopped)."""
        sent = self.sent()
        return sorted(set(range(1, sent)) - self.replies())
