"""vpnd's daemon: the one place where the sans-I/O protocol meets sockets, serial lines and the TUN.

Theory of operation
-------------------
One process serves one config file: a point-to-point link (one peer), or a **hub** (a server
with a `peers` directory: many clients, one port, one TUN). A single thread runs a selector loop
over: the carrier listener (server), the carrier connections, the TUN (while any peer is up), and
a wake-up pipe for signals. Time is read once per loop turn and handed to the protocol core, which
owns every rule (handshake, counters, keepalive, rekey); the daemon owns I/O, hooks, routes,
reconnects and the status record. The house:

* `peers.py` — the peer table: who may connect with which key, and where each packet goes;
* `datapath.py` — the per-packet rules of a hub (route by destination, allowed sources);
* `carriers.py` / `io/tcp.py` — the serial line and TCP carriers; `io/tun.py` — the TUN;
* `io/udp.py` / `io/gso.py` — the UDP carrier (`transport udp`): one socket, GSO/GRO, and the
  TCP segmentation/coalescing that turns TUN super-packets into MTU-sized datagrams and back;
* this module — sessions and their life cycle, the TUN's life cycle, timers, reload, status;
* `process.py` — logging, the pidfile, detaching.

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

Outbound pipeline (TUN -> carrier), run when the TUN fd is readable:
 1. read up to `TUN_BATCH` packets without blocking; with IFF_VNET_HDR each is a 10-byte virtio
    header plus a packet, TCP flows arriving as GSO super-packets of up to 64 KiB;
 2. a hub splits the batch by destination (longest prefix over its clients' addresses and
    networks); a point-to-point link sends it all to its one peer;
 3. `conn.send_packets(batch, now)`: batch into frames of at most `sendbuf` bytes, compress when
    asked and useful, AEAD-seal under the send key with the next counter, length-prefix;
 4. `carrier.write(conn.data_to_send())`: the kernel takes what it can, the rest is queued;
 5. while a carrier's queue is not empty the TUN is not read (back-pressure): the TUN queue fills
    and the kernel drops, so the inner TCP slows down instead of vpnd buffering without end. On a
    hub a client whose queue stays full for `STALL_AFTER` no longer holds the others back: its
    packets are dropped (counted) until its carrier drains or keepalive declares it dead.

Inbound pipeline (carrier -> TUN), run when the carrier is readable:
 1. read up to 256 KiB;
 2. `conn.receive_data(data, now)`: unframe (length cap checked first), check the epoch and the
    counter, AEAD-open (a bad tag never gets further), decompress, split the batch;
 3. a hub drops packets whose source is not the client's (spoofed) and, with
    `clienttoclient no`, packets from one client to another;
 4. write each packet, virtio header included, to the TUN: the kernel segments super-packets and
    completes partial checksums;
 5. answers the core queued (pongs, rekey messages) are flushed to the carrier.

Timers live in a heap keyed by each session's next protocol deadline, so a hub with a thousand
idle clients wakes only when some client's keepalive is due.

Over UDP (`transport udp`) the same pipelines run on datagrams. A server (hub or not) has one
socket and no connections: a datagram's first 4 bytes are the receiver's session index (see
proto/connection.py, section 6), 0 for a message 1. A message 1 passes a handshake budget first
(`HANDSHAKE_RATE` per second in all and `HANDSHAKE_RATE_PER_SOURCE` per source address, token
buckets; over budget it is dropped and counted "handshake_ratelimited" before any cryptography),
then gets a fresh responder session with a new random index; if its psk tag does not verify the
session is discarded at once (no answer, no state). A session follows its peer: the source address
of the newest datagram that authenticated (and passed the replay window) becomes the address the
session sends to (roaming, NAT rebinding); a replayed datagram from elsewhere moves nothing. No
cookie reply (WireGuard's under-load mechanism) is implemented: the budget alone bounds the work a
flood of message 1s causes. Outbound, TUN super-packets are cut into MSS-sized segments
(`gso.split`) so each datagram holds at most one MTU's worth of packets, and the datagrams of one
read leave in one GSO `sendmsg`; inbound, GRO super-datagrams are cut at the kernel's segment size
and the decrypted segments coalesced (`gso.coalesce`) into super-packets for the TUN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import os
import random
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vpnd_runtime import datapath
from vpnd_runtime.carriers import RandomDev, SerialCarrier, run_modemchat
from vpnd_runtime.config import Config, ConfigError, load_config
from vpnd_runtime.io import gso, tcp
from vpnd_runtime.io.hooks import HookRunner
from vpnd_runtime.io.tun import READ_SIZE, VNET_HDR_LEN, TunError
from vpnd_runtime.io.udp import UdpEndpoint, UdpLink
from vpnd_runtime.keyfile import KeyFileError, fingerprint, load_key
from vpnd_runtime.linequeue import LineQueue
from vpnd_runtime.link import Link
from vpnd_runtime.peers import DOWN, UP, Peer, PeerTable
from vpnd_runtime.proto.connection import INDEX_LEN, Connection, Params
from vpnd_runtime.proto.errors import ProtocolError, RemoteProtocolError
from vpnd_runtime.proto.events import Closed, KeepaliveRtt, LinkUp, Packets, PeerDead, Rekeyed
from vpnd_runtime.proto.handshake import ReplayGuard
from vpnd_runtime.status import StatusRecord, StatusWriter

if TYPE_CHECKING:  # the serial pieces are imported only by links that use them
    from vpnd_runtime.proto.slip import SlipFramer

log = logging.getLogger("vpnd")

#: Packets read from the TUN per loop turn before sealing them together, and the most bytes
#: (4 GSO super-packets): enough to amortise a turn, little enough to keep a busy daemon small.
TUN_BATCH = 32
TUN_BATCH_BYTES = 256 * 1024
#: Unauthenticated connections a point-to-point server lets wait at once (oldest evicted).
MAX_PENDING = 8
#: The same for a hub, in all and per source address.
MAX_PENDING_HUB = 256
MAX_PENDING_PER_SOURCE = 16
#: A hub's listen backlog (a thousand clients may arrive at once after the hub restarts).
HUB_BACKLOG = 1024
#: How long a server stops accepting after accept() fails (e.g. out of file descriptors).
ACCEPT_PAUSE = 1.0
#: Reconnect backoff: first delay, cap, and jitter (the delay is scaled by uniform(1-J, 1)).
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
BACKOFF_JITTER = 0.5
#: A link that stayed up this long resets the backoff to its first step.
BACKOFF_RESET_AFTER = 30.0
#: Deadline for a TCP connect, and then for the handshake on it.
HANDSHAKE_TIMEOUT = 10.0
#: Handshake deadline on serial lines, where a lost handshake message is retried by starting over.
SERIAL_HANDSHAKE_TIMEOUT = 4.0
#: How often the status file is refreshed while nothing changes.
STATUS_INTERVAL = 1.0
#: A hub publishes changes at most this often (a thousand clients arriving = one write per turn).
HUB_STATUS_MIN_INTERVAL = 0.2
#: Longest a shutdown waits for linkdown/slipdown hooks.
SHUTDOWN_HOOK_WAIT = 35.0
#: A hub client whose carrier stays blocked this long stops pausing the TUN for everyone.
STALL_AFTER = 1.0
#: UDP: message 1s a server examines per second, in all and per source address (token buckets
#: holding one second's worth); the rest are dropped before any cryptography.
HANDSHAKE_RATE = 200.0
HANDSHAKE_RATE_PER_SOURCE = 10.0
#: UDP: socket reads per readable event (each up to a 64 KiB GRO super-datagram).
UDP_READS = 16
#: UDP: bytes of a PACKETS message around each packet (u32 length) and the message's own 2.
_PACKET_OVERHEAD = 4
#: A session replaced by a newer one of the same peer is still read this long.
DRAIN_SECONDS = 2.0


def params_from_config(config: Config) -> Params:
    """The protocol core's parameters for this config (the same on both ends of a link).

    Over UDP a datagram carries at most one MTU-sized packet (with its virtio header and length)
    or a batch of small ones of no more bytes, so it fits the path MTU the `mtu` was chosen for.
    """
    common = {
        "cipher": config.cipher,
        "compress": config.compress,
        "compress_level": config.compress_level,
        "keepalive": config.keepalive,
        "noanswer": config.noanswer,
        "keyttl": config.keyttl,
        "maxdelay": config.maxdelay,
    }
    if config.transport == "udp" and not config.is_serial:
        return Params(
            **common,
            sendbuf=config.mtu + VNET_HDR_LEN + _PACKET_OVERHEAD,
            datagram=True,
            handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    return Params(
        **common,
        sendbuf=config.sendbuf,
        lossy=config.is_serial,
        # A handshake message lost on a noisy line is only retried by starting over: keep that
        # wait short on serial links (a handshake is ~200 bytes: 20 ms at 115200 bit/s).
        handshake_timeout=SERIAL_HANDSHAKE_TIMEOUT if config.is_serial else HANDSHAKE_TIMEOUT,
    )


def load_table(config: Config) -> PeerTable:
    """The peers of `config` with their keys loaded (KeyFileError names a bad key file).

    A point-to-point link has one peer, the far end (named after the config); a hub has one per
    peer file, and a key file shared by several peer files is read once.
    """
    keys: dict[str, bytes] = {}

    def key_of(path: str) -> bytes:
        if path not in keys:
            keys[path] = load_key(path)
        return keys[path]

    def next_of(path: str | None) -> dict[str, Any]:
        if path is None:
            return {}
        key = key_of(path)
        return {"next_key": key, "next_fingerprint": fingerprint(key)}

    if not config.is_hub:
        key = key_of(config.keyfile)
        name = os.path.basename(config.source).removesuffix(".conf") or "peer"
        peer = Peer(
            name=name,
            address=config.remote,
            address6=config.remote6,
            key=key,
            fingerprint=fingerprint(key),
            routes=config.routes,
            client_host=config.client_host,
            client_port=config.client_port,
            **next_of(config.nextkey),
        )
        return PeerTable([peer], hub=False)
    peers = []
    for spec in config.peers:
        key = key_of(spec.keyfile)
        peers.append(
            Peer(
                name=spec.name,
                address=spec.remote,
                address6=spec.remote6,
                key=key,
                fingerprint=fingerprint(key),
                **next_of(spec.nextkey),
                routes=spec.routes,
                client_host=(
                    spec.client_host if spec.client_host != "0.0.0.0" else config.client_host
                ),
                client_port=spec.client_port or config.client_port,
            )
        )
    return PeerTable(peers, hub=True)


@dataclass(eq=False)
class Session:
    """One carrier connection and the protocol state riding on it."""

    carrier: tcp.Carrier
    conn: Connection
    created: float
    peer: Peer | None = None  # known from the start when dialing; from the handshake on a server
    source: str = ""  # the carrier's source address (per-source caps)
    up: bool = False
    closed: bool = False
    framer: SlipFramer | None = None
    tx_registered: bool = field(default=False)
    blocked_since: float | None = None
    deadline: float | None = None  # the protocol deadline this session is filed under


class _Bucket:
    """A token bucket: `rate` tokens per second, holding at most one second's worth."""

    __slots__ = ("at", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Ring:
    """The daemon's current peer table as a KeyRing: handshakes in flight see reloads."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def keys_for(self, key_id: bytes) -> Sequence[bytes]:
        return self._daemon.table.keys_for(key_id)

    def admit(self, psk: bytes, address: Any) -> Peer | None:
        return self._daemon.table.admit(psk, address)


class Daemon:
    """Runs one config's link(s) until told to stop. `run()` returns the process exit code."""

    def __init__(self, config: Config, table: PeerTable) -> None:
        self.config = config
        self.table = table
        self.hub = config.is_hub
        self.sel = selectors.DefaultSelector()
        self.hooks = HookRunner()
        self.status = StatusRecord(
            config=config.source,
            mode=config.mode,
            interface=config.interface,
            local=str(config.local),
            remote=str(config.remote) if config.remote is not None else "",
            key_fingerprint=self._top_fingerprint(),
        )
        self.status.hub = self.hub
        self.status.local6 = str(config.local6) if config.local6 is not None else None
        self.status.remote6 = str(config.remote6) if config.remote6 is not None else None
        if not self.hub:
            self.status.next_key_fingerprint = table.peers[0].next_fingerprint
        self.writer = StatusWriter(config.statusfile)
        self.rng = RandomDev(config.randomdev)
        self.jitter = random.Random(os.urandom(16))  # noqa: S311 — backoff jitter, not crypto
        self.replay_guard: Any = None
        self.ring = _Ring(self)
        self.listener: socket.socket | None = None
        self.listener_resume: float | None = None
        self.relisten_at: float | None = None
        self.connecting: socket.socket | None = None
        self.connect_started = 0.0
        self.pending: list[Session] = []
        self.link = Link(config, self.hooks, self.status, lambda: self._watch_tun(False))
        self.tun_batch = TUN_BATCH
        #: A serial link's scheduler (linequeue.py): packets wait here, not in the tty's buffers.
        self.lineq: LineQueue | None = None
        self._wire_base = (0, 0)  # carrier bytes in/out of sessions already closed
        self._drop_base: dict[str, int] = {}  # protocol/line drops of sessions already closed
        self._blocked: set[Session] = set()  # up sessions with output queued
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self.tun_registered = False
        self.attempt = 0
        self.next_attempt = 0.0
        self.link_since = 0.0
        self.stopping = False
        self.reload_requested = False
        self.redial = False  # a client opens a second session with a new key (rotation)
        self._draining: list[tuple[float, Session]] = []  # replaced sessions, read until then
        self.exit_code = 0
        self._status_due = 0.0
        self._status_dirty = True
        self._last_publish = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        # UDP: the server's socket, sessions by index, and the handshake budget
        self.udp: UdpEndpoint | None = None
        self.udp_index: dict[int, Session] = {}
        self._hs_bucket = _Bucket(HANDSHAKE_RATE, time.monotonic())
        self._hs_sources: dict[str, _Bucket] = {}

    def _top_fingerprint(self) -> str:
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
                    self._reload()
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
            self._open_listener()
        else:
            self.status.set_state("connecting")
        self._publish(force=True)

    @property
    def _dials(self) -> bool:
        """True when this end opens the carrier itself: a TCP client, or either end of a line."""
        return self.config.mode == "client" or self.config.is_serial

    @property
    def _udp(self) -> bool:
        """True when the link's carrier is UDP."""
        return self.config.transport == "udp" and not self.config.is_serial

    def _open_listener(self) -> None:
        cfg = self.config
        tos = tcp.ipopts_to_tos(cfg.ipopts)
        if self._udp:
            self.udp = UdpEndpoint((cfg.server_host, cfg.server_port), tos)
            self.sel.register(self.udp.fileno(), selectors.EVENT_READ, self._on_udp_server)
            self._set_top_state()
            log.info(
                "listening on udp %s:%d (gso %s, gro %s)",
                cfg.server_host,
                cfg.server_port,
                "on" if self.udp.gso else "off",
                "on" if self.udp.gro else "off",
            )
            return
        if self.hub:
            self.listener = tcp.listen(cfg.server_host, cfg.server_port, tos, HUB_BACKLOG)
        else:
            self.listener = tcp.listen(cfg.server_host, cfg.server_port, tos)
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self._set_top_state()
        log.info("listening on %s", tcp.endpoint_text(cfg.server_host, cfg.server_port))

    def _set_top_state(self, reason: str | None = None) -> None:
        """A server's top-level state: up while a peer is up, else listening."""
        self.status.set_state("up" if self.link.up_count else "listening", reason)
        self._status_dirty = True

    def _turn(self) -> None:
        now = time.monotonic()
        timeout = self._next_deadline(now) - now
        events = self.sel.select(max(0.0, min(timeout, STATUS_INTERVAL)))
        now = time.monotonic()
        for key, mask in events:
            try:
                key.data(mask, now)
            except Exception as exc:  # a bug must cost a reconnect, not the daemon
                self._recover(exc)
        try:
            self._timers(now)
        except Exception as exc:  # likewise
            self._recover(exc)
        self._publish()

    def _recover(self, exc: BaseException) -> None:
        """An unexpected error in a callback: log it with its traceback, end every session and
        let the normal reconnect logic bring the link back."""
        log.exception("internal error, restarting the link: %s", exc)
        for s in list(self.pending):
            self._close_session(s)
        ended = False
        for peer in self.table:
            if peer.session is not None:
                self._end_session(peer.session, f"internal error: {exc}")
                ended = True
        if not ended and self._dials and self.connecting is None and not self.stopping:
            self._schedule_retry(time.monotonic(), f"internal error: {exc}")

    # ----------------------------------------------------------------- timers
    def _file(self, session: Session) -> None:
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
        if self._draining:
            deadline = min(deadline, max(now, min(until for until, _ in self._draining)))
        active = self.active
        if self.lineq and active is not None and not active.carrier.pending:
            deadline = min(deadline, max(now, active.carrier.pacer.ready_at()))  # type: ignore[attr-defined]
        if self._dials and self.active is None:
            if self.connecting is None and not self.pending:
                deadline = min(deadline, self.next_attempt)
            elif self.connecting is not None:
                deadline = min(deadline, self.connect_started + HANDSHAKE_TIMEOUT)
        return deadline

    def _sessions(self) -> list[Session]:
        live = [p.session for p in self.table if p.session is not None]
        return self.pending + live + [s for _, s in self._draining if not s.closed]

    def _timers(self, now: float) -> None:
        if self.relisten_at is not None and now >= self.relisten_at and not self.stopping:
            self._relisten(now)
        if self.listener_resume is not None and now >= self.listener_resume and self.listener:
            self.listener_resume = None
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        heap = self._heap
        while heap and heap[0][0] <= now:
            d, _, s = heapq.heappop(heap)
            if s.closed or s.deadline != d:
                continue
            s.deadline = None
            self._run_protocol(s, now, lambda s=s: s.conn.tick(now))
        if self._blocked and self.hub:
            self._update_tun_watch(now)
        if self.lineq:
            self._feed_line(now)
        active = self.active
        if active is not None and isinstance(active.carrier, SerialCarrier):
            try:
                active.carrier.check_carrier()
            except OSError as exc:
                self._end_session(active, str(exc))
        if self._draining:
            self._drained(now)
        if self.redial and self.active is not None and self.connecting is None and not self.pending:
            self.redial = False
            log.info("opening a session with the new key beside the running one")
            self._connect(now)
        if self._dials and self.active is None and not self.pending:
            if self.connecting is None and now >= self.next_attempt and not self.stopping:
                if self.config.is_serial:
                    self._open_line(now)
                else:
                    self._connect(now)
            elif self.connecting is not None and now - self.connect_started > HANDSHAKE_TIMEOUT:
                self._connect_failed(now, "connect timed out")

    # ----------------------------------------------------------------- client side
    def _connect(self, now: float) -> None:
        cfg = self.config
        if self.active is None:  # (beside a running session: a rotation's new key)
            self.status.set_state("connecting")
            self._status_dirty = True
        if self._udp:
            self._connect_udp(now)
            return
        try:
            sock = tcp.start_connect(
                (cfg.server_host, cfg.server_port),
                (cfg.client_host, cfg.client_port),
                tcp.ipopts_to_tos(cfg.ipopts),
            )
        except OSError as exc:
            self._connect_failed(now, str(exc.strerror or exc))
            return
        self.connecting = sock
        self.connect_started = now
        self.sel.register(sock, selectors.EVENT_WRITE, self._on_connected)

    def _on_connected(self, mask: int, now: float) -> None:
        sock = self.connecting
        if sock is None:
            return
        self.sel.unregister(sock)
        self.connecting = None
        try:
            tcp.finish_connect(sock)
        except OSError as exc:
            sock.close()
            self._connect_failed(now, exc.strerror or str(exc))
            return
        cfg = self.config
        carrier = tcp.TcpCarrier(sock, tcp.endpoint_text(cfg.server_host, cfg.server_port))
        conn = Connection(
            "initiator",
            self.peer.key,
            params_from_config(cfg),
            self.rng,
            now,
            wall=time.time(),
            announce=cfg.local,
        )
        session = self._add_pending(carrier, conn, now)
        session.peer = self.peer
        if self.active is None:
            self.status.set_state("handshake")
            self.status.peer = carrier.peer
            self._status_dirty = True
        log.info("connected to %s, handshaking", carrier.peer)
        self._run_protocol(session, now, lambda: conn.start(now))

    def _connect_udp(self, now: float) -> None:
        """UDP client: a fresh socket (unconnected, so the kernel picks the source address per
        datagram and a changed address roams) and a session that handshakes at once."""
        cfg = self.config
        try:
            tos = tcp.ipopts_to_tos(cfg.ipopts)
            endpoint = UdpEndpoint(
                (cfg.client_host, cfg.client_port), tos, peer=(cfg.server_host, cfg.server_port)
            )
        except OSError as exc:
            self._schedule_retry(now, f"cannot open a UDP socket: {exc.strerror or exc}")
            return
        carrier = UdpLink(endpoint, (cfg.server_host, cfg.server_port), owned=True)
        conn = Connection(
            "initiator",
            self.peer.key,
            params_from_config(cfg),
            self.rng,
            now,
            wall=time.time(),
            announce=cfg.local,
            index=self._new_index(),
        )
        session = Session(carrier, conn, now)
        self.pending.append(session)
        self.sel.register(endpoint.fileno(), selectors.EVENT_READ, self._udp_client_reader(session))
        session.peer = self.peer
        if self.active is None:  # (beside a running session: a rotation's new key)
            self.status.set_state("handshake")
            self.status.peer = carrier.peer
            self._status_dirty = True
        log.info(
            "udp to %s (gso %s, gro %s), handshaking",
            carrier.peer,
            "on" if endpoint.gso else "off",
            "on" if endpoint.gro else "off",
        )
        self._run_protocol(session, now, lambda: conn.start(now))

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "big")
            if index and index not in self.udp_index:
                return index

    def _udp_client_reader(self, session: Session) -> Callable[[int, float], None]:
        """Selector callback of a UDP client's socket: datagrams from the server to our index."""
        carrier = session.carrier
        assert isinstance(carrier, UdpLink)  # noqa: S101 — built by _connect_udp
        endpoint = carrier.endpoint
        server = carrier.addr

        def on_event(mask: int, now: float) -> None:
            if mask & selectors.EVENT_WRITE and endpoint.flush():
                self._set_tx_wait(session, False, now)
            if not mask & selectors.EVENT_READ:
                return
            try:
                batches = endpoint.receive(UDP_READS)
            except OSError as exc:
                self._end_session(session, f"carrier error: {exc.strerror or exc}")
                return
            want = session.conn.index.to_bytes(INDEX_LEN, "big")
            msgs = []
            stray = 0
            for source, datagrams in batches:
                if source != server:
                    stray += len(datagrams)
                    continue
                for d in datagrams:
                    if d[:INDEX_LEN] == want:
                        msgs.append(d[INDEX_LEN:])
                    else:
                        stray += 1
            if stray:
                drops = self.status.drops
                drops["udp_stray"] = drops.get("udp_stray", 0) + stray
            if msgs and not session.closed:
                self._run_protocol(session, now, lambda: session.conn.receive_datagrams(msgs, now))

        return on_event

    def _on_udp_server(self, mask: int, now: float) -> None:
        """Selector callback of the server's UDP socket: demultiplex by session index."""
        udp = self.udp
        if udp is None:
            return
        if mask & selectors.EVENT_WRITE and udp.flush():
            for s in self._sessions():
                if s.tx_registered:
                    self._set_tx_wait(s, False, now)
        if not mask & selectors.EVENT_READ:
            return
        batches = udp.receive(UDP_READS)
        index = self.udp_index
        unknown = 0
        for source, datagrams in batches:
            runs: dict[Session, list[memoryview]] = {}
            last_key = b""
            last_run: list[memoryview] = []
            for d in datagrams:
                key = d[:INDEX_LEN]
                if key == last_key and len(d) > INDEX_LEN:  # a GRO batch: one session, mostly
                    last_run.append(d[INDEX_LEN:])
                    continue
                if len(d) <= INDEX_LEN:
                    unknown += 1
                    continue
                idx = int.from_bytes(key, "big")
                if idx == 0:
                    self._udp_handshake(source, d[INDEX_LEN:], now)
                    continue
                session = index.get(idx)
                if session is None:
                    unknown += 1
                    continue
                last_key = bytes(key)
                last_run = runs.setdefault(session, [])
                last_run.append(d[INDEX_LEN:])
            for session, msgs in runs.items():
                if session.closed:
                    continue
                conn = session.conn
                before = conn.accepted
                self._run_protocol(session, now, lambda c=conn, m=msgs: c.receive_datagrams(m, now))
                carrier = session.carrier
                if (
                    conn.accepted > before
                    and not session.closed
                    and isinstance(carrier, UdpLink)
                    and carrier.addr != source
                ):
                    self._roam(session, carrier, source)
        if unknown:
            drops = self.status.drops
            drops["udp_unknown_index"] = drops.get("udp_unknown_index", 0) + unknown

    def _roam(self, session: Session, carrier: UdpLink, source: tuple[str, int]) -> None:
        """An authenticated datagram came from a new address: the peer moved (NAT rebinding,
        a new network); answer there from now on."""
        peer = session.peer
        if peer is not None and not tcp.client_allowed(source, peer.client_host, peer.client_port):
            self.status.drops["refused_client"] = self.status.drops.get("refused_client", 0) + 1
            return
        old = carrier.peer
        carrier.move(source)
        log.info(
            "%speer moved from %s to %s",
            f"{peer.name}: " if peer is not None and self.hub else "",
            old,
            carrier.peer,
        )
        if peer is not None and peer.session is session:
            peer.endpoint = carrier.peer
            if not self.hub:
                self.status.peer = carrier.peer
            self.status.roams += 1
        self._status_dirty = True

    def _udp_handshake(self, source: tuple[str, int], msg: memoryview, now: float) -> None:
        """A message 1 on the server's socket: budget, then a responder session that survives
        only if the psk tag verified (see the module docstring)."""
        cfg = self.config
        drops = self.status.drops
        if not tcp.client_allowed(source, cfg.client_host, cfg.client_port):
            drops["refused_client"] = drops.get("refused_client", 0) + 1
            return
        bucket = self._hs_sources.get(source[0])
        if bucket is None:
            if len(self._hs_sources) >= 4096:
                self._hs_sources.clear()  # a spoofed flood of many sources: start over
            bucket = self._hs_sources[source[0]] = _Bucket(HANDSHAKE_RATE_PER_SOURCE, now)
        if not bucket.take(now) or not self._hs_bucket.take(now):
            drops["handshake_ratelimited"] = drops.get("handshake_ratelimited", 0) + 1
            return
        if not self._make_room(source[0]):
            drops["handshake_flood"] = drops.get("handshake_flood", 0) + 1
            return
        assert self.udp is not None  # noqa: S101 — a server with a UDP carrier
        index = self._new_index()
        conn = Connection(
            "responder",
            None if self.hub else self.peer.key,
            params_from_config(cfg),
            self.rng,
            now,
            replay_guard=self._guard(),
            wall=time.time(),
            keyring=self.ring if self.hub else None,
            index=index,
        )
        session = Session(UdpLink(self.udp, source, owned=False), conn, now)
        session.source = source[0]
        self.pending.append(session)
        self.udp_index[index] = session
        self._run_protocol(session, now, lambda: conn.receive_datagrams([msg], now))
        if not session.closed and not conn.authenticated:
            self._close_session(session)  # no answer, no state: the tag did not verify

    def _open_line(self, now: float) -> None:
        """Serial: open the device, run the modem chat, and start a session on the line."""
        from vpnd_runtime.io.serial import SerialTransport  # noqa: PLC0415 — serial links only

        cfg = self.config
        self.status.set_state("connecting")
        self._status_dirty = True
        try:
            transport = SerialTransport.open(
                cfg.server_host, cfg.speed, rtscts=not cfg.nortscts, localline=cfg.localline
            )
        except OSError as exc:
            self._schedule_retry(now, f"cannot open {cfg.server_host}: {exc.strerror or exc}")
            return
        if cfg.modemchat:
            result = run_modemchat(cfg, transport)
            if not result[0]:
                transport.close()
                self._schedule_retry(time.monotonic(), f"modem chat failed: {result[1]}")
                return
            now = time.monotonic()
        carrier = SerialCarrier(transport, cfg.server_host, cfg.speed)
        conn, framer = self._line_connection(now)
        session = self._add_pending(carrier, conn, now, framer)
        session.peer = self.peer
        self.status.set_state("handshake")
        self.status.peer = carrier.peer
        log.info("line %s open at %d bit/s, handshaking", cfg.server_host, cfg.speed)
        self._start_line_handshake(session, now)

    def _line_connection(self, now: float) -> tuple[Connection, SlipFramer]:
        """A fresh protocol session for the line, with its SLIP framer (kept for drop counts)."""
        from vpnd_runtime.proto.slip import SlipFramer  # noqa: PLC0415 — serial links only

        cfg = self.config
        role = "initiator" if cfg.mode == "client" else "responder"
        params = params_from_config(cfg)
        if role == "initiator":
            # Desynchronise from the far end's own handshake deadline.
            timeout = params.handshake_timeout * self.jitter.uniform(1.0, 1.5)
            params = dataclasses.replace(params, handshake_timeout=timeout)
        framer = SlipFramer(xfilter=cfg.xfilter)
        conn = Connection(
            role,
            self.peer.key,
            params,
            self.rng,
            now,
            framer=framer,
            replay_guard=self._guard() if role == "responder" else None,
            wall=time.time(),
            announce=cfg.local if role == "initiator" else None,
        )
        return conn, framer

    def _start_line_handshake(self, session: Session, now: float) -> None:
        if session.conn.role == "initiator":
            self._run_protocol(session, now, lambda: session.conn.start(now))
        else:
            self._file(session)

    def _restart_line_handshake(self, session: Session, now: float, reason: str) -> None:
        log.info("%s: %s; handshaking again", session.carrier.peer, reason)
        self.status.set_state("handshake", reason)
        self._status_dirty = True
        self._retire_counters(session)
        session.conn, session.framer = self._line_connection(now)
        session.deadline = None
        self._start_line_handshake(session, now)

    def _connect_failed(self, now: float, reason: str) -> None:
        if self.connecting is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.connecting)
            self.connecting.close()
            self.connecting = None
        self._schedule_retry(now, reason)

    def _schedule_retry(self, now: float, reason: str) -> None:
        delay = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(self.attempt, 16)))
        delay *= self.jitter.uniform(1 - BACKOFF_JITTER, 1.0)
        self.attempt += 1
        self.next_attempt = now + delay
        self.status.set_state("connecting", reason)
        self._status_dirty = True
        log.warning(
            "link to %s:%d not up (%s); retrying in %.1f s",
            self.config.server_host,
            self.config.server_port,
            reason,
            delay,
        )

    # ----------------------------------------------------------------- server side
    def _on_accept(self, mask: int, now: float) -> None:
        if self.listener is None:
            return
        cfg = self.config
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds (EMFILE/ENFILE) leaves the listener readable: pause it, don't spin.
                log.warning("accept failed: %s; not accepting for %.0f s", exc, ACCEPT_PAUSE)
                self.sel.unregister(self.listener)
                self.listener_resume = now + ACCEPT_PAUSE
                return
            addr = tcp.peer_address(addr)
            peer = tcp.endpoint_text(*addr)
            if not tcp.client_allowed(addr, cfg.client_host, cfg.client_port):
                log.warning(
                    "refused connection from %s: not the configured client %s:%s",
                    peer,
                    cfg.client_host,
                    cfg.client_port or "any",
                )
                self.status.drops["refused_client"] = self.status.drops.get("refused_client", 0) + 1
                sock.close()
                continue
            if not self._make_room(addr[0]):
                drops = self.status.drops
                drops["handshake_flood"] = drops.get("handshake_flood", 0) + 1
                sock.close()
                continue
            carrier = tcp.TcpCarrier(sock, peer)
            ring = self.hub or self.peer.next_key is not None  # many keys: pick by key id
            conn = Connection(
                "responder",
                None if ring else self.peer.key,
                params_from_config(cfg),
                self.rng,
                now,
                replay_guard=self._guard(),
                wall=time.time(),
                keyring=self.ring if ring else None,
            )
            session = self._add_pending(carrier, conn, now)
            session.source = addr[0]
            self._file(session)
            if not self.hub:
                log.info("connection from %s, waiting for its handshake", peer)

    def _make_room(self, source: str) -> bool:
        """Room for one more unauthenticated connection from `source`? Evicts the oldest
        unauthenticated one (from that source first) when a cap is reached; a connection that
        has proven its key is never evicted. False when no room can be made."""
        cap = MAX_PENDING_HUB if self.hub else MAX_PENDING
        waiting = [s for s in self.pending if not s.conn.authenticated]
        if self.hub:
            same = [s for s in waiting if s.source == source]
            if len(same) >= MAX_PENDING_PER_SOURCE:
                self._evict(same[0], MAX_PENDING_PER_SOURCE, f"from {source}")
                waiting.remove(same[0])
        if len(self.pending) < cap:
            return True
        if not waiting:
            return False
        self._evict(waiting[0], cap, "")
        return True

    def _evict(self, session: Session, cap: int, what: str) -> None:
        if not self.hub:
            log.warning(
                "%d handshakes waiting: dropping the oldest, from %s", cap, session.carrier.peer
            )
        self.status.drops["handshake_evicted"] = self.status.drops.get("handshake_evicted", 0) + 1
        self._close_session(session)

    def _guard(self) -> Any:
        if self.replay_guard is None:
            self.replay_guard = ReplayGuard()
        return self.replay_guard

    # ----------------------------------------------------------------- data path
    def _reader(self, session: Session) -> Callable[[int, float], None]:
        """The selector callback for a carrier: inbound pipeline, and flushing on writability."""
        carrier = session.carrier

        def on_event(mask: int, now: float) -> None:
            try:
                if mask & selectors.EVENT_WRITE and carrier.flush():
                    self._set_tx_wait(session, False, now)
                if not mask & selectors.EVENT_READ or session.closed:
                    return
                data = carrier.read()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._end_session(session, f"carrier error: {exc.strerror or exc}")
                return
            if not data:
                reason = (
                    "peer closed the connection"
                    if session.up
                    else "peer closed the connection during the handshake "
                    "(wrong key, or not an allowed client?)"
                )
                self._end_session(session, reason)
                return
            self._run_protocol(session, now, lambda: session.conn.receive_data(data, now))

        return on_event

    def _run_protocol(self, session: Session, now: float, step: Callable[[], Any]) -> None:
        """Run one protocol step, act on its events, and send what it queued."""
        try:
            events = step() or ()
        except RemoteProtocolError as exc:
            self._end_session(
                session,
                f"{'peer error' if session.up else 'handshake failed'}: "
                f"{exc.reason if hasattr(exc, 'reason') else exc}",
            )
            return
        except ProtocolError as exc:
            log.error("internal protocol misuse: %s", exc)
            self._end_session(session, f"internal error: {exc}")
            return
        except OSError as exc:  # randomdev failing during a rekey or handshake
            self._end_session(session, f"local error: {exc.strerror or exc}")
            return
        inbound: list[bytes] = []
        for ev in events:
            if type(ev) is Packets:
                inbound += ev.packets
            elif type(ev) is LinkUp:
                self._session_up(session, now)
                if session.closed:
                    return
            elif type(ev) is KeepaliveRtt:
                self.status.last_rtt = ev.rtt
                self.status.missed_keepalives = 0
                if session.peer is not None:
                    session.peer.last_rtt = ev.rtt
            elif type(ev) is Rekeyed:
                self.status.rekeys += 1
                self.status.epoch = ev.epoch
                if session.peer is not None:
                    session.peer.rekeys += 1
                    session.peer.epoch = ev.epoch
                if not self.hub:
                    log.info("session rekeyed (epoch %d)", ev.epoch)
            elif type(ev) is PeerDead and not session.up and session.framer is not None:
                # Serial: a handshake message was lost. Start over on the line, which stays open
                # (closing a line loses whatever the far end is sending meanwhile).
                self._restart_line_handshake(session, now, ev.reason)
                return
            elif type(ev) in (PeerDead, Closed):
                if inbound:
                    self._to_tun(session, inbound)
                    inbound = []
                why = ev.reason if type(ev) is PeerDead else f"peer closed the link: {ev.reason}"
                self._end_session(session, why)
                return
        if inbound:  # one hand-over per carrier read, not per frame: fewer thread wake-ups
            self._to_tun(session, inbound)
        self._send(session, now)
        self._file(session)

    def _to_tun(self, session: Session, packets: list[bytes]) -> None:
        """Hand decrypted packets to the TUN writer (counted as dropped while the link is down).

        A hub first drops what its client may not send: a source that is not the client's own
        (spoofed) and, with `clienttoclient no`, traffic to another client."""
        writer = self.link.writer
        peer = session.peer
        if writer is None or peer is None or not session.up:
            self.status.drops["link_down"] = self.status.drops.get("link_down", 0) + len(packets)
            return
        if self.hub:
            packets = datapath.admit_inbound(
                packets, writer.hdr_len, peer, self.table, self.config.clienttoclient
            )
            if not packets:
                return
        peer.packets_in += len(packets)
        peer.bytes_in += sum(map(len, packets)) - len(packets) * writer.hdr_len
        if writer.hdr_len and isinstance(session.carrier, UdpLink):
            packets = gso.coalesce(packets)  # segments back into super-packets: fewer writes
        writer.put(packets)

    def _on_tun(self, mask: int, now: float) -> None:
        tun = self.link.tun
        if tun is None:
            return
        read = os.read
        fd = tun.fd
        batch: list[bytes] = []
        total = 0
        for _ in range(self.tun_batch):
            try:
                packet = read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._tun_lost(f"TUN {tun.name} lost: {exc.strerror or exc}")
                return
            batch.append(packet)
            total += len(packet)
            if total >= TUN_BATCH_BYTES:
                break
        if not batch:
            return
        hdr = tun.hdr_len
        self.status.packets_out += len(batch)
        self.status.bytes_out += sum(map(len, batch)) - len(batch) * hdr
        if self.config.is_serial:
            if self.lineq is None:
                self.lineq = LineQueue(self.config.speed, hdr)
            self.lineq.push(batch)
            self._feed_line(now)
            return
        if self._udp and hdr:
            # One datagram per MTU: cut TCP super-packets into segments (see io/gso.py).
            split = gso.split
            batch = [seg for p in batch for seg in (split(p) if p[1] else (p,))]
        if not self.hub:
            session = self.active
            if session is not None:
                self.peer.packets_out += len(batch)
                self.peer.bytes_out += sum(map(len, batch)) - len(batch) * hdr
                self._run_protocol(session, now, lambda: session.conn.send_packets(batch, now))
            return
        for peer, packets in datapath.route_outbound(batch, hdr, self.table, self.status.drops):
            session = peer.session
            if session is None or not session.up or session.closed:
                peer.count_drop("peer_down", len(packets))
                continue
            if session.blocked_since is not None:
                peer.count_drop("peer_stalled", len(packets))  # see STALL_AFTER
                continue
            peer.packets_out += len(packets)
            peer.bytes_out += sum(map(len, packets)) - len(packets) * hdr
            self._run_protocol(
                session, now, lambda s=session, p=packets: s.conn.send_packets(p, now)
            )

    def _feed_line(self, now: float) -> None:
        """Serial: hand the line its next frames while it can take them (linequeue.py)."""
        lineq = self.lineq
        session = self.active
        if lineq is None or session is None or not session.up:
            return
        carrier = session.carrier
        pacer = carrier.pacer  # type: ignore[attr-defined] — a SerialCarrier
        while lineq and not session.closed and not carrier.pending and pacer.ready(now):
            batch = lineq.take()
            self.peer.packets_out += len(batch)
            self.peer.bytes_out += sum(map(len, batch)) - len(batch) * lineq.hdr
            self._run_protocol(session, now, lambda b=batch: session.conn.send_packets(b, now))

    def _tun_lost(self, reason: str) -> None:
        """The TUN failed under us: every peer's link goes down (and comes back)."""
        for peer in self.table:
            if peer.session is not None:
                self._end_session(peer.session, reason)

    def _flush_out(self, session: Session) -> None:
        """Hand what the protocol queued to the carrier (datagrams or bytes)."""
        carrier = session.carrier
        if isinstance(carrier, UdpLink):
            carrier.send(session.conn.datagrams_to_send())
        else:
            carrier.write(session.conn.data_to_send())

    def _send(self, session: Session, now: float) -> None:
        if session.closed:
            return
        carrier = session.carrier
        if isinstance(carrier, UdpLink):
            try:
                carrier.send(session.conn.datagrams_to_send())
            except OSError as exc:
                self._end_session(session, f"carrier error: {exc.strerror or exc}")
                return
            self._set_tx_wait(session, carrier.pending, now)
            return
        data = session.conn.data_to_send()
        try:
            if data:
                carrier.write(data)
            elif carrier.pending:
                carrier.flush()
        except OSError as exc:
            self._end_session(session, f"carrier error: {exc.strerror or exc}")
            return
        self._set_tx_wait(session, carrier.pending, now)

    def _add_pending(
        self, carrier: tcp.Carrier, conn: Connection, now: float, framer: SlipFramer | None = None
    ) -> Session:
        """A new carrier connection, watched for input, waiting for its handshake."""
        session = Session(carrier, conn, now, framer=framer)
        self.pending.append(session)
        self.sel.register(carrier.fileno(), selectors.EVENT_READ, self._reader(session))
        return session

    def _set_tx_wait(self, session: Session, waiting: bool, now: float) -> None:
        """Watch the carrier for writability, and pause the TUN, exactly while output is queued."""
        if waiting == session.tx_registered or session.closed:
            return
        session.tx_registered = waiting
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0)
        fd = session.carrier.fileno()
        self.sel.modify(fd, events, self.sel.get_key(fd).data)  # the same callback, new interest
        if waiting:
            session.blocked_since = now
            if session.up:
                self._blocked.add(session)
        else:
            session.blocked_since = None
            self._blocked.discard(session)
        self._update_tun_watch(now)

    def _update_tun_watch(self, now: float) -> None:
        """Read the TUN unless an up session's output is queued (on a hub: for less than
        STALL_AFTER — a stalled client no longer holds the others back)."""
        if self.hub:
            held = any(now - (s.blocked_since or now) < STALL_AFTER for s in self._blocked)
        elif self.config.is_serial:
            held = False  # a serial link reads the TUN eagerly into its line queue
            if not self._blocked:
                self._feed_line(now)
        else:
            held = bool(self._blocked)
        self._watch_tun(not held)

    def _watch_tun(self, on: bool) -> None:
        tun = self.link.tun
        if tun is None or on == self.tun_registered:
            return
        if on:
            self.sel.register(tun.fd, selectors.EVENT_READ, self._on_tun)
        else:
            self.sel.unregister(tun.fd)
        self.tun_registered = on

    # ----------------------------------------------------------------- link up / down
    def _session_up(self, session: Session, now: float) -> None:
        peer = session.peer if session.peer is not None else self._peer_of(session)
        if session in self.pending:
            self.pending.remove(session)
        if peer is None:
            self._drop_session(session, "no such client (removed by a reload?)")
            return
        if not self._dials and not tcp.client_allowed(
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
            self._status_dirty = True
            return
        if self._dials:
            # Other half-open attempts are moot once one session is up.
            for other in list(self.pending):
                self._close_session(other)
        self.link_since = now
        try:
            self._peer_up(peer, session)
        except OSError as exc:  # TunError included
            log.error("cannot bring the link up: %s", exc)
            self._end_session(session, f"local error: {exc}")

    def _drain(self, session: Session, now: float) -> None:
        """A replaced session is read for `DRAIN_SECONDS` more (what was in flight on it still
        reaches the TUN: a rotation or a client's reconnect loses no packet), sends nothing new,
        and is then closed."""
        self._blocked.discard(session)
        self._draining.append((now + DRAIN_SECONDS, session))

    def _drained(self, now: float) -> None:
        keep = []
        for until, session in self._draining:
            if session.closed:
                continue
            if now >= until:
                self._close_session(session)
            else:
                keep.append((until, session))
        self._draining = keep

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
            self._flush_out(session)
        self._close_session(session)

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
            self._set_top_state()
        else:
            self.status.set_state("up")
        self._status_dirty = True
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

    def _end_session(self, session: Session, reason: str) -> None:
        """A session ended (error, EOF, dead peer): log once, tear down, and plan what follows."""
        if session.closed:
            return
        peer = session.peer
        was_active = peer is not None and peer.session is session
        self._close_session(session)
        now = time.monotonic()
        if was_active and peer is not None:
            peer.session = None
            self._peer_down(peer, reason)
            peer.set_state(DOWN, reason)
            if self.hub:
                self._set_top_state()
            else:
                self.status.set_state("down", reason)
                self._publish(force=True)
            if now - self.link_since > BACKOFF_RESET_AFTER:
                self.attempt = 0
        elif not self.hub or session.conn.authenticated:
            log.warning("%s: %s", session.carrier.peer, reason)
        if self._dials:
            if self.active is None and not self.pending and not self.stopping:
                if self.config.is_serial and not was_active:
                    # The line opened but a handshake message was lost (noise, the far end
                    # reopening its device): try again at once rather than backing off.
                    self.attempt = 0
                self._schedule_retry(now, reason)
        elif self.active is None and not self.hub:
            self.status.set_state("listening", reason)
        self._status_dirty = True

    def _close_session(self, session: Session) -> None:
        if not session.closed:
            self._retire_counters(session)
        session.closed = True
        self._blocked.discard(session)
        if session in self.pending:
            self.pending.remove(session)
        carrier = session.carrier
        if isinstance(carrier, UdpLink) and not carrier.owned:
            # A server's session on the shared socket: forget its index, keep the socket.
            if self.udp_index.get(session.conn.index) is session:
                del self.udp_index[session.conn.index]
            if session.tx_registered and self.udp is not None:
                session.tx_registered = False
                if not any(s.tx_registered for s in self._sessions() if s is not session):
                    fd = self.udp.fileno()
                    with contextlib.suppress(KeyError, ValueError):
                        self.sel.modify(fd, selectors.EVENT_READ, self._on_udp_server)
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(carrier.fileno())
        carrier.close()

    # ----------------------------------------------------------------- status, signals, reload
    def _session_drops(self, session: Session) -> dict[str, int]:
        drops = {f"proto_{k}": v for k, v in session.conn.stats.drops.items() if v}
        if session.framer is not None:
            drops.update({f"line_{k}": v for k, v in session.framer.errors.items() if v})
        return drops

    def _retire_counters(self, session: Session) -> None:
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
        if not (force or self._status_dirty or now >= self._status_due):
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
        sessions = self._sessions()
        for s in sessions:
            wire_in += s.conn.stats.wire_bytes_in
            wire_out += s.conn.stats.wire_bytes_out
        self.status.carrier_bytes_in, self.status.carrier_bytes_out = wire_in, wire_out
        drops = dict(self._drop_base)
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
        self._status_dirty = False
        self._status_due = now + STATUS_INTERVAL
        self._last_publish = now

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

    def _reload(self) -> None:
        """SIGHUP: re-read the config and keys; restart the link only if something changed
        (a hub whose only change is its peer set keeps its unchanged clients' sessions)."""
        try:
            new = load_config(self.config.source)
            table = load_table(new)
        except (ConfigError, KeyFileError, OSError) as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one:\n%s", exc)
            return
        old_ids = [p.identity() for p in self.table]
        new_ids = [p.identity() for p in table]
        if new == self.config and old_ids == new_ids:
            log.info("SIGHUP: configuration unchanged")
            return
        same_hub = (
            self.hub
            and new.is_hub
            and dataclasses.replace(new, peers=()) == dataclasses.replace(self.config, peers=())
        )
        if same_hub:
            self._reload_peers(new, table)
            return
        if not self.hub and not new.is_hub and _only_keys_differ(self.config, new):
            self._reload_keys(new, table.peers[0])
            return
        log.info("SIGHUP: configuration changed; restarting the link")
        self._stop_link("configuration reloaded")
        if new.randomdev != self.config.randomdev:
            try:
                rng = RandomDev(new.randomdev)
            except OSError as exc:
                log.error(
                    "SIGHUP: randomdev %s: %s; keeping %s",
                    new.randomdev,
                    exc,
                    self.config.randomdev,
                )
            else:
                self.rng.close()
                self.rng = rng
        self.config = new
        self.hub = new.is_hub
        self.table = table
        self.link.config = new
        self.status.hub = self.hub
        self.status.key_fingerprint = self._top_fingerprint()
        self.status.local = str(new.local)
        self.status.remote = str(new.remote) if new.remote is not None else ""
        self.status.local6 = str(new.local6) if new.local6 is not None else None
        self.status.remote6 = str(new.remote6) if new.remote6 is not None else None
        self.status.interface = new.interface
        self.attempt = 0
        self.next_attempt = 0.0
        if new.statusfile != self.writer.path:
            self.writer.remove()
            self.writer = StatusWriter(new.statusfile)
        if new.mode == "server" and not new.is_serial:
            self._relisten(time.monotonic())
        else:
            self.status.set_state("connecting")

    def _reload_peers(self, new: Config, table: PeerTable) -> None:
        """Apply a hub's new peer set: unchanged clients keep their Peer (session, counters);
        removed or changed ones are cut at once, so their old key opens nothing from now on."""
        current = self.table.by_name
        kept, added, gone = [], [], []
        rekeyed = 0
        for fresh in table:
            old = current.get(fresh.name)
            if old is not None and old.identity() == fresh.identity():
                kept.append(old)
            elif old is not None and _same_but_keys(old, fresh) and _still_accepted(old, fresh):
                _take_keys(old, fresh)  # a rotation step: the session stays up
                kept.append(old)
                rekeyed += 1
            else:
                added.append(fresh)
        keep_ids = {id(p) for p in kept}
        gone = [p for p in self.table if id(p) not in keep_ids]
        self.config = new
        self.link.config = new
        self.table = PeerTable(kept + added, hub=True)  # the ring sees it from now on
        for _until, drained in list(self._draining):  # a revoked key opens nothing, at once
            if drained.peer in gone:
                self._close_session(drained)
        for peer in gone:
            why = "changed" if peer.name in table.by_name else "removed"
            reason = f"client {why} by a reload"
            if peer.session is not None:
                session = peer.session
                with contextlib.suppress(Exception):
                    session.conn.close(reason)
                    self._flush_out(session)
                self._end_session(session, reason)
        for s in list(self.pending):  # proven but unconfirmed handshakes of a revoked key
            if s.conn.peer is not None and self.table.by_name.get(s.conn.peer.name) is not (
                s.conn.peer
            ):
                self._close_session(s)
        self.status.key_fingerprint = self._top_fingerprint()
        self._status_dirty = True
        log.info(
            "SIGHUP: clients reloaded: %d kept (%d with new keys), %d added or changed, "
            "%d removed or changed",
            len(kept),
            rekeyed,
            len(added),
            len(gone),
        )

    def _reload_keys(self, new: Config, fresh: Peer) -> None:
        """A point-to-point link whose config changed only in `keyfile`/`nextkey` (a rotation
        step): the running session stays up while its key is still accepted; a client whose
        primary key changed opens a new session with it beside the running one, which then
        replaces it (make before break: the TUN, routes and the ping running stay)."""
        peer = self.peer
        primary_changed = fresh.key != peer.key
        keep = _still_accepted(peer, fresh)
        _take_keys(peer, fresh)
        self.table = PeerTable([peer], hub=False)  # index the new keys (the ring reads it)
        self.config = new
        self.link.config = new
        self.status.key_fingerprint = peer.fingerprint
        self.status.next_key_fingerprint = peer.next_fingerprint
        self._status_dirty = True
        session = peer.session
        if session is not None and not keep:
            log.info("SIGHUP: the running session's key is no longer accepted; reconnecting")
            self._end_session(session, "key rotated out")
            return
        log.info(
            "SIGHUP: keys reloaded (key %s%s); the link stays up",
            peer.fingerprint,
            f", also accepting {peer.next_fingerprint}" if peer.next_key is not None else "",
        )
        if primary_changed and session is not None and self._dials and not new.is_serial:
            self.redial = True  # the new key proves itself on a second connection first

    def _relisten(self, now: float) -> None:
        """Listen again after a reload; the port can stay busy for a moment (a hook's fork
        holding the old socket until it execs), so retry rather than give up."""
        try:
            self._open_listener()
            self.relisten_at = None
        except OSError as exc:
            self.relisten_at = now + ACCEPT_PAUSE
            self.status.set_state("down", f"cannot listen: {exc.strerror or exc}")
            self._status_dirty = True
            log.error(
                "cannot listen on %s:%d: %s; retrying",
                self.config.server_host,
                self.config.server_port,
                exc.strerror or exc,
            )

    def _stop_link(self, reason: str) -> None:
        # The listener first: hooks about to be forked must not inherit it.
        self.relisten_at = None
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
            self.listener_resume = None
        udp, self.udp = self.udp, None
        if udp is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(udp.fileno())
        for s in [*self.pending, *(d for _, d in self._draining)]:
            self._close_session(s)
        self._draining = []
        for peer in self.table:
            s = peer.session
            if s is None:
                continue
            with contextlib.suppress(Exception):
                s.conn.close(reason)
                self._flush_out(s)
            self._close_session(s)
            peer.session = None
            self._peer_down(peer, reason)
            peer.set_state(DOWN, reason)
        if self.connecting is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.connecting)
            self.connecting.close()
            self.connecting = None
        if udp is not None:
            udp.close()  # after the goodbyes above went out on it

    def _teardown(self) -> None:
        log.info("shutting down")
        self._stop_link("shutting down")
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


_KEY_FIELDS = ("key", "fingerprint", "next_key", "next_fingerprint")


def _only_keys_differ(old: Config, new: Config) -> bool:
    """True when two configs differ in `keyfile`/`nextkey` at most."""
    return dataclasses.replace(new, keyfile=old.keyfile, nextkey=old.nextkey) == old


def _same_but_keys(old: Peer, new: Peer) -> bool:
    """True when two peers differ in their keys at most (`key`, `next_key`: a rotation step)."""
    return dataclasses.replace(new, key=old.key, next_key=old.next_key).identity() == (
        old.identity()
    )


def _still_accepted(old: Peer, new: Peer) -> bool:
    """True when `old`'s running session (if any) was opened with a key `new` still accepts."""
    if old.session is None:
        return True
    used = old.fingerprint_of(old.session.conn.key_id)
    return used in (new.fingerprint, new.next_fingerprint)


def _take_keys(peer: Peer, fresh: Peer) -> None:
    """Give `peer` the keys of `fresh` (the rest of it, its session and counters, stay)."""
    for name in _KEY_FIELDS:
        setattr(peer, name, getattr(fresh, name))
