"""Throughput and latency of the tunnel, measured against raw veth in one run.

    python -m bench.bench_tunnel [--seconds 5] [--reps 3]

For each path it builds two namespaces joined by veth (198.18.1.0/24), runs a single-stream
iperf3 (`-t seconds`, `reps` times, median), and prints Mbit/s and the ratio to raw veth; then the
ping RTT the tunnel adds and the daemons' peak RSS (VmHWM). Paths: raw veth, vpnd with
ChaCha20-Poly1305, vpnd with AES-256-GCM, and wireguard-go / OpenVPN when they are installed
(skipped with a note otherwise; their setups are in bench/peers.py and the note column says how
each is configured). Needs root, iproute2, iperf3 and ping.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.peers import PEERS
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"


def iperf(pair: Pair, target: str, seconds: int, reps: int) -> float:
    """Median Mbit/s of `reps` single-stream iperf3 runs from client to server."""
    server = subprocess.Popen(
        pair.server.cmd("iperf3", "-s", "-B", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results = []

    def attempt() -> dict | None:
        proc = pair.client.run(
            "iperf3", "-c", target, "-t", str(seconds), "-J", check=False, timeout=seconds + 30
        )
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            return None
        return out if "sum_received" in out.get("end", {}) else None

    try:
        for _ in range(reps):
            out = poll_until(attempt, 20, interval=0.3, what="iperf3 run")
            assert isinstance(out, dict)
            results.append(out["end"]["sum_received"]["bits_per_second"] / 1e6)
    finally:
        server.kill()
        server.wait()
    return statistics.median(results)


def ping_rtt(pair: Pair, target: str, count: int = 50) -> float:
    """Average RTT in ms of `count` pings."""
    out = pair.client.run(
        "ping", "-n", "-q", "-c", str(count), "-i", "0.02", target, timeout=60
    ).stdout
    match = re.search(r"= [0-9.]+/([0-9.]+)/", out)
    assert match, out
    return float(match.group(1))


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@contextmanager
def vpnd_pair(pair: Pair, work: Path, cipher: str) -> Iterator[tuple]:
    """Start a server and client vpnd with `cipher` and wait for the link."""
    key = work / f"{cipher}.key"
    if not key.exists():
        generate_key(key, randomdev="/dev/urandom")
    confs = {}
    for role, local, remote in (
        ("server", SERVER_TUN, CLIENT_TUN),
        ("client", CLIENT_TUN, SERVER_TUN),
    ):
        server_line = "server 0 379" if role == "server" else f"server {pair.server_ip} 379"
        conf = work / f"{role}-{cipher}.conf"
        conf.write_text(
            f"mode {role}\n{server_line}\nlocal {local}\nremote {remote}\ncipher {cipher}\n"
            f"keyfile {key}\nrandomdev /dev/urandom\ninterface {pair.tag}t\n"
            f"statusfile {work}/{role}-{cipher}.status.json\nkeepalive 5\n"
        )
        confs[role] = conf
    with (
        vpnd(pair.server, confs["server"], work, f"server-{cipher}") as s,
        vpnd(pair.client, confs["client"], work, f"client-{cipher}") as c,
    ):
        poll_until(lambda: s.state() == "up" and c.state() == "up", 20, what="link up")
        yield s, c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    for tool in ("ip", "iperf3", "ping"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 2
    rows: list[tuple[str, float | None, str]] = []
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vb-tunnel-") as tmp:
        work = Path(tmp)
        with namespace_pair(new_tag("vb")) as pair:
            raw = iperf(pair, pair.server_ip, args.seconds, args.reps)
            rows.append(("raw veth (MTU 1500)", raw, ""))
            raw_rtt = ping_rtt(pair, pair.server_ip)
            for cipher in ("chacha20-poly1305", "aes-256-gcm"):
                with vpnd_pair(pair, work, cipher) as (s, c):
                    mbps = iperf(pair, SERVER_TUN, args.seconds, args.reps)
                    rtt = ping_rtt(pair, SERVER_TUN)
                    rss = max(peak_rss_kib(s.pid), peak_rss_kib(c.pid))
                rows.append((f"vpnd TCP, {cipher}", mbps, ""))
                extra.append(
                    f"ping RTT added by vpnd ({cipher}): {rtt - raw_rtt:+.3f} ms "
                    f"({raw_rtt:.3f} -> {rtt:.3f} ms); daemon peak RSS {rss / 1024:.1f} MiB"
                )
            for peer in PEERS:
                if peer.missing_tools():
                    rows.append((peer.label, None, "not installed: skipped"))
                    continue
                try:
                    with peer.start(pair) as tunnel:
                        mbps = iperf(pair, tunnel.server_addr, args.seconds, args.reps)
                        rtt = ping_rtt(pair, tunnel.server_addr)
                        rss = max(peak_rss_kib(pid) for pid in tunnel.pids)
                except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
                    # A comparison tool that will not come up is reported, not fatal.
                    rows.append((peer.label, None, f"failed: {str(exc).splitlines()[0]}"))
                    continue
                rows.append((peer.label, mbps, tunnel.note))
                extra.append(
                    f"ping RTT added by {peer.label}: {rtt - raw_rtt:+.3f} ms "
                    f"({raw_rtt:.3f} -> {rtt:.3f} ms); daemon peak RSS {rss / 1024:.1f} MiB"
                )
    print(f"single TCP stream, iperf3 -t {args.seconds}, median of {args.reps}")
    print(f"{'path':<34} {'Mbit/s':>10} {'÷ raw':>7}")
    for name, mbps, note in rows:
        if mbps is None:
            print(f"{name:<34} {'-':>10} {'-':>7}  {note}")
        else:
            print(f"{name:<34} {mbps:>10,.0f} {mbps / raw:>7.2f}  {note}")
    for line in extra:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
