"""A WAN emulator between two network namespaces: delay, jitter, loss, rate, reorder, outage.

Theory of operation
-------------------
The emulator is an L2 wire with impairments. It owns two interfaces, leg A and leg B, in one
namespace (the lab's switch namespace, or a router namespace a test builds) and forwards every
Ethernet frame that arrives on one leg out of the other, after the impairments of that direction:
``up`` is A -> B, ``down`` is B -> A (in the lab: up is clients -> server).

Where the kernel has netem (``tc qdisc add ... netem`` works) the two legs are bridged and a netem
qdisc on each leg's egress does the work (``backend=netem``; chosen by ``backend=auto`` unless the
spec asks for an outage, which netem has no form for). Where it does not -- these machines -- a
small forwarder in this module does it (``backend=forwarder``):

1. *Receive*: one AF_PACKET socket per leg with ``PACKET_VNET_HDR``, so a GSO super-packet (up to
   64 KiB of TCP or UDP segments a veth hands over unsegmented) arrives in one ``recv`` with its
   virtio-net header; ``PACKET_IGNORE_OUTGOING`` hides the frames we send ourselves.
2. *Admit* (:class:`Pipe`, pure, no I/O): an outage drops everything; loss is drawn per *segment*
   (a super-packet of n segments loses each with the set probability; the survivors are re-cut
   into smaller super-packets by :func:`split_gso`, so loss is per wire packet as on a real WAN);
   the rate limit is a serialising link (``busy_until``) with a byte queue limit (tail drop);
   delay plus jitter gives the delivery time, kept in order (jitter never reorders); ``reorder``
   lets a packet skip the delay so it overtakes the queue (netem's meaning).
3. *Deliver*: a timer heap keyed by delivery time; the loop sleeps in ``epoll`` until the next
   packet is due, then sends it with ``PACKET_QDISC_BYPASS`` on the other leg.
4. *Count*: every drop and delay is counted per direction; the counters are written as JSON to a
   stats file twice a second (readable while it runs) and printed on exit (SIGTERM/SIGINT).

All randomness comes from one ``random.Random(seed)``, so a run is reproducible given the same
packet arrivals. The spec grammar is in :func:`parse_spec`; ``python -m vpnctl.wan`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import json
import math
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# --------------------------------------------------------------------------------------------
# The spec


class WanSpecError(ValueError):
    """A WAN spec could not be parsed; the message names the field and what is wrong with it."""


@dataclass(frozen=True)
class Impairment:
    """What one direction of the WAN does to packets. Times in seconds, rates in bit/s."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0  # probability per packet (per segment of a super-packet)
    rate: float = 0.0  # bit/s; 0 = unlimited
    limit: int = 0  # queue limit in bytes when rate is set; 0 = derived (see queue_limit)
    reorder: float = 0.0  # probability that a packet skips the delay
    outage: tuple[float, float] | None = None  # (duration, start after emulator start)

    def queue_limit(self) -> int:
        """The byte queue in front of the rate limit: `limit`, or 100 ms at the rate (>= 64 KiB)."""
        if self.limit:
            return self.limit
        return max(65536 * 2, int(self.rate / 8 * 0.1))

    def describe(self) -> str:
        """The impairment in spec syntax (only the fields that are set)."""
        parts = []
        if self.delay:
            parts.append(f"delay={_fmt_time(self.delay)}")
        if self.jitter:
            parts.append(f"jitter={_fmt_time(self.jitter)}")
        if self.loss:
            parts.append(f"loss={self.loss * 100:g}%")
        if self.rate:
            parts.append(f"rate={_fmt_rate(self.rate)}")
        if self.limit:
            parts.append(f"limit={self.limit}b")
        if self.reorder:
            parts.append(f"reorder={self.reorder * 100:g}%")
        if self.outage:
            parts.append(f"outage={_fmt_time(self.outage[0])}@{_fmt_time(self.outage[1])}")
        return ",".join(parts) or "none"


BACKENDS = ("auto", "forwarder", "netem")


@dataclass(frozen=True)
class WanSpec:
    """Both directions of the WAN, the RNG seed and the backend choice."""

    up: Impairment = field(default_factory=Impairment)
    down: Impairment = field(default_factory=Impairment)
    seed: int = 1
    backend: str = "auto"

    def describe(self) -> str:
        """A one-line human summary of the spec."""
        if self.up == self.down:
            return f"both ways {self.up.describe()}"
        return f"up {self.up.describe()}; down {self.down.describe()}"


