"""Throughput, latency, memory and CPU cost of the tunnel, against raw veth in one run.

    python -m bench.bench_tunnel [--seconds 5] [--reps 3] [--pings 300] [--modes free,pinned]
                                 [--only raw,chacha20-poly1305,aes-256-gcm,wireguard-go,openvpn,rss]
    python -m bench.bench_tunnel --only rss      # the memory table alone (about 30 s)

Two namespaces joined by veth (198.18.1.0/24). For every path it prints one table row:

- **Mbit/s** — median of `reps` single-stream iperf3 runs (`-t seconds`), and its ratio to raw
  veth measured in the same run (ratios are what count: absolute figures swing with the machine
  and its load);
- **RTT p50/p99** — of `pings` pings 10 ms apart (`ping -i 0.01`, needs root), on the idle tunnel;
- **RSS** — both daemons' VmRSS once the link is up and idle, and their peak (VmHWM) after the
  iperf3 runs, in MiB, server/client;
- **CPU ns/B** — CPU time (utime + stime of the whole process, all threads, from
  /proc/<pid>/stat) each daemon spent during the iperf3 runs, divided by the bytes iperf3
  delivered, server/client. Kernel work done on a daemon's behalf in its own syscalls is counted;
  softirq work the kernel happens to run in another context is not (true for every row alike).

RSS rows (`--only rss`, on by default, measured first): a plain TCP link and a UDP link with
ChaCha20-Poly1305, each end's VmRSS idle (link up, one ping, a quiet second; with its
RssAnon/RssFile split) and busy (the highest VmRSS sampled every 50 ms during one iperf3
transfer), against issue 15's targets (25 MB idle, 30 MB busy; MB as the issue says, the table
prints MiB beside them).

IPv6 rows (`--only ipv6`, on by default): raw veth over IPv6 (2001:db8:1::1/2 on the same veth),
vpnd ChaCha20-Poly1305 carrying IPv6 inside a dual-stack tunnel (fd00:5ee::1/2) over the IPv4
carrier, and the same tunnel carried over an IPv6 carrier (IPv6 in IPv6), TCP and UDP.

Paths: raw veth; vpnd with ChaCha20-Poly1305 and with AES-256-GCM; wireguard-go and OpenVPN over
TCP when installed (bench/peers.py says how each is set up and how wireguard-go is found: set
WIREGUARD_GO, or run /work/shared/tools/get-wireguard-go-2023.sh once; a missing tool gives a
"skipped" row, never an error).

Modes: `free` lets the scheduler place the daemons; `pinned` puts every thread of both daemons on
one shared core (sched_setaffinity on each /proc/<pid>/task), so the row shows what one core
buys; iperf3 and ping stay unpinned. Needs root, iproute2, iperf3 and ping.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import PEERS
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
SERVER_TUN6, CLIENT_TUN6 = "fd00:5ee::1", "fd00:5ee::2"
SERVER_WAN6, CLIENT_WAN6 = "2001:db8:1::1", "2001:db8:1::2"
CIPHERS = ("chacha20-poly1305", "aes-256-gcm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Seconds from starting the client vpnd (its server listening) to both status files saying up.
STARTUP: dict[str, float] = {}


@dataclass
class Row:
    """One line of the table (None: not measured)."""

    mode: str
    path: str
    mbps: float | None = None
    rtt: tuple[float, float] | None = None  # p50, p99 in µs
    rss_idle: tuple[float, ...] = ()  # MiB, server then client
    rss_peak: tuple[float, ...] = ()
    ns_per_byte: tuple[float, ...] = ()
    note: str = ""
    extra: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mib(pid: int, key: str) -> float:
    """A /proc/<pid>/status size field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pin(pids: tuple[int, ...], core: int) -> None:
    """Put every thread of every process in `pids` on `core` (new threads inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {core})


def iperf(pair: Pair, target: str, seconds: int, reps: int, pids: tuple[int, ...] = ()) -> tuple:
    """Median Mbit/s of `reps` single-stream iperf3 runs from client to server, and the CPU
    nanoseconds per delivered byte each of `pids` spent over those runs."""
    server = subprocess.Popen(
        pair.server.cmd("iperf3", "-s", "-B", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: list[float] = []
    cpu = [0.0] * len(pids)
    delivered = 0

    def attempt() -> dict | None:
        before = [cpu_seconds(pid) for pid in pids]
        proc = pair.client.run(
            "iperf3", "-c", target, "-t", str(seconds), "-J", check=False, timeout=seconds + 30
        )
        after = [cpu_seconds(pid) for pid in pids]
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            return None
        if "sum_received" not in out.get("end", {}):
            return None
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            cpu[i] += b - a
        return out

    try:
        for _ in range(reps):
            out = poll_until(attempt, 20, interval=0.3, what="iperf3 run")
            assert isinstance(out, dict)
            received = out["end"]["sum_received"]
            results.append(received["bits_per_second"] / 1e6)
            delivered += int(received["bytes"])
    finally:
        server.kill()
        server.wait()
    per_byte = tuple(c * 1e9 / delivered for c in cpu) if delivered else ()
    return statistics.median(results), per_byte


def ping_rtt(pair: Pair, target: str, count: int) -> tuple[float, float]:
    """p50 and p99 RTT in µs of `count` pings 10 ms apart (ping -i 0.01 needs root)."""
    out = pair.client.run(
        "ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", target,
        check=False, timeout=count * 0.05 + 30,
    ).stdout  # fmt: skip
    times = [float(t) * 1000 for t in re.findall(r"time=([0-9.]+) ms", out)]
    if len(times) < count * 0.9:
        raise RuntimeError(f"only {len(times)} of {count} pings to {target} answered")
    q = statistics.quantiles(times, n=100, method="inclusive")
    return q[49], q[98]


@contextmanager
def vpnd_pair(
    pair: Pair, work: Path, cipher: str, v6: str = "", udp: bool = False
) -> Iterator[tuple]:
    """Start a server and client vpnd with `cipher` and wait for the link. `v6`: "" (IPv4
    only), "inside" (a dual-stack tunnel), "both" (that tunnel over an IPv6 TCP carrier) or
    "udp" (over an IPv6 UDP carrier). `udp`: an IPv4-only link over a UDP carrier."""
    key = work / f"{cipher}.key"
    if not key.exists():
        generate_key(key, randomdev="/dev/urandom")
    confs = {}
    label = f"{cipher}{'-' + v6 if v6 else ''}{'-udp4' if udp else ''}"
    server_ip = SERVER_WAN6 if v6 in ("both", "udp") else pair.server_ip
    for role, local, remote, local6, remote6 in (
        ("server", SERVER_TUN, CLIENT_TUN, SERVER_TUN6, CLIENT_TUN6),
        ("client", CLIENT_TUN, SERVER_TUN, CLIENT_TUN6, SERVER_TUN6),
    ):
        server_line = "server 0 379" if role == "server" else f"server {server_ip} 379"
        six = f"local6 {local6}\nremote6 {remote6}\n" if v6 else ""
        six += "transport udp\n" if v6 == "udp" or udp else ""
        conf = work / f"{role}-{label}.conf"
        conf.write_text(
            f"mode {role}\n{server_line}\nlocal {local}\nremote {remote}\ncipher {cipher}\n"
            f"{six}keyfile {key}\nrandomdev /dev/urandom\ninterface {pair.tag}t\n"
            f"statusfile {work}/{role}-{cipher}.status.json\nkeepalive 5\n"
        )
        confs[role] = conf

    def state(role: str) -> str | None:
        """The state in `role`'s status file, read directly (no `vpnd status` process)."""
        try:
            return json.loads((work / f"{role}-{cipher}.status.json").read_text()).get("state")
        except (OSError, ValueError):
            return None

    with vpnd(pair.server, confs["server"], work, f"server-{label}") as s:
        poll_until(lambda: state("server") == "listening", 20, interval=0.005, what="listening")
        started = time.monotonic()
        with vpnd(pair.client, confs["client"], work, f"client-{label}") as c:
            up = ("server", "client")
            poll_until(lambda: all(state(r) == "up" for r in up), 20, interval=0.005, what="up")
            STARTUP[label] = time.monotonic() - started
            yield s, c


