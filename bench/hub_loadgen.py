"""Many vpnd clients from one process: the load generator of `bench.bench_hub`.

    python -m bench.hub_loadgen --hub 198.18.1.1:379 --keydir DIR --clients N \
        --sources 198.18.4.0/22 --tunnel-net 198.19.16.0/20 [--keepalive 10 ...]

Client i uses the key `DIR/c{i:04d}.key`, announces the tunnel address `tunnel_address(net, i)`
and connects from `source_address(sources, i)` (one source per client while there are enough, so
the hub's per-source cap on pending handshakes never holds a client back). Each client is the
project's own protocol core (`Connection`, initiator role) over the project's own TCP carrier:
every socket is read through one selector, its bytes go to `receive_data`, `tick` runs at
`next_deadline`, and `data_to_send` is flushed at once, so the hub's keepalive pings are answered
and our own pings and rekeys run as a real client's would.

At most `--inflight` handshakes are under way at any time (and `--per-source` per source
address); a client whose handshake fails (refused, evicted, timed out) is tried again until the
ramp deadline. A session lost after it was up is counted and *not* reconnected: it is a finding.

Talks to its caller in JSON lines on stdout:
  {"event": "ready", ...}                  keys loaded, before the first connect
  {"event": "ramp", ...}                   all clients up, or the ramp deadline passed
  {"event": "status", ...}                 answer to a "status" line on stdin
  {"event": "bye", ...}                    stdin closed: every session closed, exiting
Times are seconds on this process's monotonic clock since the first connect.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import inspect
import ipaddress
import json
import os
import resource
import selectors
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vpnd_runtime.io import tcp
from vpnd_runtime.keyfile import load_key
from vpnd_runtime.proto import (
    Closed,
    Connection,
    KeepaliveRtt,
    LinkUp,
    Params,
    PeerDead,
    ProtocolError,
    State,
)

#: Every address the benchmark uses lies in the benchmarking range (RFC 2544).
BENCH_RANGE = ipaddress.ip_network("198.18.0.0/15")

#: Pause before retrying a failed handshake: doubles per try of that client, up to RETRY_MAX.
RETRY_FIRST, RETRY_MAX = 0.05, 2.0

#: Does this protocol core let an initiator announce its tunnel address (hub spec, message 1)?
ANNOUNCE_SUPPORTED = "announce" in inspect.signature(Connection).parameters


def key_name(i: int) -> str:
    """File name of generated client i's key (and, without the suffix, of its peer file)."""
    return f"c{i:04d}.key"


def _hosts(cidr: str) -> ipaddress.IPv4Network:
    net = ipaddress.ip_network(cidr)
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(BENCH_RANGE):
        raise ValueError(f"{cidr}: the benchmark only uses addresses inside {BENCH_RANGE}")
    if net.num_addresses < 4:
        raise ValueError(f"{cidr}: needs at least a /30")
    return net


def host_count(cidr: str) -> int:
    """Usable host addresses in `cidr` (network and broadcast excluded)."""
    return _hosts(cidr).num_addresses - 2


def source_address(cidr: str, i: int) -> str:
    """The carrier source address of client i: the hosts of `cidr` in order, wrapping around."""
    net = _hosts(cidr)
    return str(net.network_address + 1 + i % (net.num_addresses - 2))


def tunnel_address(cidr: str, i: int) -> str:
    """The tunnel address client i announces (its peer file's `remote`); no wrapping."""
    net = _hosts(cidr)
    if i >= net.num_addresses - 2:
        raise ValueError(f"{cidr} has no tunnel address for client {i}")
    return str(net.network_address + 1 + i)