_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024 * 1024}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_FIELDS = ("delay", "jitter", "loss", "rate", "limit", "reorder", "outage")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1 and seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"


def _fmt_rate(bits: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


def _with_unit(token: str, value: str, units: dict[str, float], what: str) -> float:
    match = re.fullmatch(_NUM + r"([a-z]*)", value.strip().lower())
    if not match:
        raise WanSpecError(f"wan spec field {token!r}: {value!r} is not a {what}")
    number, unit = match.groups()
    if unit not in units:
        known = ", ".join(units)
        raise WanSpecError(
            f"wan spec field {token!r}: {what} needs a unit ({known}), got {unit or 'none'!r}"
        )
    return float(number) * units[unit]


def parse_time(token: str, value: str) -> float:
    """'20ms', '1.5s', '500us' -> seconds; WanSpecError naming `token` otherwise."""
    return _with_unit(token, value, _TIME_UNITS, "time")


def parse_percent(token: str, value: str) -> float:
    """'1%', '0.1%' -> a probability in [0, 1]."""
    match = re.fullmatch(_NUM + "%", value.strip())
    if not match:
        raise WanSpecError(f"wan spec field {token!r}: {value!r} is not a percentage like 1%")
    pct = float(match.group(1))
    if pct > 100:
        raise WanSpecError(f"wan spec field {token!r}: {value} is more than 100%")
    return pct / 100


def parse_spec(text: str) -> WanSpec:
    """Parse a WAN spec: comma-separated ``field=value`` items.

    Fields: ``delay`` (one-way, e.g. 10ms), ``jitter`` (uniform +-, never reorders), ``loss`` (1%),
    ``rate`` (100mbit; bit/kbit/mbit/gbit), ``limit`` (queue bytes before the rate limit, 256kb),
    ``reorder`` (1%: that share of packets skips the delay and overtakes; needs a delay),
    ``outage`` (``2s@5s``: everything dropped for 2 s starting 5 s after the emulator starts).
    A field applies to both directions unless prefixed ``up.`` (A -> B; in the lab clients ->
    server) or ``down.`` (B -> A); a prefixed field overrides the plain one whatever the order.
    Global: ``seed=N`` (the RNG seed, default 1), ``backend=auto|forwarder|netem``.
    Example: ``delay=10ms,jitter=2ms,loss=1%,up.rate=50mbit,down.rate=200mbit,outage=2s@5s``.
    """
    both: dict[str, object] = {}
    per: dict[str, dict[str, object]] = {"up": {}, "down": {}}
    seed, backend = 1, "auto"
    seen: set[str] = set()
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            if text.strip():
                raise WanSpecError(f"wan spec {text!r}: empty item (two commas or a trailing one)")
            continue
        if "=" not in token:
            raise WanSpecError(f"wan spec field {token!r}: expected field=value")
        key, value = (part.strip() for part in token.split("=", 1))
        key = key.lower()
        if key in seen:
            raise WanSpecError(f"wan spec field {token!r}: {key} is given twice")
        seen.add(key)
        if key == "seed":
            if not value.isdigit():
                raise WanSpecError(f"wan spec field {token!r}: seed must be a whole number")
            seed = int(value)
            continue
        if key == "backend":
            if value not in BACKENDS:
                raise WanSpecError(f"wan spec field {token!r}: backend is one of {BACKENDS}")
            backend = value
            continue
        direction, _, name = key.rpartition(".")
        if direction not in ("", "up", "down"):
            raise WanSpecError(
                f"wan spec field {token!r}: prefix {direction!r} is not up. or down."
            )
        if name not in _FIELDS:
            raise WanSpecError(
                f"wan spec field {token!r}: unknown field {name!r} "
                f"(known: {', '.join(_FIELDS)}, seed, backend)"
            )
        parsed = _parse_field(token, name, value)
        (per[direction] if direction else both)[name] = parsed
    up = _impairment(Impairment(), both, per["up"], "up")
    down = _impairment(Impairment(), both, per["down"], "down")
    return WanSpec(up=up, down=down, seed=seed, backend=backend)


def _parse_field(token: str, name: str, value: str) -> object:
    if name in ("delay", "jitter"):
        return parse_time(token, value)
    if name in ("loss", "reorder"):
        return parse_percent(token, value)
    if name == "rate":
        rate = _with_unit(token, value, _RATE_UNITS, "rate")
        if rate <= 0:
            raise WanSpecError(f"wan spec field {token!r}: a rate must be above 0")
        return rate
    if name == "limit":
        limit = int(_with_unit(token, value, {k: float(v) for k, v in _SIZE_UNITS.items()}, "size"))
        if limit < 1514:
            raise WanSpecError(f"wan spec field {token!r}: a queue limit below 1514 bytes")
        return limit
    # outage: DURATION@START
    if "@" not in value:
        raise WanSpecError(f"wan spec field {token!r}: outage is DURATION@START, e.g. 2s@5s")
    duration, start = value.split("@", 1)
    length = parse_time(token, duration)
    if length <= 0:
        raise WanSpecError(f"wan spec field {token!r}: an outage must last longer than 0")
    return (length, parse_time(token, start))


def _impairment(
    base: Impairment, both: dict[str, object], own: dict[str, object], direction: str
) -> Impairment:
    merged = {**both, **own}
    imp = replace(base, **merged)  # type: ignore[arg-type]
    if imp.reorder and not imp.delay:
        raise WanSpecError(
            f"wan spec field 'reorder' ({direction}): needs a delay above 0 "
            "(a reordered packet skips the delay to overtake the others)"
        )
    if imp.jitter > 0 and imp.jitter > 10 * max(imp.delay, 1e-3):
        raise WanSpecError(
            f"wan spec field 'jitter' ({direction}): {_fmt_time(imp.jitter)} is more than ten "
            f"times the delay {_fmt_time(imp.delay)}"
        )
    if imp.limit and not imp.rate:
        raise WanSpecError(f"wan spec field 'limit' ({direction}): only means something with rate=")
    return imp


# --------------------------------------------------------------------------------------------
# The pure core: what happens to one packet in one direction


@dataclass
class DirectionStats:
    """Counters of one direction (all in wire packets unless the name says otherwise)."""

    received: int = 0  # frames read from the leg (a super-packet counts once)
    segments: int = 0  # wire packets those frames carry
    forwarded: int = 0  # wire packets sent on
    bytes_forwarded: int = 0
    dropped_loss: int = 0
    dropped_outage: int = 0
    dropped_queue: int = 0  # rate limit queue full (tail drop)
    dropped_error: int = 0  # send failed or frame unparsable for a split
    reordered: int = 0  # frames that skipped the delay
    split: int = 0  # super-packets re-cut because some of their segments were lost
    admitted: int = 0  # frames (or their surviving parts) given a delivery time
    delay_total: float = 0.0  # seconds of delay added, summed over admitted frames
    delay_max: float = 0.0
    queue_max_bytes: int = 0


@dataclass(frozen=True)
class Verdict:
    """What to do with one arriving frame: drop all, or deliver the kept segments at a time."""

    deliver_at: float | None  # None: nothing of it survives
    keep: list[bool] | None  # per segment; None = all kept


class Pipe:
    """One direction of the WAN as a pure function of (arrival time, size, segment count).

    Time and randomness come in from the caller (`now`, `rng`), so it is tested without I/O.
    """

    def __init__(self, imp: Impairment, rng: random.Random, start: float) -> None:
        self.imp = imp
        self.rng = rng
        self.start = start
        self.stats = DirectionStats()
        self._busy_until = start  # when the rate-limited link finishes the last admitted byte
        self._last_delivery = start  # in-order delivery: nothing overtakes except reorder

    def admit(self, now: float, wire_bytes: int, segments: int) -> Verdict:
        """Decide the fate of a frame of `segments` wire packets totalling `wire_bytes`."""
        imp, st = self.imp, self.stats
        st.received += 1
        st.segments += segments
        if imp.outage:
            length, at = imp.outage
            if self.start + at <= now < self.start + at + length:
                st.dropped_outage += segments
                return Verdict(None, None)
        keep: list[bool] | None = None
        if imp.loss:
            keep = [self.rng.random() >= imp.loss for _ in range(segments)]
            kept = sum(keep)
            st.dropped_loss += segments - kept
            if kept == 0:
                return Verdict(None, None)
            if kept == segments:
                keep = None
            else:
                wire_bytes = wire_bytes * kept // segments
        departure = now
        if imp.rate:
            backlog = max(0.0, self._busy_until - now) * imp.rate / 8
            if backlog + wire_bytes > imp.queue_limit() + 0.5:  # + float rounding
                st.dropped_queue += segments if keep is None else sum(keep)
                return Verdict(None, None)
            st.queue_max_bytes = max(st.queue_max_bytes, int(backlog + wire_bytes))
            self._busy_until = max(now, self._busy_until) + wire_bytes * 8 / imp.rate
            departure = self._busy_until
        if imp.reorder and self.rng.random() < imp.reorder:
            st.reordered += 1
            deliver = departure
        else:
            delay = imp.delay
            if imp.jitter:
                delay = max(0.0, delay + self.rng.uniform(-imp.jitter, imp.jitter))
            deliver = max(departure + delay, self._last_delivery)
            self._last_delivery = deliver
        added = deliver - now
        st.admitted += 1
        st.delay_total += added
        st.delay_max = max(st.delay_max, added)
        return Verdict(deliver, keep)


# --------------------------------------------------------------------------------------------
# GSO super-packets: how many segments, and re-cutting one when some segments are lost

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = VNET_HDR.size
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 3, 4, 5
GSO_ECN = 0x80
ETH_LEN = 14


def _l4_header_len(frame: bytes, gso_type: int, l4: int) -> int:
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return (frame[l4 + 12] >> 4) * 4
    return 8


def segment_count(packet: bytes) -> tuple[int, int]:
    """(wire packets, wire bytes) of a frame as received with its virtio-net header."""
    _flags, gso_type, _hl, gso_size, csum_start, _co = VNET_HDR.unpack_from(packet)
    frame_len = len(packet) - VNET_LEN
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE or not gso_size:
        return 1, frame_len
    try:
        hdr = csum_start + _l4_header_len(packet[VNET_LEN:], kind, csum_start)
    except IndexError:
        return 1, frame_len
    payload = frame_len - hdr
    if payload <= 0:
        return 1, frame_len
    n = math.ceil(payload / gso_size)
    return n, frame_len + (n - 1) * hdr


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _pseudo_sum(frame: bytes, l4_len: int, proto: int) -> int:
    """The (not complemented) pseudo-header checksum a CHECKSUM_PARTIAL L4 header holds."""
    version = frame[ETH_LEN] >> 4
    if version == 4:
        addrs = frame[ETH_LEN + 12 : ETH_LEN + 20]
        return _fold(_sum16(addrs) + proto + l4_len)
    addrs = frame[ETH_LEN + 8 : ETH_LEN + 40]
    return _fold(_sum16(addrs) + (l4_len >> 16) + (l4_len & 0xFFFF) + proto)


def split_gso(packet: bytes, keep: list[bool]) -> list[bytes]:
    """Re-cut a GSO super-packet (virtio-net header + frame) into packets carrying only the
    segments marked kept: each run of consecutive kept segments becomes one packet (a smaller
    super-packet, or a plain packet for a single segment) with its IP length/ID, TCP sequence
    and flags or UDP length, and pseudo-header checksum fixed. Raises ValueError when the frame
    is not a TCP/UDP GSO packet it understands."""
    flags, gso_type, _hl, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(packet)
    kind = gso_type & ~GSO_ECN
    frame = packet[VNET_LEN:]
    if kind not in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4) or not flags & F_NEEDS_CSUM:
        raise ValueError(f"cannot split gso_type {gso_type} flags {flags}")
    version = frame[ETH_LEN] >> 4
    l4 = csum_start
    hdr_len = l4 + _l4_header_len(frame, kind, l4)
    payload = frame[hdr_len:]
    tcp = kind in (GSO_TCPV4, GSO_TCPV6)
    proto = 6 if tcp else 17
    runs: list[tuple[int, int]] = []  # [first, last] segment indices
    for idx, kept in enumerate(keep):
        if kept and runs and runs[-1][1] == idx - 1:
            runs[-1] = (runs[-1][0], idx)
        elif kept:
            runs.append((idx, idx))
    out = []
    nseg = len(keep)
    for first, last in runs:
        chunk = payload[first * gso_size : (last + 1) * gso_size]
        head = bytearray(frame[:hdr_len])
        l4_len = hdr_len - l4 + len(chunk)
        if version == 4:
            ihl = (head[ETH_LEN] & 0x0F) * 4
            struct.pack_into("!H", head, ETH_LEN + 2, l4 - ETH_LEN + l4_len)
            ip_id = struct.unpack_from("!H", head, ETH_LEN + 4)[0]
            struct.pack_into("!H", head, ETH_LEN + 4, (ip_id + first) & 0xFFFF)
            struct.pack_into("!H", head, ETH_LEN + 10, 0)
            csum = ~_fold(_sum16(bytes(head[ETH_LEN : ETH_LEN + ihl]))) & 0xFFFF
            struct.pack_into("!H", head, ETH_LEN + 10, csum)
        else:
            struct.pack_into("!H", head, ETH_LEN + 4, l4 - ETH_LEN - 40 + l4_len)
        if tcp:
            seq = struct.unpack_from("!I", head, l4 + 4)[0]
            struct.pack_into("!I", head, l4 + 4, (seq + first * gso_size) & 0xFFFFFFFF)
            if last != nseg - 1:
                head[l4 + 13] &= ~0x09 & 0xFF  # FIN and PSH only on the last segment
            if first != 0:
                head[l4 + 13] &= ~0x80 & 0xFF  # CWR only on the first
        else:
            struct.pack_into("!H", head, l4 + 4, l4_len)
        struct.pack_into("!H", head, csum_start + csum_offset, _pseudo_sum(frame, l4_len, proto))
        single = first == last
        vnet = VNET_HDR.pack(
            flags,
            GSO_NONE if single else gso_type,
            hdr_len,
            0 if single else gso_size,
            csum_start,
            csum_offset,
        )
        out.append(vnet + bytes(head) + chunk)
    return out


