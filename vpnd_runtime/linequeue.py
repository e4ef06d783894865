"""What goes on a slow serial line next: small packets first, bulk in line-sized frames.

At 115,200 bit/s a 1,400-byte packet holds the line for 120 ms, and at 9,600 bit/s for 1.5 s;
whatever waits in a queue behind it waits that long per packet. So on a serial link the daemon
reads the TUN eagerly into this scheduler instead of leaving packets in the kernel's queues (or
writing them into the tty's buffers, which hold seconds of line time and cannot be reordered),
and feeds the line only as fast as it carries bytes (see `Pacer`):

* **Urgent** packets — up to `URGENT_MAX` bytes: pings, TCP ACKs, keystrokes, DNS — go first,
  so they wait at most for the frame already on the wire, never behind a bulk transfer.
* **Bulk** packets queue behind them, up to a cap of about `BULK_SECONDS` of line time (at least
  `BULK_MIN_PACKETS`); past it the newest is dropped and counted, as a router's full queue does,
  so the inner TCP slows down instead of the latency growing without end.
* Each frame carries at most one "frame budget" of packets (about `FRAME_SECONDS` of line time),
  and never a bulk packet when an urgent one waits, so a frame on the wire is short.

Pure: no I/O; the daemon passes the clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: A packet this small (IP bytes) is urgent: it jumps the bulk queue.
URGENT_MAX = 256
#: Most urgent packets held (a flood of small packets must not grow memory without end).
URGENT_CAP = 256
#: The bulk queue holds about this much line time, and at least this many packets.
BULK_SECONDS = 1.5
BULK_MIN_PACKETS = 4
#: A frame carries about this much line time of packets (at least one packet).
FRAME_SECONDS = 0.05
#: The line is fed again when what was written will have left within this time (so it never
#: idles between frames, and the tty's own buffer stays nearly empty).
LEAD_SECONDS = 0.02


def line_rate(speed: int) -> float:
    """Bytes per second an 8N1 line carries at `speed` bit/s (10 bits per byte)."""
    return speed / 10.0


@dataclass
class LineQueue:
    """The two queues of one serial link; `hdr` is the TUN's virtio header length."""

    speed: int
    hdr: int = 0
    urgent: deque[bytes] = field(default_factory=deque)
    bulk: deque[bytes] = field(default_factory=deque)
    bulk_bytes: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rate = line_rate(self.speed)
        self.bulk_cap = max(int(rate * BULK_SECONDS), BULK_MIN_PACKETS * 1500)
        self.frame_budget = max(int(rate * FRAME_SECONDS), 1)

    def __len__(self) -> int:
        return len(self.urgent) + len(self.bulk)

    def push(self, packets: list[bytes]) -> None:
        """Queue packets read from the TUN (dropping what does not fit, counted)."""
        for packet in packets:
            if len(packet) - self.hdr <= URGENT_MAX:
                if len(self.urgent) >= URGENT_CAP:
                    self._drop("line_urgent_full")
                    continue
                self.urgent.append(packet)
            else:
                if self.bulk_bytes + len(packet) > self.bulk_cap and self.bulk:
                    self._drop("line_queue_full")
                    continue
                self.bulk.append(packet)
                self.bulk_bytes += len(packet)

    def take(self) -> list[bytes]:
        """The packets of the next frame: urgent ones first, then bulk while the frame budget
        lasts (always at least one packet when any waits)."""
        batch: list[bytes] = []
        size = 0
        budget = self.frame_budget
        while self.urgent and (not batch or size + len(self.urgent[0]) <= budget):
            packet = self.urgent.popleft()
            batch.append(packet)
            size += len(packet)
        if batch:
            return batch  # a bulk packet after them would hold the line for a long frame
        while self.bulk and (not batch or size + len(self.bulk[0]) <= budget):
            packet = self.bulk.popleft()
            self.bulk_bytes -= len(packet)
            batch.append(packet)
            size += len(packet)
        return batch

    def _drop(self, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1


class Pacer:
    """A model of the line: when the bytes handed to it will have been sent at `speed`.

    A PTY ignores the baud rate and a UART's driver buffers kilobytes; either way bytes written
    ahead of the line wait where nothing can reorder them. The pacer keeps the lead small.
    """

    def __init__(self, speed: int) -> None:
        self.rate = line_rate(speed)
        self.free_at = 0.0  # when the line will have sent everything written so far
        self.lead_bytes = max(1, int(self.rate * LEAD_SECONDS))

    def sent(self, nbytes: int, now: float) -> None:
        """Account for `nbytes` written to the line at `now`."""
        self.free_at = max(self.free_at, now) + nbytes / self.rate

    def ready_at(self) -> float:
        """When the line may be fed again (what is written leaves within LEAD_SECONDS)."""
        return self.free_at - LEAD_SECONDS

    def ready(self, now: float) -> bool:
        """True when the line may take the next frame now."""
        return now >= self.ready_at()
