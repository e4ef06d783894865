"""The end that waits for the carrier: a server's TCP listener or its one UDP socket.

A server keeps accepting while its link is up: a client that restarted authenticates on a new
connection, which then replaces the old one. Unauthenticated connections get no answer, a
deadline and caps (in all and per source address); a connection that has proven its key is
never evicted to make room for them.

Over UDP (`transport udp`) a server (hub or not) has one socket and no connections: a datagram's
first 4 bytes are the receiver's session index (see proto/connection.py, section 6), 0 for a
message 1. A message 1 passes a handshake budget first (`HANDSHAKE_RATE` per second in all and
`HANDSHAKE_RATE_PER_SOURCE` per source address, token buckets; over budget it is dropped and
counted "handshake_ratelimited" before any cryptography), then gets a fresh responder session with
a new random index; if its psk tag does not verify the session is discarded at once (no answer,
no state). A session follows its peer: the source address of the newest datagram that
authenticated (and passed the replay window) becomes the address the session sends to (roaming,
NAT rebinding); a replayed datagram from elsewhere moves nothing. No cookie reply (WireGuard's
under-load mechanism) is implemented: the budget alone bounds the work a flood of message 1s
causes.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING

from vpnd_runtime.io import tcp
from vpnd_runtime.io.udp import UDP_READS, UdpEndpoint, UdpLink
from vpnd_runtime.proto.connection import INDEX_LEN, Connection
from vpnd_runtime.session import Session, new_index, params_from_config

if TYPE_CHECKING:
    from vpnd_runtime.daemon import Daemon

log = logging.getLogger("vpnd")

#: Unauthenticated connections a point-to-point server lets wait at once (oldest evicted).
MAX_PENDING = 8
#: The same for a hub, in all and per source address.
MAX_PENDING_HUB = 256
MAX_PENDING_PER_SOURCE = 16
#: A hub's listen backlog (a thousand clients may arrive at once after the hub restarts).
HUB_BACKLOG = 1024
#: How long a server stops accepting after accept() fails (e.g. out of file descriptors).
ACCEPT_PAUSE = 1.0
#: UDP: message 1s a server examines per second, in all and per source address (token buckets
#: holding one second's worth); the rest are dropped before any cryptography.
HANDSHAKE_RATE = 200.0
HANDSHAKE_RATE_PER_SOURCE = 10.0


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


class Acceptor:
    """Takes new sessions in for the daemon `d` (a server over TCP or UDP)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.listener: socket.socket | None = None
        self.listener_resume: float | None = None  # accept() failed: paused until then
        self.relisten_at: float | None = None  # listening failed after a reload: retry then
        self.udp: UdpEndpoint | None = None
        self.udp_index: dict[int, Session] = {}  # UDP sessions by their index
        self._hs_bucket = _Bucket(HANDSHAKE_RATE, time.monotonic())
        self._hs_sources: dict[str, _Bucket] = {}

    def tick(self, now: float) -> None:
        """Timers: listen again after a failed reload, resume accepting after a pause."""
        if self.relisten_at is not None and now >= self.relisten_at and not self.d.stopping:
            self.relisten(now)
        if self.listener_resume is not None and now >= self.listener_resume and self.listener:
            self.listener_resume = None
            self.d.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)

    def close(self) -> UdpEndpoint | None:
        """Stop accepting. The UDP socket is returned, unwatched but open: the caller closes it
        once the goodbyes of its sessions went out on it."""
        self.relisten_at = None
        if self.listener is not None:
            self.d.unwatch(self.listener)
            self.listener.close()
            self.listener = None
            self.listener_resume = None
        udp, self.udp = self.udp, None
        if udp is not None:
            self.d.unwatch(udp.fileno())
        return udp

    def forget(self, session: Session) -> None:
        """A session on the shared UDP socket ended: drop its index, keep the socket, and stop
        watching for writability once no session waits for it."""
        if self.udp_index.get(session.conn.index) is session:
            del self.udp_index[session.conn.index]
        if session.tx_registered and self.udp is not None:
            session.tx_registered = False
            if not any(s.tx_registered for s in self.d.sessions() if s is not session):
                self.d.rewatch(self.udp.fileno(), selectors.EVENT_READ, self.on_udp_server)

    def open_listener(self) -> None:
        cfg = self.d.config
        tos = tcp.ipopts_to_tos(cfg.ipopts)
        if self.d.is_udp:
            self.udp = UdpEndpoint((cfg.server_host, cfg.server_port), tos)
            self.d.sel.register(self.udp.fileno(), selectors.EVENT_READ, self.on_udp_server)
            self.d.set_top_state()
            log.info(
                "listening on udp %s:%d (gso %s, gro %s)",
                cfg.server_host,
                cfg.server_port,
                "on" if self.udp.gso else "off",
                "on" if self.udp.gro else "off",
            )
            return
        if self.d.hub:
            self.listener = tcp.listen(cfg.server_host, cfg.server_port, tos, HUB_BACKLOG)
        else:
            self.listener = tcp.listen(cfg.server_host, cfg.server_port, tos)
        self.d.sel.register(self.listener, selectors.EVENT_READ, self.on_accept)
        self.d.set_top_state()
        log.info("listening on %s", tcp.endpoint_text(cfg.server_host, cfg.server_port))

    def on_accept(self, mask: int, now: float) -> None:
        if self.listener is None:
            return
        cfg = self.d.config
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds (EMFILE/ENFILE) leaves the listener readable: pause it, don't spin.
                log.warning("accept failed: %s; not accepting for %.0f s", exc, ACCEPT_PAUSE)
                self.d.sel.unregister(self.listener)
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
                self.d.status.drops["refused_client"] = (
                    self.d.status.drops.get("refused_client", 0) + 1
                )
                sock.close()
                continue
            if not self.make_room(addr[0]):
                drops = self.d.status.drops
                drops["handshake_flood"] = drops.get("handshake_flood", 0) + 1
                sock.close()
                continue
            carrier = tcp.TcpCarrier(sock, peer)
            ring = self.d.hub or self.d.peer.next_key is not None  # many keys: pick by key id
            conn = Connection(
                "responder",
                None if ring else self.d.peer.key,
                params_from_config(cfg),
                self.d.rng,
                now,
                replay_guard=self.d.guard(),
                wall=time.time(),
                keyring=self.d.ring if ring else None,
            )
            session = self.d.add_pending(carrier, conn, now)
            session.source = addr[0]
            self.d.file_session(session)
            if not self.d.hub:
                log.info("connection from %s, waiting for its handshake", peer)

    def make_room(self, source: str) -> bool:
        """Room for one more unauthenticated connection from `source`? Evicts the oldest
        unauthenticated one (from that source first) when a cap is reached; a connection that
        has proven its key is never evicted. False when no room can be made."""
        cap = MAX_PENDING_HUB if self.d.hub else MAX_PENDING
        waiting = [s for s in self.d.pending if not s.conn.authenticated]
        if self.d.hub:
            same = [s for s in waiting if s.source == source]
            if len(same) >= MAX_PENDING_PER_SOURCE:
                self.evict(same[0], MAX_PENDING_PER_SOURCE, f"from {source}")
                waiting.remove(same[0])
        if len(self.d.pending) < cap:
            return True
        if not waiting:
            return False
        self.evict(waiting[0], cap, "")
        return True

    def evict(self, session: Session, cap: int, what: str) -> None:
        if not self.d.hub:
            log.warning(
                "%d handshakes waiting: dropping the oldest, from %s", cap, session.carrier.peer
            )
        self.d.status.drops["handshake_evicted"] = (
            self.d.status.drops.get("handshake_evicted", 0) + 1
        )
        self.d.close_session(session)

    def on_udp_server(self, mask: int, now: float) -> None:
        """Selector callback of the server's UDP socket: demultiplex by session index."""
        udp = self.udp
        if udp is None:
            return
        if mask & selectors.EVENT_WRITE and udp.flush():
            for s in self.d.sessions():
                if s.tx_registered:
                    self.d.set_tx_wait(s, False, now)
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
                    self.udp_handshake(source, d[INDEX_LEN:], now)
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
                self.d.run_protocol(
                    session, now, lambda c=conn, m=msgs: c.receive_datagrams(m, now)
                )
                carrier = session.carrier
                if (
                    conn.accepted > before
                    and not session.closed
                    and isinstance(carrier, UdpLink)
                    and carrier.addr != source
                ):
                    self.roam(session, carrier, source)
        if unknown:
            drops = self.d.status.drops
            drops["udp_unknown_index"] = drops.get("udp_unknown_index", 0) + unknown

    def roam(self, session: Session, carrier: UdpLink, source: tuple[str, int]) -> None:
        """An authenticated datagram came from a new address: the peer moved (NAT rebinding,
        a new network); answer there from now on."""
        peer = session.peer
        if peer is not None and not tcp.client_allowed(source, peer.client_host, peer.client_port):
            self.d.status.drops["refused_client"] = self.d.status.drops.get("refused_client", 0) + 1
            return
        old = carrier.peer
        carrier.move(source)
        log.info(
            "%speer moved from %s to %s",
            f"{peer.name}: " if peer is not None and self.d.hub else "",
            old,
            carrier.peer,
        )
        if peer is not None and peer.session is session:
            peer.endpoint = carrier.peer
            if not self.d.hub:
                self.d.status.peer = carrier.peer
            self.d.status.roams += 1
        self.d.status_dirty = True

    def udp_handshake(self, source: tuple[str, int], msg: memoryview, now: float) -> None:
        """A message 1 on the server's socket: budget, then a responder session that survives
        only if the psk tag verified (see the module docstring)."""
        cfg = self.d.config
        drops = self.d.status.drops
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
        if not self.make_room(source[0]):
            drops["handshake_flood"] = drops.get("handshake_flood", 0) + 1
            return
        assert self.udp is not None  # noqa: S101 — a server with a UDP carrier
        index = new_index(self.udp_index)
        conn = Connection(
            "responder",
            None if self.d.hub else self.d.peer.key,
            params_from_config(cfg),
            self.d.rng,
            now,
            replay_guard=self.d.guard(),
            wall=time.time(),
            keyring=self.d.ring if self.d.hub else None,
            index=index,
        )
        session = Session(UdpLink(self.udp, source, owned=False), conn, now)
        session.source = source[0]
        self.d.pending.append(session)
        self.udp_index[index] = session
        self.d.run_protocol(session, now, lambda: conn.receive_datagrams([msg], now))
        if not session.closed and not conn.authenticated:
            self.d.close_session(session)  # no answer, no state: the tag did not verify

    def relisten(self, now: float) -> None:
        """Listen again after a reload; the port can stay busy for a moment (a hook's fork
        holding the old socket until it execs), so retry rather than give up."""
        try:
            self.open_listener()
            self.relisten_at = None
        except OSError as exc:
            self.relisten_at = now + ACCEPT_PAUSE
            self.d.status.set_state("down", f"cannot listen: {exc.strerror or exc}")
            self.d.status_dirty = True
            log.error(
                "cannot listen on %s:%d: %s; retrying",
                self.d.config.server_host,
                self.d.config.server_port,
                exc.strerror or exc,
            )