# --------------------------------------------------------------------------------------------
# The forwarder: two AF_PACKET legs, a timer heap

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
RECV_BUF = 256 * 1024
SOCK_BUF = 16 * 1024 * 1024
STATS_INTERVAL = 0.5
DRAIN_BATCH = 128
# The forwarder runs SCHED_FIFO at this (low) real-time priority when it may: on a loaded machine
# a normal process wakes up to tens of ms late and the delay it adds becomes noise (measured here
# at load 10 on 2 cores: ping through delay=20ms read 40-136 ms normal, 40.4 +- 0.5 ms FIFO). The
# kernel's RT throttling (sched_rt_runtime_us) still leaves the rest of the machine 5 %.
RT_PRIORITY = 10
EARLY = 0.0005  # a packet due within this many seconds goes now (centres the ms rounding)
HOLD_MAX = 128 * 1024 * 1024  # bytes held in the timer heap at most (both directions)


def open_leg(ifname: str) -> socket.socket:
    """An AF_PACKET socket on `ifname` that sees GSO super-packets whole (virtio-net header),
    ignores what it sends itself and sends past the qdisc."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


class Forwarder:
    """Forward frames between leg A and leg B through one :class:`Pipe` per direction."""

    def __init__(
        self, leg_a: str, leg_b: str, spec: WanSpec, stats_path: Path | None = None
    ) -> None:
        self.spec = spec
        self.names = (leg_a, leg_b)
        self.socks = (open_leg(leg_a), open_leg(leg_b))
        self.start = time.monotonic()
        rng = random.Random(spec.seed)  # noqa: S311 - emulation, not secrecy
        self.pipes = (Pipe(spec.up, rng, self.start), Pipe(spec.down, rng, self.start))
        self.heap: list[tuple[float, int, int, bytes]] = []  # (due, seq, out leg, packet)
        self.seq = 0
        self.held_bytes = 0
        self.stats_path = stats_path
        self.running = True
        self.poller = select.epoll()
        self._fd_leg = {sock.fileno(): idx for idx, sock in enumerate(self.socks)}
        for sock in self.socks:
            self.poller.register(sock.fileno(), select.EPOLLIN)
        # a signal wakes the loop at once (its handler only sets `running`)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.poller.register(self._wake_r, select.EPOLLIN)

    def stats(self) -> dict[str, object]:
        """The counters of both directions, plus the spec and uptime, as a JSON-able dict."""
        out: dict[str, object] = {
            "pid": os.getpid(),
            "legs": {"a": self.names[0], "b": self.names[1]},
            "spec": self.spec.describe(),
            "uptime": round(time.monotonic() - self.start, 3),
            "queued": len(self.heap),
            "queued_bytes": self.held_bytes,
        }
        for name, pipe in zip(("up", "down"), self.pipes, strict=True):
            st = asdict(pipe.stats)
            admitted = max(1, pipe.stats.admitted)
            st["delay_avg_ms"] = round(pipe.stats.delay_total / admitted * 1000, 3)
            st["delay_max_ms"] = round(st.pop("delay_max") * 1000, 3)
            st.pop("delay_total")
            out[name] = st
        return out

    def write_stats(self) -> None:
        """Atomically replace the stats file (readers never see half a file)."""
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.stats(), indent=1) + "\n")
        os.replace(tmp, self.stats_path)

    def stop(self, *_args: object) -> None:
        """Signal handler: finish the current loop turn and exit."""
        self.running = False

    def _receive(self, leg: int, buf: bytearray, view: memoryview) -> None:
        sock = self.socks[leg]
        pipe = self.pipes[leg]  # arriving on A goes up (A -> B), on B goes down
        out = 1 - leg
        for _ in range(DRAIN_BATCH):
            try:
                n, addr = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENXIO):
                    return
                raise
            if len(addr) > 2 and addr[2] == PACKET_OUTGOING:
                continue  # kernels without PACKET_IGNORE_OUTGOING
            if n <= VNET_LEN or n >= len(buf):
                pipe.stats.dropped_error += 1
                continue
            packet = bytes(view[:n])
            segments, wire = segment_count(packet)
            now = time.monotonic()
            verdict = pipe.admit(now, wire, segments)
            if verdict.deliver_at is None:
                continue
            if verdict.keep is None:
                self._push(verdict.deliver_at, out, packet)
                continue
            try:
                parts = split_gso(packet, verdict.keep)
            except (ValueError, IndexError, struct.error):
                pipe.stats.dropped_error += sum(verdict.keep)
                continue
            pipe.stats.split += 1
            for part in parts:
                self._push(verdict.deliver_at, out, part)

    def _push(self, due: float, out: int, packet: bytes) -> None:
        if self.held_bytes + len(packet) > HOLD_MAX:  # a memory bound, not a WAN property
            self.pipes[1 - out].stats.dropped_queue += segment_count(packet)[0]
            return
        self.held_bytes += len(packet)
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, out, packet))

    def _deliver(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            _due, _seq, out, packet = heapq.heappop(heap)
            self.held_bytes -= len(packet)
            pipe = self.pipes[1 - out]
            try:
                self.socks[out].send(packet)
            except OSError:
                pipe.stats.dropped_error += 1
                continue
            segments, wire = segment_count(packet)
            pipe.stats.forwarded += segments
            pipe.stats.bytes_forwarded += wire

    def run(self) -> None:
        """The loop: sleep until a leg is readable or the next packet is due; repeat."""
        buf = bytearray(RECV_BUF)
        view = memoryview(buf)
        next_stats = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now >= next_stats:
                self.write_stats()
                next_stats = now + STATS_INTERVAL
            wake = next_stats
            if self.heap:
                wake = min(wake, self.heap[0][0])
            try:  # epoll rounds a timeout up to whole ms: aim half a ms early, send on time
                events = self.poller.poll(max(0.0, wake - now - EARLY))
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 512)
                    continue
                self._receive(self._fd_leg[fd], buf, view)
            self._deliver(time.monotonic() + EARLY)
        self.write_stats()

    def close(self) -> None:
        """Release the sockets and the poller."""
        self.poller.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for sock in self.socks:
            sock.close()


# --------------------------------------------------------------------------------------------
# Running it: in a namespace, from the lab, the tests and the benchmarks


class WanError(RuntimeError):
    """The emulator could not be started or stopped; the message says which step and why."""


def _sh(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        raise WanError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netem_available(namespace: str, ifname: str) -> bool:
    """True when a netem qdisc can be put on `ifname` in `namespace` (tried, then removed)."""
    ns = ["ip", "netns", "exec", namespace]
    proc = _sh([*ns, "tc", "qdisc", "add", "dev", ifname, "root", "netem", "delay", "0ms"],
               check=False)  # fmt: skip
    if proc.returncode != 0:
        return False
    _sh([*ns, "tc", "qdisc", "del", "dev", ifname, "root"], check=False)
    return True


def netem_args(imp: Impairment) -> list[str]:
    """The `tc ... netem` arguments for one direction (the netem backend). netem has no outage
    and counts its queue in packets: `limit` (bytes) is not passed on, a 100,000-packet queue is."""
    args = ["limit", "100000"]
    if imp.delay or imp.jitter:
        args += ["delay", f"{imp.delay * 1e6:.0f}us"]
        if imp.jitter:
            args += [f"{imp.jitter * 1e6:.0f}us"]
    if imp.loss:
        args += ["loss", f"{imp.loss * 100:g}%"]
    if imp.reorder:
        args += ["reorder", f"{imp.reorder * 100:g}%"]
    if imp.rate:
        args += ["rate", f"{imp.rate:.0f}bit"]
    return args


def choose_backend(spec: WanSpec, namespace: str, leg: str) -> str:
    """'netem' or 'forwarder' for this spec on this kernel (WanError when netem is asked for
    but missing, or cannot express the spec)."""
    has_outage = bool(spec.up.outage or spec.down.outage)
    if spec.backend == "forwarder":
        return "forwarder"
    if spec.backend == "netem":
        if has_outage:
            raise WanError("backend=netem has no outage; use backend=forwarder or auto")
        if not netem_available(namespace, leg):
            raise WanError("backend=netem: this kernel refuses `tc qdisc ... netem`")
        return "netem"
    if not has_outage and netem_available(namespace, leg):
        return "netem"
    return "forwarder"


@dataclass
class WanProcess:
    """An emulator between two legs of a namespace: a forwarder process, or netem qdiscs."""

    namespace: str
    leg_a: str
    leg_b: str
    spec: WanSpec
    backend: str
    stats_path: Path
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def stats(self) -> dict[str, object]:
        """The live counters (forwarder: its stats file; netem: `tc -s qdisc`)."""
        if self.backend == "netem":
            out: dict[str, object] = {"backend": "netem"}
            for name, leg in (("up", self.leg_b), ("down", self.leg_a)):
                proc = _sh(["ip", "netns", "exec", self.namespace, "tc", "-s", "-j", "qdisc",
                            "show", "dev", leg], check=False)  # fmt: skip
                out[name] = json.loads(proc.stdout or "[]")
            return out
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self, timeout: float = 5.0) -> dict[str, object]:
        """Stop the emulator (forwarder: SIGTERM to its PID, then SIGKILL); return final stats."""
        if self.backend == "netem":
            final = self.stats()
            for leg in (self.leg_a, self.leg_b):
                _sh(["ip", "netns", "exec", self.namespace, "tc", "qdisc", "del", "dev", leg,
                     "root"], check=False)  # fmt: skip
            return final
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.stats()


def prepare_legs(namespace: str, *legs: str) -> None:
    """Make `legs` pure wire ends: up, no IPv6 (no ND/RS of the namespace's own), no bridge."""
    ns = ["ip", "netns", "exec", namespace]
    for leg in legs:
        _sh([*ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{leg}.disable_ipv6=1"], check=False)
        _sh([*ns, "ip", "link", "set", leg, "up"])


def start_wan(
    namespace: str,
    leg_a: str,
    leg_b: str,
    spec: WanSpec | str,
    stats_path: Path,
    *,
    log_path: Path | None = None,
    ready_timeout: float = 10.0,
) -> WanProcess:
    """Start the emulator between `leg_a` and `leg_b` (interfaces of `namespace`, not bridged).

    The forwarder runs as ``python -m vpnctl.wan run`` inside the namespace, its own session
    (so a Ctrl-C in the operator's terminal does not reach it), output in `log_path`; returns
    once its first stats file exists (it has bound both legs)."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    prepare_legs(namespace, leg_a, leg_b)
    backend = choose_backend(spec, namespace, leg_a)
    wan = WanProcess(namespace, leg_a, leg_b, spec, backend, stats_path)
    ns = ["ip", "netns", "exec", namespace]
    if backend == "netem":
        _sh([*ns, "ip", "link", "add", "wanbr", "type", "bridge"])
        for leg in (leg_a, leg_b):
            _sh([*ns, "ip", "link", "set", leg, "master", "wanbr"])
        _sh([*ns, "ip", "link", "set", "wanbr", "up"])
        for leg, imp in ((leg_b, spec.up), (leg_a, spec.down)):
            _sh([*ns, "tc", "qdisc", "add", "dev", leg, "root", "netem", *netem_args(imp)])
        return wan
    stats_path.unlink(missing_ok=True)
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    with log:
        wan.proc = subprocess.Popen(
            [
                *ns,
                sys.executable,
                "-m",
                "vpnctl.wan",
                "run",
                "--a",
                leg_a,
                "--b",
                leg_b,
                "--stats",
                str(stats_path),
                format_spec(spec),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    wan.pid = wan.proc.pid
    deadline = time.monotonic() + ready_timeout
    while not stats_path.exists():
        if wan.proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-500:] if log_path else ""
            raise WanError(f"the WAN emulator exited ({wan.proc.returncode}) at start: {tail}")
        if time.monotonic() > deadline:
            wan.stop()
            raise WanError(f"the WAN emulator did not start within {ready_timeout}s")
        time.sleep(0.02)
    return wan


def format_spec(spec: WanSpec) -> str:
    """A spec string that parses back to `spec` (used to hand a spec to the child process)."""
    items = [f"seed={spec.seed}", f"backend={spec.backend}"]
    for name, imp in (("up", spec.up), ("down", spec.down)):
        desc = imp.describe()
        if desc != "none":
            items += [f"{name}.{item}" for item in desc.split(",")]
    return ",".join(items)


@contextlib.contextmanager
def running_wan(
    namespace: str,
    leg_a: str,
    leg_b: str,
    spec: WanSpec | str,
    stats_path: Path,
    *,
    log_path: Path | None = None,
) -> Iterator[WanProcess]:
    """The emulator for the duration of a `with` block; stopped (by PID) however it ends."""
    wan = start_wan(namespace, leg_a, leg_b, spec, stats_path, log_path=log_path)
    try:
        yield wan
    finally:
        wan.stop()


# --------------------------------------------------------------------------------------------
# python -m vpnctl.wan


def main(argv: list[str] | None = None) -> int:
    """`python -m vpnctl.wan run --a IF --b IF [--stats FILE] SPEC` or `check SPEC`."""
    parser = argparse.ArgumentParser(
        prog="python -m vpnctl.wan",
        description="WAN emulator between two interfaces of this namespace (needs root).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="forward between two legs with impairments (foreground)")
    run.add_argument("--a", required=True, help="leg A (up = A -> B)")
    run.add_argument("--b", required=True, help="leg B (down = B -> A)")
    run.add_argument("--stats", type=Path, help="JSON stats file, rewritten twice a second")
    run.add_argument(
        "--rt-priority",
        type=int,
        default=RT_PRIORITY,
        help=f"SCHED_FIFO priority (default {RT_PRIORITY}; 0 = normal scheduling)",
    )
    run.add_argument("spec", help="e.g. delay=10ms,loss=1%%,up.rate=100mbit (see docs)")
    check = sub.add_parser("check", help="parse a spec and print what it means")
    check.add_argument("spec")
    args = parser.parse_args(argv)
    try:
        spec = parse_spec(args.spec)
    except WanSpecError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.command == "check":
        print(spec.describe())
        return 0
    try:
        fwd = Forwarder(args.a, args.b, spec, args.stats)
    except OSError as exc:
        print(f"wan: cannot open legs {args.a}/{args.b}: {exc}", file=sys.stderr)
        return 1
    if args.rt_priority:
        try:  # delay accuracy under load: see RT_PRIORITY
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))
        except OSError as exc:
            print(f"wan: normal scheduling (SCHED_FIFO refused: {exc})", flush=True)
    signal.set_wakeup_fd(fwd._wake_w)
    signal.signal(signal.SIGTERM, fwd.stop)
    signal.signal(signal.SIGINT, fwd.stop)
    print(f"wan: forwarding {args.a} <-> {args.b}: {spec.describe()}", flush=True)
    try:
        fwd.run()
    finally:
        print("wan: final " + json.dumps(fwd.stats()), flush=True)
        fwd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
