"""The end that opens the carrier: a TCP or UDP client, or either end of a serial line.

It owns the client half of the link life cycle::

    CONNECTING -carrier open-> HANDSHAKE -LinkUp-> UP -dead/EOF/error-> DOWN -backoff-> CONNECTING

with the reconnect backoff (exponential, capped, jittered, reset by a link that stayed up), the
connect deadline, and the second session a key rotation opens beside the running one (make
before break). Sessions it opens are handed to the daemon, which runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vpnd_runtime.carriers import SerialCarrier, run_modemchat
from vpnd_runtime.io import tcp
from vpnd_runtime.io.udp import UDP_READS, UdpEndpoint, UdpLink
from vpnd_runtime.proto.connection import INDEX_LEN, Connection
from vpnd_runtime.session import HANDSHAKE_TIMEOUT, Session, new_index, params_from_config

if TYPE_CHECKING:
    from vpnd_runtime.daemon import Daemon
    from vpnd_runtime.proto.slip import SlipFramer

log = logging.getLogger("vpnd")

#: Reconnect backoff: first delay, cap, and jitter (the delay is scaled by uniform(1-J, 1)).
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
BACKOFF_JITTER = 0.5
#: A link that stayed up this long resets the backoff to its first step.
BACKOFF_RESET_AFTER = 30.0


class Dialer:
    """Opens the carrier (again and again, with backoff) for the daemon `d`."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.connecting: socket.socket | None = None  # a TCP connect in progress
        self.connect_started = 0.0
        self.attempt = 0
        self.next_attempt = 0.0
        self.link_since = 0.0
        self.redial = False  # open a second session with a new key beside the running one

    def reset(self) -> None:
        """Dial at once, from the first backoff step (a reload)."""
        self.attempt = 0
        self.next_attempt = 0.0

    def deadline(self, now: float, deadline: float) -> float:
        """`deadline`, or earlier if the next attempt or the connect deadline comes first."""
        if self.d.active is None:
            if self.connecting is None and not self.d.pending:
                deadline = min(deadline, self.next_attempt)
            elif self.connecting is not None:
                deadline = min(deadline, self.connect_started + HANDSHAKE_TIMEOUT)
        return deadline

    def tick(self, now: float) -> None:
        """Timers: a rotation's redial, the next attempt, the connect deadline."""
        d = self.d
        if self.redial and d.active is not None and self.connecting is None and not d.pending:
            self.redial = False
            log.info("opening a session with the new key beside the running one")
            self.connect(now)
        if d.active is None and not d.pending:
            if self.connecting is None and now >= self.next_attempt and not d.stopping:
                if d.config.is_serial:
                    self.open_line(now)
                else:
                    self.connect(now)
            elif self.connecting is not None and now - self.connect_started > HANDSHAKE_TIMEOUT:
                self.connect_failed(now, "connect timed out")

    def session_ended(self, now: float, was_active: bool, reason: str) -> None:
        """A session ended: plan the next attempt (unless another one is up or waiting)."""
        d = self.d
        if was_active and now - self.link_since > BACKOFF_RESET_AFTER:
            self.attempt = 0
        if d.active is None and not d.pending and not d.stopping:
            if d.config.is_serial and not was_active:
                # The line opened but a handshake message was lost (noise, the far end
                # reopening its device): try again at once rather than backing off.
                self.attempt = 0
            self.schedule_retry(now, reason)

    def cancel(self) -> None:
        """Abandon a TCP connect in progress."""
        if self.connecting is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.d.sel.unregister(self.connecting)
            self.connecting.close()
            self.connecting = None

    def connect(self, now: float) -> None:
        cfg = self.d.config
        if self.d.active is None:  # (beside a running session: a rotation's new key)
            self.d.status.set_state("connecting")
            self.d.status_dirty = True
        if self.d.is_udp:
            self.connect_udp(now)
            return
        try:
            sock = tcp.start_connect(
                (cfg.server_host, cfg.server_port),
                (cfg.client_host, cfg.client_port),
                tcp.ipopts_to_tos(cfg.ipopts),
            )
        except OSError as exc:
            self.connect_failed(now, str(exc.strerror or exc))
            return
        self.connecting = sock
        self.connect_started = now
        self.d.sel.register(sock, selectors.EVENT_WRITE, self.on_connected)

    def on_connected(self, mask: int, now: float) -> None:
        sock = self.connecting
        if sock is None:
            return
        self.d.sel.unregister(sock)
        self.connecting = None
        try:
            tcp.finish_connect(sock)
        except OSError as exc:
            sock.close()
            self.connect_failed(now, exc.strerror or str(exc))
            return
        cfg = self.d.config
        carrier = tcp.TcpCarrier(sock, tcp.endpoint_text(cfg.server_host, cfg.server_port))
        conn = self._initiator(now)
        session = self.d.add_pending(carrier, conn, now)
        session.peer = self.d.peer
        if self.d.active is None:
            self.d.status.set_state("handshake")
            self.d.status.peer = carrier.peer
            self.d.status_dirty = True
        log.info("connected to %s, handshaking", carrier.peer)
        self.d.run_protocol(session, now, lambda: conn.start(now))

    def _initiator(self, now: float, index: int = 0) -> Connection:
        """The protocol session of a carrier this end opened (it speaks first)."""
        cfg = self.d.config
        return Connection(
            "initiator",
            self.d.peer.key,
            params_from_config(cfg),
            self.d.rng,
            now,
            wall=time.time(),
            announce=cfg.local,
            index=index,
        )

    def connect_udp(self, now: float) -> None:
        """UDP client: a fresh socket (unconnected, so the kernel picks the source address per
        datagram and a changed address roams) and a session that handshakes at once."""
        cfg = self.d.config
        try:
            tos = tcp.ipopts_to_tos(cfg.ipopts)
            endpoint = UdpEndpoint(
                (cfg.client_host, cfg.client_port), tos, peer=(cfg.server_host, cfg.server_port)
            )
        except OSError as exc:
            self.schedule_retry(now, f"cannot open a UDP socket: {exc.strerror or exc}")
            return
        carrier = UdpLink(endpoint, (cfg.server_host, cfg.server_port), owned=True)
        conn = self._initiator(now, index=new_index(()))
        session = Session(carrier, conn, now)
        self.d.pending.append(session)
        self.d.sel.register(
            endpoint.fileno(), selectors.EVENT_READ, self.udp_client_reader(session)
        )
        session.peer = self.d.peer
        if self.d.active is None:  # (beside a running session: a rotation's new key)
            self.d.status.set_state("handshake")
            self.d.status.peer = carrier.peer
            self.d.status_dirty = True
        log.info(
            "udp to %s (gso %s, gro %s), handshaking",
            carrier.peer,
            "on" if endpoint.gso else "off",
            "on" if endpoint.gro else "off",
        )
        self.d.run_protocol(session, now, lambda: conn.start(now))

    def udp_client_reader(self, session: Session) -> Callable[[int, float], None]:
        """Selector callback of a UDP client's socket: datagrams from the server to our index."""
        carrier = session.carrier
        assert isinstance(carrier, UdpLink)  # noqa: S101 — built by _connect_udp
        endpoint = carrier.endpoint
        server = carrier.addr

        def on_event(mask: int, now: float) -> None:
            if mask & selectors.EVENT_WRITE and endpoint.flush():
                self.d.set_tx_wait(session, False, now)
            if not mask & selectors.EVENT_READ:
                return
            try:
                batches = endpoint.receive(UDP_READS)
            except OSError as exc:
                self.d.end_session(session, f"carrier error: {exc.strerror or exc}")
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
                drops = self.d.status.drops
                drops["udp_stray"] = drops.get("udp_stray", 0) + stray
            if msgs and not session.closed:
                self.d.run_protocol(session, now, lambda: session.conn.receive_datagrams(msgs, now))

        return on_event

    def open_line(self, now: float) -> None:
        """Serial: open the device, run the modem chat, and start a session on the line."""
        from vpnd_runtime.io.serial import SerialTransport  # noqa: PLC0415 — serial links only

        cfg = self.d.config
        self.d.status.set_state("connecting")
        self.d.status_dirty = True
        try:
            transport = SerialTransport.open(
                cfg.server_host, cfg.speed, rtscts=not cfg.nortscts, localline=cfg.localline
            )
        except OSError as exc:
            self.schedule_retry(now, f"cannot open {cfg.server_host}: {exc.strerror or exc}")
            return
        if cfg.modemchat:
            result = run_modemchat(cfg, transport)
            if not result[0]:
                transport.close()
                self.schedule_retry(time.monotonic(), f"modem chat failed: {result[1]}")
                return
            now = time.monotonic()
        carrier = SerialCarrier(transport, cfg.server_host, cfg.speed)
        conn, framer = self.line_connection(now)
        session = self.d.add_pending(carrier, conn, now, framer)
        session.peer = self.d.peer
        self.d.status.set_state("handshake")
        self.d.status.peer = carrier.peer
        log.info("line %s open at %d bit/s, handshaking", cfg.server_host, cfg.speed)
        self.start_line_handshake(session, now)

    def line_connection(self, now: float) -> tuple[Connection, SlipFramer]:
        """A fresh protocol session for the line, with its SLIP framer (kept for drop counts)."""
        from vpnd_runtime.proto.slip import SlipFramer  # noqa: PLC0415 — serial links only

        cfg = self.d.config
        role = "initiator" if cfg.mode == "client" else "responder"
        params = params_from_config(cfg)
        if role == "initiator":
            # Desynchronise from the far end's own handshake deadline.
            timeout = params.handshake_timeout * self.d.jitter.uniform(1.0, 1.5)
            params = dataclasses.replace(params, handshake_timeout=timeout)
        framer = SlipFramer(xfilter=cfg.xfilter)
        conn = Connection(
            role,
            self.d.peer.key,
            params,
            self.d.rng,
            now,
            framer=framer,
            replay_guard=self.d.guard() if role == "responder" else None,
            wall=time.time(),
            announce=cfg.local if role == "initiator" else None,
        )
        return conn, framer

    def start_line_handshake(self, session: Session, now: float) -> None:
        if session.conn.role == "initiator":
            self.d.run_protocol(session, now, lambda: session.conn.start(now))
        else:
            self.d.file_session(session)

    def restart_line_handshake(self, session: Session, now: float, reason: str) -> None:
        log.info("%s: %s; handshaking again", session.carrier.peer, reason)
        self.d.status.set_state("handshake", reason)
        self.d.status_dirty = True
        self.d.retire_counters(session)
        session.conn, session.framer = self.line_connection(now)
        session.deadline = None
        self.start_line_handshake(session, now)

    def connect_failed(self, now: float, reason: str) -> None:
        if self.connecting is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.d.sel.unregister(self.connecting)
            self.connecting.close()
            self.connecting = None
        self.schedule_retry(now, reason)

    def schedule_retry(self, now: float, reason: str) -> None:
        delay = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(self.attempt, 16)))
        delay *= self.d.jitter.uniform(1 - BACKOFF_JITTER, 1.0)
        self.attempt += 1
        self.next_attempt = now + delay
        self.d.status.set_state("connecting", reason)
        self.d.status_dirty = True
        log.warning(
            "link to %s:%d not up (%s); retrying in %.1f s",
            self.d.config.server_host,
            self.d.config.server_port,
            reason,
            delay,
        )
