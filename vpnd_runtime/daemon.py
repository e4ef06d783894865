"""vpnd's daemon: the one place where the sans-I/O protocol meets sockets, serial lines and the TUN.

Theory of operation
-------------------
One process serves one link (one config file). A single thread runs a selector loop over: the
carrier listener (server), the carrier connection(s), the TUN (only while the link is up), and a
wake-up pipe for signals. Time is read once per loop turn and handed to the protocol core, which
owns every rule (handshake, counters, keepalive, rekey); the daemon owns I/O, hooks, routes,
reconnects and the status record.

Link life cycle::

    client: CONNECTING -tcp-> HANDSHAKE -LinkUp-> UP -dead/EOF/error-> DOWN -backoff-> CONNECTING
    server: LISTENING -accept-> (pending handshakes: capped, each with a deadline) -LinkUp-> UP

On UP the TUN is created (slipup), configured (local/remote/mtu), routes route1..9 are added and
linkup runs; on DOWN the reverse: linkdown, routes removed, TUN closed (the kernel deletes it),
slipdown. A server keeps accepting while UP: a client that restarted authenticates on a new
connection, which then replaces the old one (the link stays up; the old session is closed).
Unauthenticated connections get no answer, a deadline and a cap (`MAX_PENDING`).

Outbound pipeline (TUN -> carrier), run when the TUN fd is readable:
 1. read up to `TUN_BATCH` packets without blocking; with IFF_VNET_HDR each is a 10-byte virtio
    header plus a packet, TCP flows arriving as GSO super-packets of up to 64 KiB;
 2. `conn.send_packets(batch, now)`: batch into frames of at most `sendbuf` bytes, compress when
    asked and useful, AEAD-seal under the send key with the next counter, length-prefix;
 3. `carrier.write(conn.data_to_send())`: the kernel takes what it can, the rest is queued;
 4. while the queue is not empty the TUN is not read (back-pressure): the TUN queue fills and the
    kernel drops, so the inner TCP slows down instead of vpnd buffering without end.

Inbound pipeline (carrier -> TUN), run when the carrier is readable:
 1. read up to 256 KiB;
 2. `conn.receive_data(data, now)`: unframe (length cap checked first), check the epoch and the
    counter, AEAD-open (a bad tag never gets further), decompress, split the batch;
 3. write each packet, virtio header included, to the TUN: the kernel segments super-packets and
    completes partial checksums;
 4. answers the core queued (pongs, rekey messages) are flushed to the carrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import logging
import logging.handlers
import os
import random
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vpnd_runtime import privdrop
from vpnd_runtime.config import Config, ConfigError, load_config
from vpnd_runtime.io import tcp
from vpnd_runtime.io.hooks import HookRunner
from vpnd_runtime.io.serial import SerialTransport
from vpnd_runtime.io.tun import READ_SIZE, Tun, TunError, TunWriter
from vpnd_runtime.keyfile import KeyFileError, fingerprint, load_key
from vpnd_runtime.proto.connection import Connection, Params
from vpnd_runtime.proto.errors import ProtocolError, RemoteProtocolError
from vpnd_runtime.proto.events import Closed, KeepaliveRtt, LinkUp, Packets, PeerDead, Rekeyed
from vpnd_runtime.proto.handshake import ReplayGuard
from vpnd_runtime.proto.slip import SlipFramer
from vpnd_runtime.status import StatusRecord, StatusWriter

log = logging.getLogger("vpnd")

#: Packets read from the TUN per loop turn before sealing them together.
TUN_BATCH = 32
#: Unauthenticated connections a server lets wait at once; more are closed on arrival.
MAX_PENDING = 8
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
#: Longest a shutdown waits for linkdown/slipdown hooks.
SHUTDOWN_HOOK_WAIT = 35.0


def params_from_config(config: Config) -> Params:
    """The protocol core's parameters for this config (the same on both ends of a link)."""
    return Params(
        cipher=config.cipher,
        compress=config.compress,
        compress_level=config.compress_level,
        keepalive=config.keepalive,
        noanswer=config.noanswer,
        keyttl=config.keyttl,
        maxdelay=config.maxdelay,
        sendbuf=config.sendbuf,
        lossy=config.is_serial,
        # A handshake message lost on a noisy line is only retried by starting over: keep that
        # wait short on serial links (a handshake is ~200 bytes: 20 ms at 115200 bit/s).
        handshake_timeout=SERIAL_HANDSHAKE_TIMEOUT if config.is_serial else HANDSHAKE_TIMEOUT,
    )


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
    """The serial line seen through the daemon's Carrier interface (io/tcp.py)."""

    def __init__(self, transport: SerialTransport, device: str) -> None:
        self.transport = transport
        self.peer = device

    def fileno(self) -> int:
        return self.transport.fileno()

    def read(self) -> bytes:
        """Bytes waiting; LineDown (an OSError) when the line is gone."""
        data = self.transport.read()
        if not data:
            raise BlockingIOError
        return data

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def flush(self) -> bool:
        return self.transport.flush() == 0

    @property
    def pending(self) -> bool:
        return self.transport.pending() > 0

    def check_carrier(self) -> None:
        """LineDown when the modem dropped carrier (never with localline)."""
        self.transport.check_carrier()

    def close(self) -> None:
        self.transport.close()