class DeadlineQueue:
    """Timers of many clients in one heap; re-arming a client invalidates its older entry.

    `arm(key, when)` (when None: disarm), `due(now)` pops the keys whose current deadline is
    reached, `next()` is the earliest live deadline (None when nothing is armed).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._current: dict[int, float] = {}

    def arm(self, key: int, when: float | None) -> None:
        """Set (or with None clear) the one deadline of `key`."""
        if when is None:
            self._current.pop(key, None)
            return
        if self._current.get(key) == when:
            return
        self._current[key] = when
        heapq.heappush(self._heap, (when, key))

    def _drop_stale(self) -> None:
        heap, current = self._heap, self._current
        while heap and current.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def next(self) -> float | None:
        """The earliest armed deadline."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[int]:
        """Pop and return every key whose deadline is at or before `now` (each disarmed)."""
        out = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return out
            _, key = heapq.heappop(self._heap)
            del self._current[key]
            out.append(key)


@dataclass
class Client:
    """One simulated client: its identity and, while connected, its socket and session."""

    index: int
    source: str
    address: str
    psk: bytes
    carrier: tcp.TcpCarrier | None = None
    conn: Connection | None = None
    connecting: bool = False
    up_at: float | None = None
    attempts: int = 0
    holds_slot: bool = False  # counted in the in-flight window (connecting or handshaking)
    lost: str | None = None  # why a session that was up ended
    rtts: list[float] = field(default_factory=list)