def measure(
    row: Row, pair: Pair, target: str, pids: tuple[int, ...], args: argparse.Namespace
) -> None:
    """Fill `row` for a tunnel whose daemons are `pids` (server, client) and whose far end is
    `target`: idle RSS, pings, iperf3 with CPU accounting, peak RSS."""
    if row.mode == "pinned":
        pin(pids, args.core)
    # Wait until the path answers (a fresh link may still be settling), then measure it idle.
    poll_until(lambda: pair.client.ping(target, timeout=1), 20, what=f"ping {target}")
    row.rss_idle = tuple(status_mib(pid, "VmRSS") for pid in pids)
    row.rtt = ping_rtt(pair, target, args.pings)
    row.mbps, row.ns_per_byte = iperf(pair, target, args.seconds, args.reps, pids)
    row.rss_peak = tuple(status_mib(pid, "VmHWM") for pid in pids)


#: Issue 15's memory targets, in MB (10^6 bytes) as the issue states them; tables print MiB.
RSS_IDLE_MB, RSS_BUSY_MB = 25, 30
MIB = 1 << 20


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of `pid` in KiB, as the kernel reports them (/proc status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def busy_rss(pair: Pair, target: str, seconds: int, pids: tuple[int, ...]) -> tuple:
    """Run one iperf3 transfer of `seconds` to `target` and sample each of `pids`' VmRSS every
    50 ms while it runs; returns (the highest VmRSS per pid in MiB, Mbit/s or None)."""
    server = subprocess.Popen(
        pair.server.cmd("iperf3", "-s", "-1", "-B", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = [0] * len(pids)
    try:
        poll_until(
            lambda: pair.server.run("ss", "-Htln", check=False).stdout.count(":5201"),
            10,
            what="iperf3 server listening",
        )
        with tempfile.TemporaryFile() as out:
            client = subprocess.Popen(
                pair.client.cmd("iperf3", "-c", target, "-t", str(seconds), "-J"),
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + seconds + 30
            while client.poll() is None and time.monotonic() < deadline:
                for i, pid in enumerate(pids):
                    peak[i] = max(peak[i], rss_kib(pid)["VmRSS"])
                time.sleep(0.05)
            if client.poll() is None:
                client.kill()
            client.wait()
            out.seek(0)
            try:
                mbps = json.loads(out.read())["end"]["sum_received"]["bits_per_second"] / 1e6
            except (ValueError, KeyError):
                mbps = None
    finally:
        server.kill()
        server.wait()
    return tuple(k / 1024 for k in peak), mbps


def rss_table(pair: Pair, work: Path, args: argparse.Namespace) -> list[str]:
    """Idle and busy RSS of both ends of a plain TCP link and a UDP link (ChaCha20-Poly1305),
    against issue 15's targets. Idle: VmRSS once the link is up, has carried a ping and sat
    still for a second; busy: the highest VmRSS sampled during one iperf3 transfer."""
    idle_mib, busy_mib = RSS_IDLE_MB * 1e6 / MIB, RSS_BUSY_MB * 1e6 / MIB
    lines = [
        f"\nRSS (VmRSS from /proc/<pid>/status, MiB = 2^20 B; targets {RSS_IDLE_MB} MB = "
        f"{idle_mib:.2f} MiB idle, {RSS_BUSY_MB} MB = {busy_mib:.2f} MiB busy; busy = highest "
        f"VmRSS sampled every 50 ms during iperf3 -t {args.seconds}; anon/file = RssAnon/RssFile "
        "at idle, file = mapped pages of libpython, cryptography's Rust .so, libc..., shared "
        "with every other process mapping them)",
        "",
        "| link | end | idle MiB | idle anon/file | busy MiB | idle target | busy target "
        "| Mbit/s | link up s |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for label, udp in (("TCP, chacha20-poly1305", False), ("UDP, chacha20-poly1305", True)):
        with vpnd_pair(pair, work, CIPHERS[0], udp=udp) as (s, c):
            started = STARTUP[f"{CIPHERS[0]}{'-udp4' if udp else ''}"]
            poll_until(lambda: pair.client.ping(SERVER_TUN, timeout=1), 20, what="ping")
            time.sleep(1)  # idle: nothing flows but the keepalives
            idle = [rss_kib(pid) for pid in (s.pid, c.pid)]
            busy, mbps = busy_rss(pair, SERVER_TUN, args.seconds, (s.pid, c.pid))
        for end, i in (("server", 0), ("client", 1)):
            vm = idle[i]["VmRSS"] / 1024
            lines.append(
                f"| {label} | {end} | {vm:.1f} | {idle[i]['RssAnon'] / 1024:.1f}/"
                f"{idle[i]['RssFile'] / 1024:.1f} | {busy[i]:.1f} | "
                f"{'met' if vm <= idle_mib else 'MISSED'} | "
                f"{'met' if busy[i] <= busy_mib else 'MISSED'} | "
                f"{f'{mbps:,.0f}' if mbps else '-'} | {started:.3f} |"
            )
        print(f"  measured RSS {label}", file=sys.stderr, flush=True)
    return lines


def _pair_text(values: tuple[float, ...], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in values) if values else "-"


def print_table(rows: list[Row], raw: float | None, args: argparse.Namespace) -> None:
    """The whole result as one markdown table, then the notes."""
    print(
        f"\nsingle TCP stream, iperf3 -t {args.seconds}, median of {args.reps}; "
        f"{args.pings} pings 10 ms apart; s/c = server/client daemon; "
        f"pinned = both daemons on core {args.core}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        "\n| mode | path | Mbit/s | ÷ raw | RTT p50 µs | RTT p99 µs | RSS idle MiB s/c "
        "| RSS peak MiB s/c | CPU ns/B s/c |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    notes: list[str] = []
    for row in rows:
        if row.mbps is None:
            cells = ["-"] * 7
        else:
            ratio = f"{row.mbps / raw:.2f}" if raw else "-"
            cells = [
                f"{row.mbps:,.0f}",
                ratio,
                f"{row.rtt[0]:.0f}" if row.rtt else "-",
                f"{row.rtt[1]:.0f}" if row.rtt else "-",
                _pair_text(row.rss_idle, ".1f"),
                _pair_text(row.rss_peak, ".1f"),
                _pair_text(row.ns_per_byte, ".2f"),
            ]
        label = row.path
        if row.note:
            if row.note not in notes:
                notes.append(row.note)
            label += f" [{notes.index(row.note) + 1}]"
        print(f"| {row.mode} | {label} | " + " | ".join(cells) + " |")
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    if STARTUP:
        print(
            "vpnd start-up to link up (client process started -> both ends up, including "
            "`ip netns exec` and the interpreter): "
            + ", ".join(f"{cipher} {secs:.3f} s" for cipher, secs in STARTUP.items())
        )


def missing_prerequisite() -> str | None:
    """What a tunnel bench lacks on this machine ("needs ..."), or None: root, ip, iperf3, ping."""
    for tool in ("ip", "iperf3", "ping"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN, ping -i 0.01)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="iperf3 runs per row (median; default 3)")
    ap.add_argument("--pings", type=int, default=300, help="pings per row (default 300)")
    ap.add_argument(
        "--modes", default="free,pinned", help="free and/or pinned (default: both, comma-separated)"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset of rows: raw, the cipher names, ipv6, wireguard-go, "
        "openvpn, rss (idle and busy RSS of a TCP and a UDP link against issue 15's targets)",
    )
    ap.add_argument(
        "--core",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the core the pinned mode shares between both daemons (default: the last one)",
    )
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"free", "pinned"}:
        ap.error(f"--modes: free and/or pinned, not {args.modes!r}")
    wanted = set(filter(None, args.only.split(","))) or {
        "raw",
        *CIPHERS,
        "ipv6",
        *(p.label for p in PEERS),
        "rss",
    }
    missing = missing_prerequisite()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rss_lines: list[str] = []
    if "rss" in wanted:  # first, while nothing else has run in this bench
        with (
            tempfile.TemporaryDirectory(prefix="vb-rss-") as tmp,
            namespace_pair(new_tag("vb")) as pair,
        ):
            rss_lines = rss_table(pair, Path(tmp), args)
        if wanted == {"rss"}:
            print("\n".join(rss_lines))
            return 0
    rows: list[Row] = []
    raw: float | None = None
    with tempfile.TemporaryDirectory(prefix="vb-tunnel-") as tmp:
        work = Path(tmp)
        with namespace_pair(new_tag("vb")) as pair:
            # Raw veth first: it is the yardstick (the ratio column) for every other row.
            raw_row = Row("-", "raw veth (MTU 1500)")
            raw_row.mbps, _ = iperf(pair, pair.server_ip, args.seconds, args.reps)
            raw_row.rtt = ping_rtt(pair, pair.server_ip, args.pings)
            raw = raw_row.mbps
            if "raw" in wanted:
                rows.append(raw_row)
            if "ipv6" in wanted:
                for ns, address in ((pair.server, SERVER_WAN6), (pair.client, CLIENT_WAN6)):
                    ifname = pair.server_if if ns is pair.server else pair.client_if
                    ns.run("ip", "-6", "addr", "add", f"{address}/64", "dev", ifname, "nodad")
                poll_until(lambda: pair.client.ping(SERVER_WAN6, timeout=1), 10, what="veth v6")
                raw6 = Row("-", "raw veth IPv6 (MTU 1500)")
                raw6.mbps, _ = iperf(pair, SERVER_WAN6, args.seconds, args.reps)
                raw6.rtt = ping_rtt(pair, SERVER_WAN6, args.pings)
                rows.append(raw6)
            for mode in modes:
                for cipher in CIPHERS:
                    if cipher not in wanted:
                        continue
                    row = Row(mode, f"vpnd TCP, {cipher}")
                    with vpnd_pair(pair, work, cipher) as (s, c):
                        measure(row, pair, SERVER_TUN, (s.pid, c.pid), args)
                    rows.append(row)
                    print(f"  measured {mode} {row.path}", file=sys.stderr, flush=True)
                if "ipv6" in wanted:
                    for v6, path in (
                        ("inside", "vpnd TCP, chacha20, IPv6 inside"),
                        ("both", "vpnd TCP/IPv6, chacha20, IPv6 in"),
                        ("udp", "vpnd UDP/IPv6, chacha20, IPv6 in"),
                    ):
                        row = Row(mode, path)
                        with vpnd_pair(pair, work, CIPHERS[0], v6) as (s, c):
                            measure(row, pair, SERVER_TUN6, (s.pid, c.pid), args)
                        rows.append(row)
                        print(f"  measured {mode} {row.path}", file=sys.stderr, flush=True)
                for peer in PEERS:
                    if peer.label not in wanted:
                        continue
                    row = Row(mode, peer.label)
                    missing = peer.missing_tools()
                    if missing:
                        row.note = f"{peer.label}: not installed ({', '.join(missing)}): skipped"
                        rows.append(row)
                        continue
                    try:
                        with peer.start(pair) as tunnel:
                            measure(row, pair, tunnel.server_addr, tunnel.pids, args)
                            row.note = f"{peer.label}: {tunnel.note}"
                    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
                        # A comparison tool that will not come up is reported, not fatal.
                        row.mbps = None
                        row.note = f"{peer.label}: failed: {str(exc).splitlines()[0]}"
                    rows.append(row)
                    print(f"  measured {mode} {row.path}", file=sys.stderr, flush=True)
    print_table(rows, raw, args)
    print("\n".join(rss_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