@dataclass
class Session:
    """One carrier connection and the protocol state riding on it."""

    carrier: tcp.Carrier
    conn: Connection
    created: float
    up: bool = False
    closed: bool = False
    framer: SlipFramer | None = None
    tx_registered: bool = field(default=False)


class Daemon:
    """Runs one link until told to stop. `run()` returns the process exit code."""

    def __init__(self, config: Config, key: bytes) -> None:
        self.config = config
        self.key = key
        self.fp = fingerprint(key)
        self.sel = selectors.DefaultSelector()
        self.hooks = HookRunner()
        self.status = StatusRecord(
            config=config.source,
            mode=config.mode,
            interface=config.interface,
            local=str(config.local),
            remote=str(config.remote),
            key_fingerprint=self.fp,
        )
        self.writer = StatusWriter(config.statusfile)
        self.rng = RandomDev(config.randomdev)
        self.jitter = random.Random(os.urandom(16))  # noqa: S311 — backoff jitter, not crypto
        self.replay_guard: Any = None
        self.listener: socket.socket | None = None
        self.listener_resume: float | None = None
        self.relisten_at: float | None = None
        self.connecting: socket.socket | None = None
        self.connect_started = 0.0
        self.pending: list[Session] = []
        self.active: Session | None = None
        self.tun: Tun | None = None
        self.tun_writer: TunWriter | None = None
        # A slow line must not be handed a whole batch at once (see TUN_BATCH).
        self.tun_batch = 4 if config.is_serial else TUN_BATCH
        self._up_hooks: set[str] = set()  # which "up" hooks ran, so each "down" runs only after
        self._in_base = (0, 0)  # packets/bytes written by TUN writers of earlier links
        self._wire_base = (0, 0)  # carrier bytes in/out of sessions already closed
        self._drop_base: dict[str, int] = {}  # protocol/line drops of sessions already closed
        self.tun_registered = False
        self.attempt = 0
        self.next_attempt = 0.0
        self.link_since = 0.0
        self.stopping = False
        self.reload_requested = False
        self.exit_code = 0
        self._status_due = 0.0
        self._status_dirty = True
        self._wake_r, self._wake_w = socket.socketpair()

    # ----------------------------------------------------------------- main loop
    def run(self, ready: Callable[[str | None], None] | None = None) -> int:
        """Serve the link until SIGTERM/SIGINT; `ready(None)` once started, else `ready(msg)`."""
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
        log.info(
            "vpnd %s starting: %s %s -> %s, key %s",
            cfg.mode,
            cfg.interface,
            cfg.local,
            cfg.remote,
            self.fp,
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

    def _open_listener(self) -> None:
        cfg = self.config
        self.listener = tcp.listen(cfg.server_host, cfg.server_port, tcp.ipopts_to_tos(cfg.ipopts))
        self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        self.status.set_state("listening")
        log.info("listening on %s:%d", cfg.server_host, cfg.server_port)

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
        if self.active is not None:
            self._end_session(self.active, f"internal error: {exc}")
        elif self._dials and self.connecting is None and not self.stopping:
            self._schedule_retry(time.monotonic(), f"internal error: {exc}")

    def _next_deadline(self, now: float) -> float:
        deadline = now + STATUS_INTERVAL
        for s in self._sessions():
            d = s.conn.next_deadline()
            if d is not None:
                deadline = min(deadline, d)
        if self._dials and self.active is None:
            if self.connecting is None and not self.pending:
                deadline = min(deadline, self.next_attempt)
            elif self.connecting is not None:
                deadline = min(deadline, self.connect_started + HANDSHAKE_TIMEOUT)
        return deadline

    def _sessions(self) -> list[Session]:
        return [*self.pending, self.active] if self.active else list(self.pending)

    def _timers(self, now: float) -> None:
        if self.relisten_at is not None and now >= self.relisten_at and not self.stopping:
            self._relisten(now)
        if self.listener_resume is not None and now >= self.listener_resume and self.listener:
            self.listener_resume = None
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)
        for s in self._sessions():
            deadline = s.conn.next_deadline()
            if deadline is not None and deadline <= now:
                self._run_protocol(s, now, lambda s=s: s.conn.tick(now))
        if self.active is not None and isinstance(self.active.carrier, SerialCarrier):
            try:
                self.active.carrier.check_carrier()
            except OSError as exc:
                self._end_session(self.active, str(exc))
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
        self.status.set_state("connecting")
        self._status_dirty = True
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
        carrier = tcp.TcpCarrier(sock, f"{cfg.server_host}:{cfg.server_port}")
        conn = Connection(
            "initiator", self.key, params_from_config(cfg), self.rng, now, wall=time.time()
        )
        session = self._add_pending(carrier, conn, now)
        self.status.set_state("handshake")
        self.status.peer = carrier.peer
        self._status_dirty = True
        log.info("connected to %s, handshaking", carrier.peer)
        self._run_protocol(session, now, lambda: conn.start(now))

    def _open_line(self, now: float) -> None:
        """Serial: open the device, run the modem chat, and start a session on the line."""
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
            result = _run_modemchat(cfg, transport)
            if not result[0]:
                transport.close()
                self._schedule_retry(time.monotonic(), f"modem chat failed: {result[1]}")
                return
            now = time.monotonic()
        carrier = SerialCarrier(transport, cfg.server_host)
        conn, framer = self._line_connection(now)
        session = self._add_pending(carrier, conn, now, framer)
        self.status.set_state("handshake")
        self.status.peer = carrier.peer
        log.info("line %s open at %d bit/s, handshaking", cfg.server_host, cfg.speed)
        self._start_line_handshake(session, now)

    def _line_connection(self, now: float) -> tuple[Connection, SlipFramer]:
        """A fresh protocol session for the line, with its SLIP framer (kept for drop counts)."""
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
            self.key,
            params,
            self.rng,
            now,
            framer=framer,
            replay_guard=self._guard() if role == "responder" else None,
            wall=time.time(),
        )
        return conn, framer

    def _start_line_handshake(self, session: Session, now: float) -> None:
        if session.conn.role == "initiator":
            self._run_protocol(session, now, lambda: session.conn.start(now))

    def _restart_line_handshake(self, session: Session, now: float, reason: str) -> None:
        log.info("%s: %s; handshaking again", session.carrier.peer, reason)
        self.status.set_state("handshake", reason)
        self._status_dirty = True
        self._retire_counters(session)
        session.conn, session.framer = self._line_connection(now)
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
            peer = f"{addr[0]}:{addr[1]}"
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
            if len(self.pending) >= MAX_PENDING:
                # Evict the oldest: idle connections cannot keep the real client out for long.
                oldest = self.pending[0]
                log.warning(
                    "%d handshakes waiting: dropping the oldest, from %s",
                    MAX_PENDING,
                    oldest.carrier.peer,
                )
                self._close_session(oldest)
            carrier = tcp.TcpCarrier(sock, peer)
            conn = Connection(
                "responder",
                self.key,
                params_from_config(cfg),
                self.rng,
                now,
                replay_guard=self._guard(),
                wall=time.time(),
            )
            self._add_pending(carrier, conn, now)
            log.info("connection from %s, waiting for its handshake", peer)

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
                    self._set_tx_wait(session, False)
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
            elif type(ev) is KeepaliveRtt:
                self.status.last_rtt = ev.rtt
                self.status.missed_keepalives = 0
            elif type(ev) is Rekeyed:
                self.status.rekeys += 1
                self.status.epoch = ev.epoch
                log.info("session rekeyed (epoch %d)", ev.epoch)
            elif type(ev) is PeerDead and not session.up and session.framer is not None:
                # Serial: a handshake message was lost. Start over on the line, which stays open
                # (closing a line loses whatever the far end is sending meanwhile).
                self._restart_line_handshake(session, now, ev.reason)
                return
            elif type(ev) in (PeerDead, Closed):
                if inbound:
                    self._to_tun(inbound)
                    inbound = []
                why = ev.reason if type(ev) is PeerDead else f"peer closed the link: {ev.reason}"
                self._end_session(session, why)
                return
        if inbound:  # one hand-over per carrier read, not per frame: fewer thread wake-ups
            self._to_tun(inbound)
        self._send(session)

    def _to_tun(self, packets: list[bytes]) -> None:
        """Hand decrypted packets to the TUN writer (counted as dropped while the link is down)."""
        if self.tun_writer is None:
            self.status.drops["link_down"] = self.status.drops.get("link_down", 0) + len(packets)
            return
        self.tun_writer.put(packets)

    def _on_tun(self, mask: int, now: float) -> None:
        session = self.active
        tun = self.tun
        if session is None or tun is None:
            return
        read = os.read
        fd = tun.fd
        batch: list[bytes] = []
        for _ in range(self.tun_batch):
            try:
                batch.append(read(fd, READ_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._end_session(session, f"TUN {tun.name} lost: {exc.strerror or exc}")
                return
        if not batch:
            return
        self.status.packets_out += len(batch)
        self.status.bytes_out += sum(map(len, batch)) - len(batch) * tun.hdr_len
        self._run_protocol(session, now, lambda: session.conn.send_packets(batch, now))

    def _send(self, session: Session) -> None:
        if session.closed:
            return
        data = session.conn.data_to_send()
        carrier = session.carrier
        try:
            if data:
                carrier.write(data)
            elif carrier.pending:
                carrier.flush()
        except OSError as exc:
            self._end_session(session, f"carrier error: {exc.strerror or exc}")
            return
        self._set_tx_wait(session, carrier.pending)

    def _add_pending(
        self, carrier: tcp.Carrier, conn: Connection, now: float, framer: SlipFramer | None = None
    ) -> Session:
        """A new carrier connection, watched for input, waiting for its handshake."""
        session = Session(carrier, conn, now, framer=framer)
        self.pending.append(session)
        self.sel.register(carrier.fileno(), selectors.EVENT_READ, self._reader(session))
        return session

    def _set_tx_wait(self, session: Session, waiting: bool) -> None:
        """Watch the carrier for writability, and pause the TUN, exactly while output is queued."""
        if waiting == session.tx_registered or session.closed:
            return
        session.tx_registered = waiting
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0)
        fd = session.carrier.fileno()
        self.sel.modify(fd, events, self.sel.get_key(fd).data)  # the same callback, new interest
        if session is self.active:
            self._watch_tun(not waiting)

    def _watch_tun(self, on: bool) -> None:
        if self.tun is None or on == self.tun_registered:
            return
        if on:
            self.sel.register(self.tun.fd, selectors.EVENT_READ, self._on_tun)
        else:
            self.sel.unregister(self.tun.fd)
        self.tun_registered = on

    # ----------------------------------------------------------------- link up / down
    def _session_up(self, session: Session, now: float) -> None:
        session.up = True
        if session in self.pending:
            self.pending.remove(session)
        previous = self.active
        self.active = session
        self.status.peer = session.carrier.peer
        self.status.session_started = time.time()
        self.status.epoch = 0
        if previous is not None:
            log.info(
                "new authenticated session from %s replaces the one from %s",
                session.carrier.peer,
                previous.carrier.peer,
            )
            self.status.reconnects += 1
            self._close_session(previous)
            self._watch_tun(not session.carrier.pending)
            return
        if self._dials:
            # Other half-open attempts are moot once one session is up.
            for other in list(self.pending):
                self._close_session(other)
        self.link_since = now
        try:
            self._link_up(session)
        except OSError as exc:  # TunError included
            log.error("cannot bring the link up: %s", exc)
            self._end_session(session, f"local error: {exc}")

    def _link_up(self, session: Session) -> None:
        cfg = self.config
        if self.status.links_up:
            self.status.reconnects += 1
        self.status.links_up += 1
        tun = Tun.open(cfg.interface, offload=not cfg.is_serial)
        self.tun = tun
        _disable_ipv6(tun.name)
        tun.configure(cfg.local, cfg.remote, cfg.mtu)
        self.tun_writer = TunWriter(tun.fd, tun.hdr_len)
        env = self._hook_env(session)
        self.hooks.submit("slipup", cfg.slipup, [tun.name], env)
        self._up_hooks.add("slipup")
        if cfg.autoroute and cfg.mode == "client" and not cfg.is_serial:
            try:
                pinned = tun.pin_route(ipaddress.IPv4Address(cfg.server_host))
                if pinned:
                    log.info("autoroute: carrier route pinned: %s", pinned)
            except TunError as exc:
                log.warning("autoroute: %s", exc)
        for route in cfg.routes:
            try:
                tun.add_route(route.network, route.gateway)
            except TunError as exc:
                log.error(
                    "route%d %s via %s not added: %s",
                    route.index,
                    route.network,
                    route.gateway,
                    exc,
                )
        self.hooks.submit("linkup", cfg.linkup, self._hook_args(session), env)
        self._up_hooks.add("linkup")
        self.status.set_state("up")
        self._status_dirty = True
        self._watch_tun(not session.carrier.pending)
        log.info(
            "link up: %s %s <-> %s via %s, key %s",
            tun.name,
            cfg.local,
            cfg.remote,
            session.carrier.peer,
            self.fp,
        )

    def _hook_env(self, session: Session) -> dict[str, str]:
        cfg = self.config
        return {
            "VPND_INTERFACE": cfg.interface,
            "VPND_LOCAL": str(cfg.local),
            "VPND_REMOTE": str(cfg.remote),
            "VPND_PEER": session.carrier.peer,
            "VPND_MODE": cfg.mode,
            "VPND_CONFIG": cfg.source,
        }

    def _hook_args(self, session: Session) -> list[str]:
        cfg = self.config
        return [cfg.interface, str(cfg.local), str(cfg.remote), session.carrier.peer]

    def _link_down(self, session: Session, reason: str) -> None:
        """Undo `_link_up`, whatever part of it happened: each down hook runs only if its up
        hook ran, and the TUN is closed even when removing routes fails."""
        cfg = self.config
        self._watch_tun(False)
        env = self._hook_env(session)
        if "linkup" in self._up_hooks:
            self.hooks.submit("linkdown", cfg.linkdown, [*self._hook_args(session), reason], env)
        tun, self.tun = self.tun, None
        writer, self.tun_writer = self.tun_writer, None
        try:
            if writer is not None:
                drops = writer.close()
                self._in_base = (
                    self._in_base[0] + writer.packets,
                    self._in_base[1] + writer.bytes,
                )
                for why, count in drops.items():
                    self.status.drops[why] = self.status.drops.get(why, 0) + count
            if tun is not None:
                for problem in tun.remove_routes():
                    log.warning("removing %s", problem)
        finally:
            if tun is not None:
                tun.close()
                if "slipup" in self._up_hooks:
                    self.hooks.submit("slipdown", cfg.slipdown, [tun.name], env)
            self._up_hooks.clear()
        self.status.session_started = None
        log.warning("link down: %s", reason)

    def _end_session(self, session: Session, reason: str) -> None:
        """A session ended (error, EOF, dead peer): log once, tear down, and plan what follows."""
        if session.closed:
            return
        was_active = session is self.active
        self._close_session(session)
        now = time.monotonic()
        if was_active:
            self.active = None
            self._link_down(session, reason)
            self.status.set_state("down", reason)
            self._publish(force=True)
            if now - self.link_since > BACKOFF_RESET_AFTER:
                self.attempt = 0
        else:
            log.warning("%s: %s", session.carrier.peer, reason)
        if self._dials:
            if self.active is None and not self.pending and not self.stopping:
                if self.config.is_serial and not was_active:
                    # The line opened but a handshake message was lost (noise, the far end
                    # reopening its device): try again at once rather than backing off.
                    self.attempt = 0
                self._schedule_retry(now, reason)
        elif self.active is None:
            self.status.set_state("listening", reason)
        self._status_dirty = True

    def _close_session(self, session: Session) -> None:
        if not session.closed:
            self._retire_counters(session)
        session.closed = True
        if session in self.pending:
            self.pending.remove(session)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(session.carrier.fileno())
        session.carrier.close()

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

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self._status_dirty or now >= self._status_due):
            return
        writer = self.tun_writer
        if writer is not None:
            self.status.packets_in = self._in_base[0] + writer.packets
            self.status.bytes_in = self._in_base[1] + writer.bytes
        wire_in, wire_out = self._wire_base
        for s in self._sessions():
            wire_in += s.conn.stats.wire_bytes_in
            wire_out += s.conn.stats.wire_bytes_out
        self.status.carrier_bytes_in, self.status.carrier_bytes_out = wire_in, wire_out
        drops = dict(self._drop_base)
        for s in self._sessions():
            for k, v in self._session_drops(s).items():
                drops[k] = drops.get(k, 0) + v
        self.status.drops.update(drops)
        if self.active is not None:
            self.status.missed_keepalives = self.active.conn.stats.missed_keepalives
        try:
            self.writer.write(self.status)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.writer.path, exc)
        self._status_dirty = False
        self._status_due = now + STATUS_INTERVAL

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
        """SIGHUP: re-read the config and key; restart the link only if something changed."""
        try:
            new = load_config(self.config.source)
            key = load_key(new.keyfile)
        except (ConfigError, KeyFileError, OSError) as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one:\n%s", exc)
            return
        if new == self.config and key == self.key:
            log.info("SIGHUP: configuration unchanged")
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
        self.key = key
        self.fp = fingerprint(key)
        self.status.key_fingerprint = self.fp
        self.status.local, self.status.remote = str(new.local), str(new.remote)
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
        for s in list(self.pending):
            self._close_session(s)
        if self.active is not None:
            s = self.active
            with contextlib.suppress(Exception):
                s.conn.close(reason)
                s.carrier.write(s.conn.data_to_send())
            self._close_session(s)
            self.active = None
            self._link_down(s, reason)
        if self.connecting is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.connecting)
            self.connecting.close()
            self.connecting = None

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