class LoadGenerator:
    """Drives `clients` initiator sessions against one hub from one selector loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        host, _, port = args.hub.rpartition(":")
        if ipaddress.ip_address(host) not in BENCH_RANGE:
            raise ValueError(f"--hub {host}: not inside {BENCH_RANGE}")
        self.hub = (host, int(port))
        self.params = Params(
            cipher=args.cipher,
            keepalive=args.keepalive,
            noanswer=args.noanswer,
            keyttl=args.keyttl,
            handshake_timeout=args.handshake_timeout,
        )
        keydir = Path(args.keydir)
        self.clients = [
            Client(
                i,
                source_address(args.sources, i),
                tunnel_address(args.tunnel_net, i),
                load_key(keydir / key_name(i)),
            )
            for i in range(args.clients)
        ]
        self.sel = selectors.DefaultSelector()
        self.timers = DeadlineQueue()
        self.queue: list[int] = list(range(args.clients))  # waiting to (re)connect, in order
        self.later: list[tuple[float, int]] = []  # (retry time, client) after a failed try
        self.inflight = 0
        self.inflight_by_source: Counter[str] = Counter()
        self.t0: float | None = None
        self.up = 0
        self.failures: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.rtt_count = 0
        self.ramp_reported = False
        self.ramp_deadline = float("inf")
        self.stdin_open = True
        self.stdin_buf = b""

    # ------------------------------------------------------------------ output
    def emit(self, event: str, **fields: object) -> None:
        """One JSON line to the caller."""
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    def rel(self, t: float | None) -> float | None:
        """`t` in seconds since the first connect."""
        return None if t is None or self.t0 is None else round(t - self.t0, 4)

    def figures(self) -> dict[str, object]:
        """The current counts (for ramp and status lines)."""
        ups = sorted(c.up_at for c in self.clients if c.up_at is not None)
        missed = [c.conn.stats.missed_keepalives for c in self.clients if self._is_up(c)]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "clients": len(self.clients),
            "up": sum(1 for c in self.clients if self._is_up(c)),
            "ever_up": len(ups),
            "first_up": self.rel(ups[0]) if ups else None,
            "last_up": self.rel(ups[-1]) if ups else None,
            "attempts": sum(c.attempts for c in self.clients),
            "failures": dict(self.failures),
            "lost": dict(self.lost),
            "keepalive_rtts": self.rtt_count,
            "max_missed_keepalives": max(missed, default=0),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "announce": ANNOUNCE_SUPPORTED,
        }

    @staticmethod
    def _is_up(c: Client) -> bool:
        return c.conn is not None and c.conn.state is State.ESTABLISHED and c.lost is None

    # ------------------------------------------------------------------ connecting
    def launch(self, now: float) -> None:
        """Start connects while the in-flight window (total and per source) allows."""
        a = self.args
        if now >= self.ramp_deadline:
            return
        while self.later and self.later[0][0] <= now:
            self.queue.append(heapq.heappop(self.later)[1])
        skipped: list[int] = []
        while self.queue and self.inflight < a.inflight:
            i = self.queue.pop(0)
            c = self.clients[i]
            if self.inflight_by_source[c.source] >= a.per_source:
                skipped.append(i)
                continue
            self.connect(c, now)
        self.queue[:0] = skipped

    def connect(self, c: Client, now: float) -> None:
        """Open client `c`'s socket from its source address (non-blocking)."""
        if self.t0 is None:
            self.t0 = now
        c.attempts += 1
        c.holds_slot = True
        self.inflight += 1
        self.inflight_by_source[c.source] += 1
        try:
            sock = tcp.start_connect(self.hub, (c.source, 0))
        except OSError as exc:
            self.handshake_failed(c, f"connect: {exc.strerror or exc}", now)
            return
        c.carrier = tcp.TcpCarrier(sock, f"{c.source}")
        c.connecting = True
        kwargs = {"announce": ipaddress.ip_address(c.address)} if ANNOUNCE_SUPPORTED else {}
        c.conn = Connection(
            "initiator", c.psk, self.params, os.urandom, now, wall=time.time(), **kwargs
        )
        self.sel.register(sock, selectors.EVENT_WRITE, c.index)
        self.timers.arm(c.index, c.conn.next_deadline())

    def handshake_failed(self, c: Client, reason: str, now: float) -> None:
        """A try that never came up: free its slot and try again after a growing pause."""
        self.failures[reason[:80]] += 1
        self.close(c)
        pause = min(RETRY_MAX, RETRY_FIRST * 2 ** min(c.attempts - 1, 10))
        heapq.heappush(self.later, (now + pause, c.index))

    def release(self, c: Client) -> None:
        """Give back the client's in-flight slot (its handshake is over, either way)."""
        if c.holds_slot:
            c.holds_slot = False
            self.inflight -= 1
            self.inflight_by_source[c.source] -= 1

    def close(self, c: Client) -> None:
        """Drop the client's socket and its in-flight slot."""
        self.release(c)
        if c.carrier is not None:
            self.sel.unregister(c.carrier.sock)
            c.carrier.close()
            c.carrier = None
        c.connecting = False
        self.timers.arm(c.index, None)

    # ------------------------------------------------------------------ session I/O
    def on_ready(self, c: Client, mask: int, now: float) -> None:
        """Selector callback for one client socket."""
        carrier, conn = c.carrier, c.conn
        assert carrier is not None and conn is not None
        if c.connecting:
            try:
                tcp.finish_connect(carrier.sock)
            except OSError as exc:
                self.handshake_failed(c, f"connect: {exc.strerror}", now)
                return
            c.connecting = False
            conn.start(now)
            self.flush(c)
            return
        if mask & selectors.EVENT_READ:
            try:
                data = carrier.read()
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self.ended(c, f"read error: {exc.strerror}", now)
                return
            if data == b"":
                self.ended(c, "closed by the hub", now)
                return
            if data:
                try:
                    events = conn.receive_data(data, now)
                except ProtocolError as exc:
                    self.ended(c, f"protocol error: {exc}", now)
                    return
                self.handle(c, events, now)
                if c.carrier is None:
                    return
        self.flush(c)

    def handle(self, c: Client, events: list, now: float) -> None:
        """React to the protocol's events for client `c`."""
        for ev in events:
            if isinstance(ev, LinkUp):
                c.up_at = now
                self.up += 1
                self.release(c)
            elif isinstance(ev, KeepaliveRtt):
                self.rtt_count += 1
            elif isinstance(ev, (PeerDead, Closed)):
                self.ended(c, f"{type(ev).__name__}: {ev.reason}", now)
                return

    def ended(self, c: Client, reason: str, now: float) -> None:
        """A session ended: before LinkUp it is retried, after it it is counted as lost."""
        conn = c.conn
        if conn is not None and conn.stats.established_at is not None:
            c.lost = reason
            self.lost[reason[:80]] += 1
            self.close(c)
        else:
            self.handshake_failed(c, reason, now)

    def flush(self, c: Client) -> None:
        """Queue what the protocol wants sent, push it, re-arm the client's timer."""
        carrier, conn = c.carrier, c.conn
        if carrier is None or conn is None:
            return
        try:
            carrier.write(conn.data_to_send())
            done = carrier.flush()
        except OSError as exc:
            self.ended(c, f"write error: {exc.strerror}", time.monotonic())
            return
        mask = selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE)
        self.sel.modify(carrier.sock, mask, c.index)
        self.timers.arm(c.index, conn.next_deadline())

    def run_timers(self, now: float) -> None:
        """`tick` every client whose deadline has come."""
        for i in self.timers.due(now):
            c = self.clients[i]
            if c.conn is None or c.carrier is None:
                continue
            if c.connecting:  # the handshake deadline passed before TCP even connected
                self.handshake_failed(c, "connect: timed out", now)
                continue
            self.handle(c, c.conn.tick(now), now)
            self.flush(c)

    # ------------------------------------------------------------------ caller commands
    def on_stdin(self) -> None:
        """Commands from the caller, one per line: "status"; end of input ends the run."""
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            self.stdin_open = False
            return
        self.stdin_buf += data
        *lines, self.stdin_buf = self.stdin_buf.split(b"\n")
        for line in lines:
            if line.strip() == b"status":
                self.emit("status", **self.figures())

    def maybe_report_ramp(self, now: float) -> None:
        if self.ramp_reported:
            return
        if self.up >= len(self.clients) or now >= self.ramp_deadline:
            self.ramp_reported = True
            self.queue.clear()  # after the ramp, nobody is (re)connected
            self.later.clear()
            self.emit("ramp", **self.figures())

    def run(self) -> None:
        """The loop: connect, read, tick, until the caller closes stdin."""
        self.sel.register(sys.stdin, selectors.EVENT_READ, None)
        self.emit("ready", clients=len(self.clients), announce=ANNOUNCE_SUPPORTED)
        self.ramp_deadline = time.monotonic() + self.args.ramp_timeout
        while self.stdin_open:
            now = time.monotonic()
            self.launch(now)
            nxt = self.timers.next()
            if self.later and not self.ramp_reported:
                nxt = self.later[0][0] if nxt is None else min(nxt, self.later[0][0])
            limit = 1.0 if self.ramp_reported else 0.05
            timeout = limit if nxt is None else min(limit, max(0.0, nxt - now))
            for key, mask in self.sel.select(timeout):
                now = time.monotonic()
                if key.data is None:
                    self.on_stdin()
                else:
                    self.on_ready(self.clients[key.data], mask, now)
            now = time.monotonic()
            self.run_timers(now)
            self.maybe_report_ramp(now)
        self.shutdown()

    def shutdown(self) -> None:
        """Say goodbye on every session and close every socket."""
        figures = self.figures()
        for c in self.clients:
            if c.conn is not None and c.carrier is not None:
                c.conn.close("benchmark over")
                with contextlib.suppress(OSError):
                    c.carrier.write(c.conn.data_to_send())
                self.close(c)
        self.emit("bye", **figures)


def raise_fd_limit(need: int) -> None:
    """Raise the soft open-files limit to cover `need` descriptors (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hub", required=True, help="HOST:PORT of the hub")
    ap.add_argument("--keydir", required=True, help="directory of c0000.key, c0001.key, ...")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--sources", default="198.18.4.0/22", help="carrier source addresses")
    ap.add_argument("--tunnel-net", default="198.19.16.0/20", help="announced tunnel addresses")
    ap.add_argument("--cipher", default="chacha20-poly1305")
    ap.add_argument("--keepalive", type=float, default=10.0)
    ap.add_argument("--noanswer", type=int, default=3)
    ap.add_argument("--keyttl", type=float, default=120.0)
    ap.add_argument("--handshake-timeout", type=float, default=10.0)
    ap.add_argument("--inflight", type=int, default=16, help="handshakes under way at most")
    ap.add_argument("--per-source", type=int, default=1, help="of which per source address")
    ap.add_argument("--ramp-timeout", type=float, default=60.0, help="stop (re)connecting after")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(args.clients + 64)
    LoadGenerator(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
