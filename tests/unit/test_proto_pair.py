"""An in-memory link between two protocol endpoints with a fake clock (no sockets, no sleeps).

Used by the proto tests: `Pair` pumps `data_to_send()` of each side into `receive_data()` of the
other until both are quiet, collects events per side, and advances a fake clock by calling
`tick()` at every deadline on the way.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vpnd_runtime.proto import (
    Connection,
    Event,
    LinkUp,
    Packets,
    Params,
    ReplayGuard,
)

WALL = 1_780_000_000.0
PSK = bytes(range(32))


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    """Deterministic randomness: equal seeds give byte-identical sessions."""
    r = random.Random(seed)
    return r.randbytes


class Pair:
    """Initiator `i` and responder `r` joined by a lossless in-memory pipe."""

    def __init__(
        self,
        params: Params | None = None,
        *,
        params_r: Params | None = None,
        psk_i: bytes = PSK,
        psk_r: bytes = PSK,
        seed: int = 1,
        guard: ReplayGuard | None = None,
    ) -> None:
        p = params or Params()
        self.now = 0.0
        self.i = Connection("initiator", psk_i, p, seeded_rng(seed), 0.0, wall=WALL)
        self.r = Connection(
            "responder",
            psk_r,
            params_r or p,
            seeded_rng(seed + 1000),
            0.0,
            replay_guard=guard or ReplayGuard(),
            wall=WALL,
        )
        self.events_i: list[Event] = []
        self.events_r: list[Event] = []
        self.cut = False  # while True, bytes are held back (a stalled TCP link), not lost
        self._held_to_r = b""
        self._held_to_i = b""

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to send."""
        for _ in range(10_000):
            to_r = self._held_to_r + self.i.data_to_send()
            to_i = self._held_to_i + self.r.data_to_send()
            self._held_to_r = self._held_to_i = b""
            if self.cut:
                self._held_to_r, self._held_to_i = to_r, to_i
                return
            if not to_r and not to_i:
                return
            if to_r:
                self.events_r += self.r.receive_data(to_r, self.now)
            if to_i:
                self.events_i += self.i.receive_data(to_i, self.now)
        raise AssertionError("the two ends never went quiet")

    def handshake(self) -> None:
        """Run the handshake and check that both ends report LinkUp."""
        self.i.start(self.now)
        self.pump()
        assert any(isinstance(e, LinkUp) for e in self.events_i), self.events_i
        assert any(isinstance(e, LinkUp) for e in self.events_r), self.events_r

    def tick(self) -> None:
        """Run both sides' timers at the current time, then pump."""
        self.events_i += self.i.tick(self.now)
        self.events_r += self.r.tick(self.now)
        self.pump()

    def advance(self, to: float) -> None:
        """Move the fake clock to `to`, firing every deadline on the way."""
        for _ in range(100_000):
            deadlines = [
                d for d in (self.i.next_deadline(), self.r.next_deadline()) if d is not None
            ]
            if not deadlines or min(deadlines) > to:
                break
            self.now = max(self.now, min(deadlines))
            self.tick()
        else:
            raise AssertionError("timers never settled")
        self.now = to

    @staticmethod
    def packets(events: list[Event]) -> list[bytes]:
        """All packets delivered in `events`, flattened in order."""
        return [p for e in events if isinstance(e, Packets) for p in e.packets]
