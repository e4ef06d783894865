"""Where a lone ping's time goes inside a vpnd pair, without changing the daemon.

    python -m bench.latency_probe [--pings 300] [--cipher chacha20-poly1305] [--pinned]

Theory of operation: both daemons of a link between two namespaces are started through this
module (`--daemon TRACE -f CONF`), which wraps, before the daemon starts, the functions a packet
passes through: the daemon's epoll wait (io/poller.py; a wake-up with ready fds), the TUN read
(os.read on the TUN fd), Connection.send_packets or send_one (seal), TcpCarrier.write (the carrier
send), TcpCarrier.read, Connection.receive_data or receive_packets (unframe + open),
TunWriter.put (the hand-off) and the writer thread's queue wake-up and os.write to the TUN.
Each wrapper appends (perf_counter_ns, event) to a list that is written to TRACE when the daemon
exits; daemon.py itself is not touched. CLOCK_MONOTONIC is shared by every process on the
machine, so the two traces merge into one timeline.

The driver then pings the server's tunnel address from the client namespace (`--pings`, 10 ms
apart), stops the daemons, and for every ping finds the expected chain of events, client then
server then client again::

    C wake -> C tun_read -> C seal -> C carrier_write -> S wake -> S carrier_read -> S open
    -> S put -> S writer_wake -> S tun_write -> (kernel answers) S wake -> S tun_read -> S seal
    -> S carrier_write -> C wake -> C carrier_read -> C open -> C put -> C writer_wake
    -> C tun_write

and prints the median and p90 of each step in µs, and the share of the chain. A wrapper costs
about 0.2 µs (printed as `probe cost`), so the chain is slightly longer than the daemon alone.
Needs root, iproute2 and ping.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_tunnel import CLIENT_TUN, SERVER_TUN, cpu_seconds, pin
from tests.helpers.netns import VpndProcess, namespace_pair, new_tag, poll_until
from vpnd_runtime import link
from vpnd_runtime.cli import main as vpnd_main
from vpnd_runtime.io import poller, tcp, tun
from vpnd_runtime.keyfile import generate_key
from vpnd_runtime.proto.connection import Connection

#: The chain of events one ping makes, in order; a far end's selector wake-up may come before the
#: sender's send() returns (the kernel delivers in the sender's syscall), so the chain measures
#: from the start of a write to the far wake-up, and the write syscalls are shown beside it.
CHAIN = [
    ("C", "wake"), ("C", "tun_read"), ("C", "seal0"), ("C", "seal1"), ("C", "cwrite0"),
    ("S", "wake"), ("S", "cread"), ("S", "open0"), ("S", "open1"), ("S", "put"),
    ("S", "writer_wake"), ("S", "twrite0"), ("S", "wake"), ("S", "tun_read"), ("S", "seal0"),
    ("S", "seal1"), ("S", "cwrite0"), ("C", "wake"), ("C", "cread"), ("C", "open0"),
    ("C", "open1"), ("C", "put"), ("C", "writer_wake"), ("C", "twrite0"), ("C", "twrite1"),
]  # fmt: skip
#: Syscalls that overlap the chain: (side, start event) -> end event.
OVERLAPS = {("C", "cwrite0"): "cwrite1", ("S", "twrite0"): "twrite1", ("S", "cwrite0"): "cwrite1"}

STEP_NAMES = {
    "wake>tun_read": "selector wake -> TUN read done",
    "tun_read>seal0": "TUN read -> seal starts",
    "seal0>seal1": "seal (send_packets)",
    "seal1>cwrite0": "seal -> carrier write starts",
    "cwrite0>wake": "carrier send -> far end's selector wake-up",
    "wake>cread": "selector wake -> carrier read done",
    "cread>open0": "carrier read -> open starts",
    "open0>open1": "open (receive_data: unframe, decrypt)",
    "open1>put": "open -> hand-off to the TUN writer",
    "put>writer_wake": "hand-off: writer thread wake-up (queue + GIL), ~0 when written inline",
    "writer_wake>twrite0": "writer: dequeue -> write starts",
    "twrite0>wake": "TUN write -> kernel answers -> selector wake-up",
    "twrite0>twrite1": "TUN write syscall (ping gets its reply inside it)",
}


# ----------------------------------------------------------------------- inside the daemon
def _instrument(trace: Path) -> None:
    """Wrap the data path's functions so that each records (time, event); dump at exit."""
    events: list[tuple[int, str]] = []
    rec = events.append
    clock = time.perf_counter_ns
    tun_fds: set[int] = set()

    class ProbedEpoll:
        """The daemon's epoll object (io/poller.py), its wake-ups with ready fds timed."""

        def __init__(self) -> None:
            self.real = select.epoll()
            for name in ("register", "modify", "unregister", "close", "fileno"):
                setattr(self, name, getattr(self.real, name))

        def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
            ready = self.real.poll(timeout, maxevents)
            if ready:
                rec((clock(), "wake"))
            return ready

    poller._epoll = ProbedEpoll

    real_read = os.read

    def probed_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if fd in tun_fds:
            rec((clock(), "tun_read"))
        return data

    os.read = probed_read

    def around(cls: type, name: str, before: str | None, after: str | None) -> None:
        real = getattr(cls, name)

        def probed(*args, **kwargs):  # type: ignore[no-untyped-def]
            if before:
                rec((clock(), before))
            result = real(*args, **kwargs)
            if after:
                rec((clock(), after))
            return result

        setattr(cls, name, probed)

    around(Connection, "send_packets", "seal0", "seal1")
    around(Connection, "receive_data", "open0", "open1")
    around(Connection, "send_one", "seal0", "seal1")  # the lone-packet paths (issue 15)
    around(Connection, "receive_packets", "open0", "open1")
    around(tcp.TcpCarrier, "write", "cwrite0", "cwrite1")
    around(tcp.TcpCarrier, "read", None, "cread")

    writer_fds: set[int] = set()
    real_write = os.write

    def probed_write(fd: int, data: bytes) -> int:
        if fd not in writer_fds:
            return real_write(fd, data)
        rec((clock(), "twrite0"))
        n = real_write(fd, data)
        rec((clock(), "twrite1"))
        return n

    os.write = probed_write

    class ProbedQueue:
        """The writer thread's queue, its wake-ups timed."""

        def __init__(self, real: object) -> None:
            self.real = real

        def put(self, item: object) -> None:
            self.real.put(item)  # type: ignore[attr-defined]

        def get(self) -> object:
            item = self.real.get()  # type: ignore[attr-defined]
            rec((clock(), "writer_wake"))
            return item

    class ProbedTunWriter(tun.TunWriter):
        """The daemon's TUN writer, with its hand-off (to the thread, or inline) timed."""

        def __init__(self, fd: int, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            tun_fds.add(fd)
            super().__init__(fd, *args, **kwargs)
            writer_fds.add(self.fd)

        def put(self, packets: list[bytes], inline: bool = False) -> None:
            rec((clock(), "put"))
            if len(packets) == 1 and self.backlog == 0 and len(packets[0]) <= tun.INLINE_MAX:
                rec((clock(), "writer_wake"))  # a lone packet: written inside put itself
            super().put(packets, inline)

        def _write_inline(self, packets: list[bytes]) -> None:
            rec((clock(), "writer_wake"))  # no thread: the "wake-up" is the call itself
            super()._write_inline(packets)

        def _run(self) -> None:  # the parent's loop, its queue's wake-ups timed
            self._queue = ProbedQueue(self._queue)  # type: ignore[assignment]
            super()._run()

    link.TunWriter = ProbedTunWriter  # type: ignore[misc]

    # The probe's own cost: 10,000 records, timed.
    t0 = clock()
    for _ in range(10_000):
        rec((clock(), "probe"))
    cost = (clock() - t0) / 10_000
    del events[-10_000:]

    def dump() -> None:
        trace.write_text(json.dumps({"probe_ns": cost, "events": events}))

    atexit.register(dump)


def daemon_main(trace: str, argv: list[str]) -> int:
    """Run vpnd with the probes installed (argv: vpnd's own arguments)."""
    _instrument(Path(trace))
    return vpnd_main(argv)


# ----------------------------------------------------------------------- the driver
def _chains(client: list, server: list) -> list[dict[tuple[int, str, str], int]]:
    """Every ping's chain of event times (CHAIN, plus OVERLAPS ends), from the merged traces.

    Each non-wake event is the first of its kind after the previous one; a wake-up is the last
    wake of that side between the previous event and the next one (none there: no chain).
    """
    by_side = {"C": sorted(client), "S": sorted(server)}
    index = {
        (side, name): [t for t, e in evs if e == name]
        for side, evs in by_side.items()
        for name in {e for _, e in evs}
    }

    def first_after(key: tuple[str, str], t: int) -> int | None:
        times = index.get(key, [])
        k = bisect.bisect_left(times, t)
        return times[k] if k < len(times) else None

    def last_between(key: tuple[str, str], lo: int, hi: int) -> int | None:
        times = index.get(key, [])
        k = bisect.bisect_right(times, hi) - 1
        return times[k] if k >= 0 and times[k] >= lo else None

    chains = []
    for start in index.get(("C", "tun_read"), []):
        times: list[int] = [0, start]
        ok = True
        for k in range(2, len(CHAIN)):
            key = CHAIN[k]
            if key[1] == "wake":
                continue  # resolved once the next event is known
            t = first_after(key, times[-1] if CHAIN[k - 1][1] != "wake" else times[-2])
            if t is None or t - start > 50_000_000:  # 50 ms: not this ping's chain
                ok = False
                break
            if CHAIN[k - 1][1] == "wake":
                wake = last_between(CHAIN[k - 1], times[-2], t)
                if wake is None:
                    ok = False
                    break
                times[-1] = wake
            times.append(t)
            if k + 1 < len(CHAIN) and CHAIN[k + 1][1] == "wake":
                times.append(0)  # placeholder for the wake
        wake = last_between(("C", "wake"), start - 5_000_000, start)
        if not ok or wake is None:
            continue
        times[0] = wake
        chain = {(k, *CHAIN[k]): t for k, t in enumerate(times)}
        for k, (side, name) in enumerate(CHAIN):
            if (side, name) in OVERLAPS:
                end = first_after((side, OVERLAPS[side, name]), times[k])
                if end is None:
                    ok = False
                    break
                chain[(k, side, OVERLAPS[side, name])] = end
        if ok:
            chains.append(chain)
    return chains


def _percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def report(client_trace: dict, server_trace: dict, ping_out: str) -> None:
    """Print the per-step breakdown of the pings' chains."""
    chains = _chains(client_trace["events"], server_trace["events"])
    rtts = [float(x) * 1000 for x in re.findall(r"time=([0-9.]+) ms", ping_out)]
    if not chains:
        counts = {
            side: {e: sum(1 for _, x in trace["events"] if x == e) for _, e in trace["events"]}
            for side, trace in (("client", client_trace), ("server", server_trace))
        }
        print(f"no complete ping chain found in the traces; events seen: {counts}")
        return
    last, first = (len(CHAIN) - 1, *CHAIN[-1]), (0, *CHAIN[0])
    totals = [(c[last] - c[first]) / 1000 for c in chains]
    print(
        f"{len(chains)} complete chains of {len(rtts)} pings; probe cost "
        f"{max(client_trace['probe_ns'], server_trace['probe_ns']):.0f} ns per event"
    )
    print(
        f"ping RTT p50 {_percentile(rtts, 50):.0f} µs, p99 {_percentile(rtts, 99):.0f} µs; "
        f"chain (client wake for the TUN read -> client TUN write done) p50 "
        f"{_percentile(totals, 50):.0f} µs, p99 {_percentile(totals, 99):.0f} µs"
    )
    print("\n| # | side | step | p50 µs | p90 µs | share of p50 chain |")
    print("|---:|---|---|---:|---:|---:|")
    p50_total = statistics.median(totals)

    def row(label: str, where: str, name: str, deltas: list[float], share: bool) -> None:
        med = statistics.median(deltas)
        pct = f"{100 * med / p50_total:.0f} %" if share else "(overlaps)"
        print(f"| {label} | {where} | {name} | {med:.1f} | {_percentile(deltas, 90):.1f} | {pct} |")

    for k in range(1, len(CHAIN)):
        (side, a), (far, b) = CHAIN[k - 1], CHAIN[k]
        where = side if far == side else f"{side}->{far}"
        deltas = [(c[(k, far, b)] - c[(k - 1, side, a)]) / 1000 for c in chains]
        row(str(k), where, STEP_NAMES[f"{a}>{b}"], deltas, True)
        if (side, a) in OVERLAPS:
            end = OVERLAPS[side, a]
            deltas = [(c[(k - 1, side, end)] - c[(k - 1, side, a)]) / 1000 for c in chains]
            name = STEP_NAMES.get(f"{a}>{end}", "carrier write (send syscall)")
            row("", side, name, deltas, False)


def driver(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN, ping -i 0.01)", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="vb-probe-") as tmp,
        namespace_pair(new_tag("vp")) as pair,
    ):
        work = Path(tmp)
        key = work / "link.key"
        generate_key(key, randomdev="/dev/urandom")
        procs: dict[str, VpndProcess] = {}
        try:
            for role, local, remote, ns in (
                ("server", SERVER_TUN, CLIENT_TUN, pair.server),
                ("client", CLIENT_TUN, SERVER_TUN, pair.client),
            ):
                server_line = "server 0 379" if role == "server" else f"server {pair.server_ip} 379"
                conf = work / f"{role}.conf"
                conf.write_text(
                    f"mode {role}\n{server_line}\nlocal {local}\nremote {remote}\n"
                    f"cipher {args.cipher}\nkeyfile {key}\nrandomdev /dev/urandom\n"
                    f"interface {pair.tag}t\nstatusfile {work}/{role}.status.json\nkeepalive 5\n"
                )
                logfile = work / f"{role}.log"
                with open(logfile, "ab") as out:
                    proc = subprocess.Popen(
                        ns.cmd(
                            sys.executable, "-m", "bench.latency_probe",
                            "--daemon", str(work / f"{role}.trace.json"), "-f", str(conf),
                        ),
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                procs[role] = VpndProcess(ns, conf, logfile, proc)
            poll_until(lambda: all(p.state() == "up" for p in procs.values()), 20, what="link up")
            if args.pinned:
                pin((procs["server"].pid, procs["client"].pid), max(os.sched_getaffinity(0)))
            poll_until(lambda: pair.client.ping(SERVER_TUN, timeout=1), 20, what="ping")
            pids = [procs[r].pid for r in ("server", "client")]
            cpu0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
            ping_out = pair.client.run(
                "ping", "-n", "-c", str(args.pings), "-i", "0.01", SERVER_TUN,
                timeout=args.pings * 0.05 + 30,
            ).stdout  # fmt: skip
            wall = time.monotonic() - t0
            cpu = [100 * (cpu_seconds(p) - c) / wall for p, c in zip(pids, cpu0, strict=True)]
        finally:
            for p in procs.values():
                p.stop(signal.SIGTERM)
        traces = {
            role: json.loads((work / f"{role}.trace.json").read_text())
            for role in ("client", "server")
        }
    print(
        f"vpnd {args.cipher}, {'both daemons on one core' if args.pinned else 'unpinned'}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"CPU of a daemon while pinged (server/client, % of one core): {cpu[0]:.1f}/{cpu[1]:.1f}"
    )
    report(traces["client"], traces["server"], ping_out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--daemon"]:
        return daemon_main(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=300)
    ap.add_argument("--cipher", default="chacha20-poly1305")
    ap.add_argument("--pinned", action="store_true", help="both daemons on one shared core")
    return driver(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