def _run_modemchat(config: Config, transport: SerialTransport) -> tuple[bool, str]:
    """Run the `modemchat` script on the open line before the link starts."""
    from vpnd_runtime.io.chat import load_chat_script, run_chat  # noqa: PLC0415 — serial only

    assert config.modemchat is not None  # noqa: S101 — checked by the caller
    try:
        script = load_chat_script(config.modemchat)
    except (OSError, ValueError) as exc:
        return False, str(exc)
    result = run_chat(script, transport.port, on_step=lambda line: log.info("modemchat: %s", line))
    return result.ok, result.reason


def _disable_ipv6(ifname: str) -> None:
    """The tunnel carries IPv4; without this the kernel sends IPv6 chatter that skews counters."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    with contextlib.suppress(OSError), open(path, "w") as fh:
        fh.write("1")


# --------------------------------------------------------------------- process management
def _setup_logging(config: Config, daemon: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    tag = f"vpnd[{config.interface}]"
    if daemon and os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter(f"{tag}: %(message)s"))
    elif daemon:
        logpath = log_path(config)
        os.makedirs(os.path.dirname(logpath) or ".", exist_ok=True)
        handler = logging.FileHandler(logpath)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s: %(message)s"))
    root.addHandler(handler)


def log_path(config: Config) -> str:
    """Where a detached daemon logs when there is no syslog socket: beside its status file."""
    base = config.statusfile
    for suffix in (".json", ".status"):
        base = base.removesuffix(suffix)
    return base + ".log"


def write_pidfile(path: str) -> int:
    """Take the pidfile: a file holding our PID, flock'ed and kept open while we run.

    A second vpnd on the same pidfile finds the lock held and refuses (no check-then-create race);
    a stale file, whose process is gone and its lock with it, is simply taken over.
    Returns the fd to hand to `remove_pidfile`.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:  # O_NOFOLLOW: a symlink planted at the pidfile's name never makes us write its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, f"pidfile {path} is a symlink; refusing to follow it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        old = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(errno.EEXIST, f"pidfile {path}: vpnd already running as pid {old}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def remove_pidfile(path: str, fd: int) -> None:
    """Delete the pidfile (still locked by us, so still ours) and release it. After a drop to
    `user` the directory may be root's: the file then stays, unlocked, i.e. stale (harmless)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.unlink(path)
    os.close(fd)


def _daemonize() -> int:
    """Detach the vpnd way (fork, setsid, fork); returns the write end of a readiness pipe.

    The original process waits on the pipe and exits 0 when the daemon reports it started, or 1
    with the daemon's error message, so `vpnd --daemon` fails loudly when the link cannot start.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        if msg.startswith(b"ok"):
            os._exit(0)
        sys.stderr.write(
            (msg.decode(errors="replace") or "vpnd: daemon died while starting") + "\n"
        )
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return w


def run(config: Config, daemonize: bool = False, verbose: bool = False) -> int:
    """`vpnd -f CONF`: load the key, optionally detach, serve the link; returns the exit code."""
    key = load_key(config.keyfile)
    ready_fd = _daemonize() if daemonize else -1
    _setup_logging(config, daemonize, verbose)

    def ready(error: str | None) -> None:
        if ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ok" if error is None else f"vpnd: {error}".encode())
                os.close(ready_fd)

    pid_fd = -1
    try:
        ident = privdrop.prepare(config)  # `user`: resolve it, make its status directory
        if config.pidfile:
            pid_fd = write_pidfile(config.pidfile)
        privdrop.drop(config, ident)  # from here: that user, CAP_NET_ADMIN + CAP_NET_BIND_SERVICE
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        ready(str(exc.strerror or exc))
        if config.pidfile and pid_fd >= 0:
            remove_pidfile(config.pidfile, pid_fd)
        return 1
    try:
        return Daemon(config, key).run(ready)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        ready(str(exc))
        return 1
    finally:
        if config.pidfile and pid_fd >= 0:
            remove_pidfile(config.pidfile, pid_fd)
