"""vpnd's daemon: the one place where the sans-I/O protocol meets sockets, serial lines and the TUN.

Theory of operation
-------------------
One process serves one config file: a point-to-point link (one peer), or a **hub** (a server
with a `peers` directory: many clients, one port, one TUN). A single thread runs a selector loop
over: the carrier listener (server), the carrier connections, the TUN (while any peer is up), and
a wake-up pipe for signals. Time is read once per loop turn and handed to the protocol core, which
owns every rule (handshake, counters, keepalive, rekey); the daemon owns I/O, hooks, routes,
reconnects and the status record. The house:

* `session.py` — a session (a carrier and the protocol on it), and what a config gives it;
* `dialer.py` — the end that opens the carrier (client, serial line): connect, backoff, redial;
* `acceptor.py` — the end that waits (server): the TCP listener or the one UDP socket, caps and
  handshake budgets for unauthenticated peers, UDP demultiplexing and roaming;
* `peers.py` — the peer table: who may connect with which key, and where each packet goes;
* `datapath.py` — the per-packet rules of a hub (route by destination, allowed sources);
* `link.py` — the TUN's life cycle, routes and hooks; `linequeue.py` — a slow line's scheduler;
* `carriers.py` / `io/tcp.py` / `io/udp.py` / `io/serial.py` — the carriers; `io/tun.py` — the
  TUN; `io/gso.py` — the TCP segmentation/coalescing that turns TUN super-packets into
  MTU-sized datagrams and back;
* `reload.py` — SIGHUP: change no more than what changed;
* `pipeline.py` — the data path: TUN -> protocol -> carrier and back, back-pressure;
* this module — the loop, timers, sessions' life cycle, status;
* `process.py` — logging, the pidfile, detaching, dropping privileges.

Link life cycle (per peer)::

    client: CONNECTING -tcp-> HANDSHAKE -LinkUp-> UP -dead/EOF/error-> DOWN -backoff-> CONNECTING
    server: LISTENING -accept-> (pending handshakes: capped, each with a deadline) -LinkUp-> UP

The TUN exists while at least one peer is up: created (slipup) when the first comes up and
removed (slipdown) when the last goes down — for a point-to-point link exactly "on link up/down".
On a peer's UP its routes are added and linkup runs; on DOWN linkdown runs and its routes go. A
server keeps accepting while UP: a client that restarted authenticates on a new connection, which
then replaces the old one (the link stays up; the old session is closed). Unauthenticated
connections get no answer, a deadline and caps (in all and per source address); a connection
that has proven its key is never evicted to make room for them.

The data path (the outbound and inbound pipelines, back-pressure, the lone-packet path) is
pipeline.py's: `Daemon` takes its methods from the `Pipeline` mixin there.

Timers live in a heap keyed by each session's next protocol deadline, so a hub with a thousand
idle clients wakes only when some client's keepalive is due.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vpnd_runtime import heap, reload
from vpnd_runtime.acceptor import Acceptor
from vpnd_runtime.carriers import Jitter, RandomDev, SerialCarrier
from vpnd_runtime.config import Config
from vpnd_runtime.dialer import Dialer
from vpnd_runtime.io import tcp
from vpnd_runtime.io.hooks import HookRunner
from vpnd_runtime.io.poller import EPOLLIN, Poller, mask_of
from vpnd_runtime.io.tun import TunError
from vpnd_runtime.io.udp import UdpLink
from vpnd_runtime.linequeue import LineQueue
from vpnd_runtime.link import Link
from vpnd_runtime.peers import DOWN, UP, Peer, PeerTable
from vpnd_runtime.pipeline import STALL_AFTER, TUN_BATCH, Pipeline
from vpnd_runtime.proto.connection import Connection
from vpnd_runtime.proto.handshake import ReplayGuard
from vpnd_runtime.session import Session
from vpnd_runtime.status import StatusRecord, StatusWriter

if TYPE_CHECKING:  # the serial pieces are imported only by links that use them
    from vpnd_runtime.proto.slip import SlipFramer

log = logging.getLogger("vpnd")

#: How often the status file is refreshed while nothing changes.
STATUS_INTERVAL = 1.0
#: A hub publishes changes at most this often (a thousand clients arriving = one write per turn).
HUB_STATUS_MIN_INTERVAL = 0.2
#: Longest a shutdown waits for linkdown/slipdown hooks.
SHUTDOWN_HOOK_WAIT = 35.0
#: A session replaced by a newer one of the same peer is still read this long.
DRAIN_SECONDS = 2.0


class _Ring:
    """The daemon's current peer table as a KeyRing: handshakes in flight see reloads."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def keys_for(self, key_id: bytes) -> Sequence[bytes]:
        return self._daemon.table.keys_for(key_id)

    def admit(self, psk: bytes, address: Any) -> Peer | None:
        return self._daemon.table.admit(psk, address)


