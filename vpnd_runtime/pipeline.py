"""The data path: packets from the TUN through the protocol to the carrier, and back.

`Pipeline` is a mixin of `daemon.Daemon`: its methods are the daemon's, kept here so the loop,
the sessions' life cycle and the status (daemon.py) read apart from what each packet goes
through. They use the daemon's state (declared below for type checkers) and call back into its
life cycle (`end_session`, `_session_up`, `file_session`).

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

A lone packet (a ping, an ACK, a keystroke on an idle link) pays for every line of code and every
object it touches at memory latency, not cache latency (issue 15), so its path is kept short:
the loop calls epoll itself (io/poller.py); on a point-to-point TCP link a TUN read with nothing
behind it is sealed by `Connection.send_one` and written at once (`_send_lone`), and a carrier
read holding exactly one data frame is opened by `Connection.receive_packets`, both the general
path's exact result (tests/property/test_lone_path.py) and both declining, unchanged, whatever
they do not handle (handshake, rekey due, PING, partial frames, compression, ...). `_timers` runs
only once the deadline the wait was computed for has passed (at least every other turn), and a
turn that moved packets is followed by one more look at the fds before the next deadline is
worked out: the answer to a ping is queued inside the TUN write that carried the request.

Over UDP (`transport udp`) the same pipelines run on datagrams (acceptor.py says how a server
tells sessions apart). Outbound, TUN super-packets are cut into MSS-sized segments (`gso.split`)
so each datagram holds at most one MTU's worth of packets, and the datagrams of one read leave in
one GSO `sendmsg`; inbound, GRO super-datagrams are cut at the kernel's segment size and the
decrypted segments coalesced (`gso.coalesce`) into super-packets for the TUN.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vpnd_runtime import datapath
from vpnd_runtime.io import gso
from vpnd_runtime.io.poller import EVENT_READ, EVENT_WRITE
from vpnd_runtime.io.tun import READ_SIZE
from vpnd_runtime.io.udp import UdpLink
from vpnd_runtime.linequeue import LineQueue
from vpnd_runtime.proto.errors import ProtocolError, RemoteProtocolError
from vpnd_runtime.proto.events import Closed, KeepaliveRtt, LinkUp, Packets, PeerDead, Rekeyed
from vpnd_runtime.session import Session

if TYPE_CHECKING:
    from vpnd_runtime.config import Config
    from vpnd_runtime.dialer import Dialer
    from vpnd_runtime.io.poller import Poller
    from vpnd_runtime.link import Link
    from vpnd_runtime.peers import Peer, PeerTable
    from vpnd_runtime.status import StatusRecord

log = logging.getLogger("vpnd")

#: Packets read from the TUN per loop turn before sealing them together, and the most bytes
#: (4 GSO super-packets): enough to amortise a turn, little enough to keep a busy daemon small.
TUN_BATCH = 32
TUN_BATCH_BYTES = 256 * 1024

#: A TUN packet this long after the previous TUN read is sent alone without asking the TUN
#: whether more wait (`_on_tun`); packets closer together are read as batches.
LONE_GAP = 0.001


#: A hub client whose carrier stays blocked this long stops pausing the TUN for everyone.
STALL_AFTER = 1.0


class Pipeline:
    """The daemon's data path (a mixin of `daemon.Daemon`; see the module docstring)."""

    if TYPE_CHECKING:  # the daemon's state and life cycle, as this half uses them
        config: Config
        table: PeerTable
        hub: bool
        sel: Poller
        status: StatusRecord
        link: Link
        dialer: Dialer
        lineq: LineQueue | None
        pending: list[Session]
        tun_batch: int
        tun_registered: bool
        _blocked: set[Session]
        _lone: bool
        _tun_at: float

        @property
        def peer(self) -> Peer: ...
        @property
        def active(self) -> Session | None: ...
        @property
        def is_udp(self) -> bool: ...
        def end_session(self, session: Session, reason: str) -> None: ...
        def file_session(self, session: Session) -> None: ...
        def _session_up(self, session: Session, now: float) -> None: ...

    def _reader(self, session: Session) -> Callable[[int, float], None]:
        """The selector callback for a carrier: inbound pipeline, and flushing on writability."""
        carrier = session.carrier

        def on_event(mask: int, now: float) -> None:
            try:
                if mask & EVENT_WRITE and carrier.flush():
                    self.set_tx_wait(session, False, now)
                if not mask & EVENT_READ or session.closed:
                    return
                data = carrier.read()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.end_session(session, f"carrier error: {exc.strerror or exc}")
                return
            if not data:
                reason = (
                    "peer closed the connection"
                    if session.up
                    else "peer closed the connection during the handshake "
                    "(wrong key, or not an allowed client?)"
                )
                self.end_session(session, reason)
                return
            if session.up:
                # The short path: a whole frame of packets (issue 15); None: the general one.
                try:
                    packets = session.conn.receive_packets(data, now)
                except RemoteProtocolError as exc:
                    self.end_session(session, f"peer error: {exc}")
                    return
                if packets is not None:
                    if packets:
                        self._to_tun(session, packets)
                    return
            self.run_protocol(session, now, lambda: session.conn.receive_data(data, now))

        return on_event

    def run_protocol(self, session: Session, now: float, step: Callable[[], Any]) -> None:
        """Run one protocol step, act on its events, and send what it queued."""
        try:
            events = step() or ()
        except RemoteProtocolError as exc:
            self.end_session(
                session,
                f"{'peer error' if session.up else 'handshake failed'}: "
                f"{exc.reason if hasattr(exc, 'reason') else exc}",
            )
            return
        except ProtocolError as exc:
            log.error("internal protocol misuse: %s", exc)
            self.end_session(session, f"internal error: {exc}")
            return
        except OSError as exc:  # randomdev failing during a rekey or handshake
            self.end_session(session, f"local error: {exc.strerror or exc}")
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
                self.dialer.restart_line_handshake(session, now, ev.reason)
                return
            elif type(ev) in (PeerDead, Closed):
                if inbound:
                    self._to_tun(session, inbound)
                    inbound = []
                why = ev.reason if type(ev) is PeerDead else f"peer closed the link: {ev.reason}"
                self.end_session(session, why)
                return
        if inbound:  # one hand-over per carrier read, not per frame: fewer thread wake-ups
            self._to_tun(session, inbound)
        self._send(session, now)
        self.file_session(session)

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
        if isinstance(session.carrier, UdpLink):
            if writer.hdr_len:
                packets = gso.coalesce(packets)  # segments back into super-packets: fewer writes
            writer.put(packets, inline=True)  # see TunWriter.put: the thread starves under UDP
            return
        writer.put(packets)

    def _on_tun(self, mask: int, now: float) -> None:
        tun = self.link.tun
        if tun is None:
            return
        read = os.read
        fd = tun.fd
        if self._lone:
            try:
                packet = read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._tun_lost(f"TUN {tun.name} lost: {exc.strerror or exc}")
                return
            # After a quiet spell a packet is taken to be alone and sent at once: asking the
            # TUN whether more wait (a poll) costs a lone packet ~25 µs on cold caches (issue
            # 15). If more do wait, the loop is back here at once and, no longer after a quiet
            # spell, reads them as a batch.
            quiet = now - self._tun_at >= LONE_GAP
            self._tun_at = now
            if quiet and self._send_lone(packet, now):
                return
            more = tun.readable()
            if not more and not quiet and self._send_lone(packet, now):
                return
            batch = [packet]  # more behind it, or the general path is needed
            total = len(packet)
        else:
            batch = []
            total = 0
            more = True
        for _ in range(self.tun_batch - len(batch) if more else 0):
            if total >= TUN_BATCH_BYTES:
                break
            try:
                packet = read(fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._tun_lost(f"TUN {tun.name} lost: {exc.strerror or exc}")
                return
            batch.append(packet)
            total += len(packet)
            if total >= TUN_BATCH_BYTES or (len(batch) == 1 and not tun.readable()):
                break  # (a lone packet: no failing read, see Tun.readable)
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
        if self.is_udp and hdr:
            # One datagram per MTU: cut TCP super-packets into segments (see io/gso.py).
            split = gso.split
            batch = [seg for p in batch for seg in (split(p) if p[1] else (p,))]
        if not self.hub:
            session = self.active
            if session is not None:
                self.peer.packets_out += len(batch)
                self.peer.bytes_out += sum(map(len, batch)) - len(batch) * hdr
                self.run_protocol(session, now, lambda: session.conn.send_packets(batch, now))
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
            self.run_protocol(
                session, now, lambda s=session, p=packets: s.conn.send_packets(p, now)
            )

    def _send_lone(self, packet: bytes, now: float) -> bool:
        """A point-to-point TCP link's lone packet, the short way: sealed into one frame
        (`Connection.send_one`) and written, with the counters `_on_tun` keeps. False, having
        done nothing, when the general path must take it (no session up, output queued, the
        protocol declines: see send_one)."""
        peer = self.table.peers[0]
        session = peer.session
        if session is None or not session.up or session.tx_registered:
            return False
        frame = session.conn.send_one(packet, now)
        if frame is None:
            return False
        size = len(packet) - self.link.tun.hdr_len  # type: ignore[union-attr]
        status = self.status
        status.packets_out += 1
        status.bytes_out += size
        peer.packets_out += 1
        peer.bytes_out += size
        carrier = session.carrier
        try:
            carrier.write(frame)
        except OSError as exc:
            self.end_session(session, f"carrier error: {exc.strerror or exc}")
            return True
        if carrier.pending:
            self.set_tx_wait(session, True, now)
        return True

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
            self.run_protocol(session, now, lambda b=batch: session.conn.send_packets(b, now))

    def _tun_lost(self, reason: str) -> None:
        """The TUN failed under us: every peer's link goes down (and comes back)."""
        for peer in self.table:
            if peer.session is not None:
                self.end_session(peer.session, reason)

    def flush_out(self, session: Session) -> None:
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
                self.end_session(session, f"carrier error: {exc.strerror or exc}")
                return
            self.set_tx_wait(session, carrier.pending, now)
            return
        data = session.conn.data_to_send()
        try:
            if data:
                carrier.write(data)
            elif carrier.pending:
                carrier.flush()
        except OSError as exc:
            self.end_session(session, f"carrier error: {exc.strerror or exc}")
            return
        self.set_tx_wait(session, carrier.pending, now)

    def set_tx_wait(self, session: Session, waiting: bool, now: float) -> None:
        """Watch the carrier for writability, and pause the TUN, exactly while output is queued."""
        if waiting == session.tx_registered or session.closed:
            return
        session.tx_registered = waiting
        events = EVENT_READ | (EVENT_WRITE if waiting else 0)
        fd = session.carrier.fileno()
        self.sel.modify(fd, events, self.sel.callbacks[fd])  # the same callback, new interest
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
            self.sel.register(tun.fd, EVENT_READ, self._on_tun)
        else:
            self.sel.unregister(tun.fd)
        self.tun_registered = on