class Daemon(Pipeline):
    """Runs one config's link(s) until told to stop. `run()` returns the process exit code."""

    def __init__(self, config: Config, table: PeerTable) -> None:
        self.config = config
        self.table = table
        self.hub = config.is_hub
        self.sel = Poller()  # epoll without the selectors module's layers (io/poller.py)
        self.hooks = HookRunner()
        self.status = StatusRecord(
            config=config.source,
            mode=config.mode,
            interface=config.interface,
            local=str(config.local),
            remote=str(config.remote) if config.remote is not None else "",
            key_fingerprint=self.top_fingerprint(),
        )
        self.status.hub = self.hub
        self.status.local6 = str(config.local6) if config.local6 is not None else None
        self.status.remote6 = str(config.remote6) if config.remote6 is not None else None
        if not self.hub:
            self.status.next_key_fingerprint = table.peers[0].next_fingerprint
        self.writer = StatusWriter(config.statusfile)
        self.rng = RandomDev(config.randomdev)
        self.jitter = Jitter()  # backoff jitter, not crypto
        self.replay_guard: Any = None
        self.ring = _Ring(self)
        self.acceptor = Acceptor(self)
        self.dialer = Dialer(self)
        self.pending: list[Session] = []
        self.link = Link(config, self.hooks, self.status, lambda: self._watch_tun(False))
        self.tun_batch = TUN_BATCH
        #: A serial link's scheduler (linequeue.py): packets wait here, not in the tty's buffers.
        self.lineq: LineQueue | None = None
        self._wire_base = (0, 0)  # carrier bytes in/out of sessions already closed
        self._moved = 0  # carrier bytes in + out at the last status write (_trim_when_idle)
        self._heap_busy = False
        self._drop_base: dict[str, int] = {}  # protocol/line drops of sessions already closed
        self._blocked: set[Session] = set()  # up sessions with output queued
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self.tun_registered = False
        self.stopping = False
        self.reload_requested = False
        self.draining: list[tuple[float, Session]] = []  # replaced sessions, read until then
        self.exit_code = 0
        self._status_due = 0.0
        self.status_dirty = True
        self._last_publish = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        #: The deadline the last wait was computed for: `_timers` runs once it has passed.
        self._timers_due = 0.0
        self._again = False  # the last turn's wait returned ready fds
        self._tun_at = 0.0  # when `_on_tun` last read a packet
        self._config_flags()

    def _config_flags(self) -> None:
        """What the loop decides per config rather than per packet (again after a reload)."""
        cfg = self.config
        #: A point-to-point TCP link: a lone packet takes the short path (`_on_tun`).
        self._lone = not self.hub and not cfg.is_serial and cfg.transport != "udp"
        #: A serial line's timers (carrier detect, line pacing) run every turn.
        self._tick_always = cfg.is_serial
        self._timers_due = 0.0

    def top_fingerprint(self) -> str:
        if self.hub:
            return f"{len({p.key for p in self.table})} keys" if len(self.table) else "-"
        return self.table.peers[0].fingerprint

    @property
    def peer(self) -> Peer:
        """The one peer of a point-to-point link."""
        return self.table.peers[0]

    @property
    def active(self) -> Session | None:
        """The session of a point-to-point link's peer, when up."""
        return None if self.hub else self.peer.session

    # ----------------------------------------------------------------- main loop
    def run(self, ready: Callable[[str | None], None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT; `ready(None)` once started, else `ready(msg)`."""
        self._install_signals()
        try:
            self._start()
        except (OSError, TunError) as exc:
            msg = f"cannot start: {exc}"
            log.error(msg)
            if ready:
                ready(msg)
            self._teardown()
            return 1
        if ready:
            ready(None)
        try:
            while not self.stopping:
                self._turn()
                if self.reload_requested:
                    self.reload_requested = False
                    reload.reload(self)
                    self._config_flags()
        finally:
            self._teardown()
        return self.exit_code

    def _start(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        cfg = self.config
        if self.hub:
            log.info(
                "vpnd hub starting: %s %s, %d clients, %s",
                cfg.interface,
                cfg.local,
                len(self.table),
                self.status.key_fingerprint,
            )
        else:
            log.info(
                "vpnd %s starting: %s %s -> %s, key %s",
                cfg.mode,
                cfg.interface,
                cfg.local,
                cfg.remote,
                self.peer.fingerprint,
            )
        if cfg.mode == "server" and not cfg.is_serial:
            self.acceptor.open_listener()
        else:
            self.status.set_state("connecting")
        self._publish(force=True)

    @property
    def dials(self) -> bool:
        """True when this end opens the carrier itself: a TCP client, or either end of a line."""
        return self.config.mode == "client" or self.config.is_serial

    @property
    def is_udp(self) -> bool:
        """True when the link's carrier is UDP."""
        return self.config.transport == "udp" and not self.config.is_serial

    def set_top_state(self, reason: str | None = None) -> None:
        """A server's top-level state: up while a peer is up, else listening."""
        self.status.set_state("up" if self.link.up_count else "listening", reason)
        self.status_dirty = True

    def _turn(self) -> None:
        epoll = self.sel.epoll
        ready = None
        if self._again:
            # The last turn moved packets: look again before working out how long to sleep. A
            # ping's answer is already queued when the TUN write that carried the request
            # returns, so it is read at once (issue 15).
            ready = epoll.poll(0)
        if ready:
            self._again = False  # the next turn works out its deadline: timers never starve
        else:
            now = time.monotonic()
            timeout = self._next_deadline(now) - now
            ready = epoll.poll(max(0.0, min(timeout, STATUS_INTERVAL)))
            self._again = bool(ready)
        now = time.monotonic()
        callbacks = self.sel.callbacks
        for fd, ev in ready:
            callback = callbacks.get(fd)  # None: unregistered by an earlier callback
            if callback is None:
                continue
            # EPOLLIN is EVENT_READ; anything else is translated
            mask = ev if ev == EPOLLIN else mask_of(ev, self.sel.events[fd])
            if not mask:
                continue
            try:
                callback(mask, now)
            except Exception as exc:  # a bug must cost a reconnect, not the daemon
                self._recover(exc)
        # Nothing in _timers is due before the deadline the wait was computed for (a session's
        # protocol deadline, a stall, a drain, a redial, the acceptor's pauses; a serial line's
        # timers run every turn): a turn that only moved packets skips them (issue 15).
        if now >= self._timers_due or self._tick_always:
            try:
                self._timers(now)
            except Exception as exc:  # likewise
                self._recover(exc)
        if self.status_dirty or now >= self._status_due:
            self._publish()

    def _recover(self, exc: BaseException) -> None:
        """An unexpected error in a callback: log it with its traceback, end every session and
        let the normal reconnect logic bring the link back."""
        log.exception("internal error, restarting the link: %s", exc)
        for s in list(self.pending):
            self.close_session(s)
        ended = False
        for peer in self.table:
            if peer.session is not None:
                self.end_session(peer.session, f"internal error: {exc}")
                ended = True
        if not ended and self.dials and self.dialer.connecting is None and not self.stopping:
            self.dialer.schedule_retry(time.monotonic(), f"internal error: {exc}")

    # ----------------------------------------------------------------- timers
    def file_session(self, session: Session) -> None:
        """File the session under its protocol deadline (after every protocol step)."""
        d = session.conn.next_deadline()
        if d is not None and d != session.deadline:
            session.deadline = d
            heapq.heappush(self._heap, (d, next(self._seq), session))

    def _heap_top(self) -> float | None:
        heap = self._heap
        while heap:
            d, _, s = heap[0]
            if s.closed or s.deadline != d:
                heapq.heappop(heap)  # stale: the session moved on or ended
                continue
            return d
        return None

    def _next_deadline(self, now: float) -> float:
        deadline = now + STATUS_INTERVAL
        top = self._heap_top()
        if top is not None:
            deadline = min(deadline, top)
        if self._blocked and self.hub:
            oldest = min(s.blocked_since or now for s in self._blocked)
            deadline = min(deadline, max(now, oldest + STALL_AFTER))
        if self.draining:
            deadline = min(deadline, max(now, min(until for until, _ in self.draining)))
        active = self.active
        if self.lineq and active is not None and not active.carrier.pending:
            deadline = min(deadline, max(now, active.carrier.pacer.ready_at()))  # type: ignore[attr-defined]
        if self.dials:
            deadline = self.dialer.deadline(now, deadline)
        acc = self.acceptor
        for at in (acc.relisten_at, acc.listener_resume):
            if at is not None:
                deadline = min(deadline, max(now, at))
        self._timers_due = deadline
        return deadline

    def sessions(self) -> list[Session]:
        live = [p.session for p in self.table if p.session is not None]
        return self.pending + live + [s for _, s in self.draining if not s.closed]

    def _timers(self, now: float) -> None:
        self.acceptor.tick(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, s = heapq.heappop(heap)
            if s.closed or s.deadline != d:
                continue
            s.deadline = None
            self.run_protocol(s, now, lambda s=s: s.conn.tick(now))
        if self._blocked and self.hub:
            self._update_tun_watch(now)
        if self.lineq:
            self._feed_line(now)
        active = self.active
        if active is not None and isinstance(active.carrier, SerialCarrier):
            try:
                active.carrier.check_carrier()
            except OSError as exc:
                self.end_session(active, str(exc))
        if self.draining:
            self._drained(now)
        if self.dials:
            self.dialer.tick(now)

    def guard(self) -> Any:
        if self.replay_guard is None:
            self.replay_guard = ReplayGuard()
        return self.replay_guard

    # ----------------------------------------------------------------- data path
    def add_pending(
        self, carrier: tcp.Carrier, conn: Connection, now: float, framer: SlipFramer | None = None
    ) -> Session:
        """A new carrier connection, watched for input, waiting for its handshake."""
        session = Session(carrier, conn, now, framer=framer)
        self.pending.append(session)
        self.sel.register(carrier.fileno(), selectors.EVENT_READ, self._reader(session))
        return session

    # ----------------------------------------------------------------- link up / down
    def _session_up(self, session: Session, now: float) -> None:
        peer = session.peer if session.peer is not None else self._peer_of(session)
        if session in self.pending:
            self.pending.remove(session)
        if peer is None:
            self._drop_session(session, "no such client (removed by a reload?)")
            return
        if not self.dials and not tcp.client_allowed(
            _addr(session), peer.client_host, peer.client_port
        ):
            self._drop_session(
                session,
                f"client {peer.name} may connect only from {peer.client_host}:"
                f"{peer.client_port or 'any'}",
            )
            self.status.drops["refused_client"] = self.status.drops.get("refused_client", 0) + 1
            return
        session.peer = peer
        session.up = True
        peer.session_fingerprint = peer.fingerprint_of(session.conn.key_id)
        if not self.hub:
            self.status.session_key_fingerprint = peer.session_fingerprint
        previous = peer.session
        peer.session = session
        peer.endpoint = session.carrier.peer
        peer.session_started = time.time()
        peer.last_handshake = peer.session_started
        peer.epoch = 0
        if session.blocked_since is not None:
            self._blocked.add(session)
        if not self.hub:
            self.status.peer = session.carrier.peer
            self.status.session_started = peer.session_started
            self.status.epoch = 0
        if previous is not None:
            log.info(
                "%snew authenticated session from %s replaces the one from %s",
                f"{peer.name}: " if self.hub else "",
                session.carrier.peer,
                previous.carrier.peer,
            )
            self.status.reconnects += 1
            peer.reconnects += 1
            self._drain(previous, now)
            self._update_tun_watch(now)
            self.status_dirty = True
            return
        if self.dials:
            # Other half-open attempts are moot once one session is up.
            for other in list(self.pending):
                self.close_session(other)
        self.dialer.link_since = now
        try:
            self._peer_up(peer, session)
        except OSError as exc:  # TunError included
            log.error("cannot bring the link up: %s", exc)
            self.end_session(session, f"local error: {exc}")

    def _drain(self, session: Session, now: float) -> None:
        """A replaced session is read for `DRAIN_SECONDS` more (what was in flight on it still
        reaches the TUN: a rotation or a client's reconnect loses no packet), sends nothing new,
        and is then closed."""
        self._blocked.discard(session)
        self.draining.append((now + DRAIN_SECONDS, session))

    def _drained(self, now: float) -> None:
        keep = []
        for until, session in self.draining:
            if session.closed:
                continue
            if now >= until:
                self.close_session(session)
            else:
                keep.append((until, session))
        self.draining = keep

    def _peer_of(self, session: Session) -> Peer | None:
        """The peer a server session authenticated as (still in the current table)."""
        if not self.hub:
            return self.peer
        peer = session.conn.peer
        if peer is None or self.table.by_name.get(peer.name) is not peer:
            return None
        return peer

    def _drop_session(self, session: Session, reason: str) -> None:
        log.warning("%s: %s", session.carrier.peer, reason)
        with contextlib.suppress(Exception):
            session.conn.close(reason)
            self.flush_out(session)
        self.close_session(session)

    def _peer_up(self, peer: Peer, session: Session) -> None:
        """A peer's link is up: the TUN (for the first peer), its routes, its linkup hook."""
        if peer.links_up:
            peer.reconnects += 1
            if not self.hub:
                self.status.reconnects += 1
        peer.links_up += 1
        self.status.links_up += 1
        self.link.peer_up(peer)
        peer.set_state(UP)
        if self.hub:
            self.set_top_state()
        else:
            self.status.set_state("up")
        self.status_dirty = True
        self._update_tun_watch(time.monotonic())
        log.info(
            "link up: %s %s <-> %s%s via %s, key %s",
            self.config.interface,
            self.config.local,
            peer.address,
            f" ({peer.name})" if self.hub else "",
            session.carrier.peer,
            peer.fingerprint,
        )

    def _peer_down(self, peer: Peer, reason: str) -> None:
        """Undo `_peer_up`, whatever part of it happened; the last peer down takes the TUN."""
        self.link.peer_down(peer, reason)
        if self.lineq is not None:  # what waited for the line will not cross it now
            lineq, self.lineq = self.lineq, None
            for why, n in [*lineq.drops.items(), ("link_down", len(lineq))]:
                self._drop_base[why] = self._drop_base.get(why, 0) + n
        peer.session_started = None
        if not self.hub:
            self.status.session_started = None
        log.warning("link down%s: %s", f" ({peer.name})" if self.hub else "", reason)

    def end_session(self, session: Session, reason: str) -> None:
        """A session ended (error, EOF, dead peer): log once, tear down, and plan what follows."""
        if session.closed:
            return
        peer = session.peer
        was_active = peer is not None and peer.session is session
        self.close_session(session)
        now = time.monotonic()
        if was_active and peer is not None:
            peer.session = None
            self._peer_down(peer, reason)
            peer.set_state(DOWN, reason)
            if self.hub:
                self.set_top_state()
            else:
                self.status.set_state("down", reason)
                self._publish(force=True)
        elif not self.hub or session.conn.authenticated:
            log.warning("%s: %s", session.carrier.peer, reason)
        if self.dials:
            self.dialer.session_ended(now, was_active, reason)
        elif self.active is None and not self.hub:
            self.status.set_state("listening", reason)
        self.status_dirty = True

    def close_session(self, session: Session) -> None:
        if not session.closed:
            self.retire_counters(session)
        session.closed = True
        self._blocked.discard(session)
        if session in self.pending:
            self.pending.remove(session)
        carrier = session.carrier
        if isinstance(carrier, UdpLink) and not carrier.owned:
            self.acceptor.forget(session)  # a server's session on the shared socket
            return
        self.unwatch(carrier.fileno())
        carrier.close()

    def unwatch(self, fileobj: Any) -> None:
        """Stop watching `fileobj` (not an error if it was not watched)."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fileobj)

    def rewatch(self, fileobj: Any, events: int, callback: Callable[[int, float], None]) -> None:
        """Watch a registered `fileobj` for other events (not an error if it was not)."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(fileobj, events, callback)

    # ----------------------------------------------------------------- status, signals, reload
    def _session_drops(self, session: Session) -> dict[str, int]:
        drops = {f"proto_{k}": v for k, v in session.conn.stats.drops.items() if v}
        if session.framer is not None:
            drops.update({f"line_{k}": v for k, v in session.framer.errors.items() if v})
        return drops

    def retire_counters(self, session: Session) -> None:
        """Fold a finished session's counters into the daemon's totals (they never go back)."""
        st = session.conn.stats
        self._wire_base = (
            self._wire_base[0] + st.wire_bytes_in,
            self._wire_base[1] + st.wire_bytes_out,
        )
        for k, v in self._session_drops(session).items():
            self._drop_base[k] = self._drop_base.get(k, 0) + v
            if session.peer is not None and session.up:
                session.peer.count_drop(k, v)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self.status_dirty or now >= self._status_due):
            return
        if (
            self.hub
            and not force
            and now < self._status_due
            and now - self._last_publish < HUB_STATUS_MIN_INTERVAL
        ):
            return  # a burst of clients: at most a few writes per second
        self.status.packets_in, self.status.bytes_in = self.link.packets_bytes_in
        wire_in, wire_out = self._wire_base
        sessions = self.sessions()
        for s in sessions:
            wire_in += s.conn.stats.wire_bytes_in
            wire_out += s.conn.stats.wire_bytes_out
        self.status.carrier_bytes_in, self.status.carrier_bytes_out = wire_in, wire_out
        self._trim_when_idle(wire_in + wire_out)
        drops = dict(self._drop_base)
        for k, v in self.link.tun_drops.items():  # live: a full TUN queue shows while it happens
            drops[k] = drops.get(k, 0) + v
        if self.lineq is not None:
            for k, v in self.lineq.drops.items():
                drops[k] = drops.get(k, 0) + v
        for s in sessions:
            for k, v in self._session_drops(s).items():
                drops[k] = drops.get(k, 0) + v
        self.status.drops.update(drops)
        active = self.active
        if active is not None:
            self.status.missed_keepalives = active.conn.stats.missed_keepalives
        if self.hub:
            self.status.peers = [self._peer_record(p) for p in self.table]
            self.status.peers_total = len(self.table)
            self.status.peers_up = self.link.up_count
        try:
            self.writer.write(self.status)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.writer.path, exc)
        self.status_dirty = False
        self._status_due = now + STATUS_INTERVAL
        self._last_publish = now

    def _trim_when_idle(self, moved: int) -> None:
        """Give the heap's free pages back at the first status write that finds the carriers
        quiet since the one before (heap.py: a busy link keeps its buffers' pages; an idle
        daemon need not hold them)."""
        if moved != self._moved:
            self._moved = moved
            self._heap_busy = True
        elif self._heap_busy:
            self._heap_busy = False
            heap.trim()

    def _peer_record(self, peer: Peer) -> dict[str, Any]:
        """One hub client's entry in the status record (docs/architecture.md)."""
        session = peer.session
        drops = dict(peer.drops)
        if session is not None:
            for k, v in self._session_drops(session).items():
                drops[k] = drops.get(k, 0) + v
        age = None
        if peer.session_started is not None and peer.state == UP:
            age = round(time.time() - peer.session_started, 3)
        return {
            "name": peer.name,
            "address": str(peer.address),
            "address6": str(peer.address6) if peer.address6 is not None else None,
            "state": peer.state,
            "since": peer.since,
            "reason": peer.reason,
            "peer": peer.endpoint,
            "session_started": peer.session_started,
            "session_age": age,
            "last_handshake": peer.last_handshake,
            "rekeys": peer.rekeys,
            "epoch": peer.epoch,
            "bytes_in": peer.bytes_in,
            "bytes_out": peer.bytes_out,
            "packets_in": peer.packets_in,
            "packets_out": peer.packets_out,
            "last_rtt": peer.last_rtt,
            "missed_keepalives": session.conn.stats.missed_keepalives if session else 0,
            "key_fingerprint": peer.fingerprint,
            "next_key_fingerprint": peer.next_fingerprint,
            "session_key_fingerprint": peer.session_fingerprint if peer.state == UP else None,
            "routes": [str(r.network) for r in peer.routes],
            "drops": drops,
            "reconnects": peer.reconnects,
        }

    def _install_signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping = True

        def reload(signum: int, frame: Any) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _on_wake(self, mask: int, now: float) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def stop_link(self, reason: str) -> None:
        # The listener first: hooks about to be forked must not inherit it.
        udp = self.acceptor.close()
        for s in [*self.pending, *(d for _, d in self.draining)]:
            self.close_session(s)
        self.draining = []
        for peer in self.table:
            s = peer.session
            if s is None:
                continue
            with contextlib.suppress(Exception):
                s.conn.close(reason)
                self.flush_out(s)
            self.close_session(s)
            peer.session = None
            self._peer_down(peer, reason)
            peer.set_state(DOWN, reason)
        self.dialer.cancel()
        if udp is not None:
            udp.close()  # after the goodbyes above went out on it

    def _teardown(self) -> None:
        log.info("shutting down")
        self.stop_link("shutting down")
        self.hooks.drain(SHUTDOWN_HOOK_WAIT)
        self.hooks.close(1.0)
        self.status.set_state("stopped")
        self.writer.remove()
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        self._wake_r.close()
        self._wake_w.close()
        self.rng.close()
        self.sel.close()


def _addr(session: Session) -> tuple[str, int]:
    """The carrier's source (address, port), from its printable `host:port`."""
    host, _, port = session.carrier.peer.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        return host, 0
