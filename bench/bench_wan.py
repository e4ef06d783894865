"""How much the WAN emulator (vpnctl.wan) carries, and how true its delay is.

    python -m bench.bench_wan [--seconds 10] [--reps 1] [--spec delay=10ms ...]

For each spec it builds A - emulator - B (tests/helpers/wan.py), runs a single-stream iperf3
(plain TCP, A -> B, `-t seconds`, median of `reps`) and 20 pings, and prints Mbit/s, the median
RTT, the TCP retransmits and what the emulator counted (segments lost, frames it re-cut). The
first line is raw veth without the emulator, for scale. The load average is printed too: on a
shared machine the figures move with it. Needs root, iproute2, iperf3 and ping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tests.helpers.netns import Netns, namespace_pair, poll_until
from tests.helpers.wan import wan_pair

DEFAULT_SPECS = ["", "delay=10ms", "delay=10ms,loss=0.1%", "delay=10ms,loss=1%"]


def iperf(
    client: Netns, server: Netns, target: str, seconds: int, cc: str | None = None
) -> tuple[float, int]:
    """(Mbit/s received, retransmits) of one single-stream iperf3 run client -> server."""
    srv = subprocess.Popen(
        server.cmd("iperf3", "-s", "-1", "-B", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def attempt() -> dict | None:
        extra = ["-C", cc] if cc else []
        proc = client.run(
            "iperf3", "-c", target, "-t", str(seconds), "-J", *extra,
            check=False, timeout=seconds + 30,
        )  # fmt: skip
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            return None
        return out if "sum_received" in out.get("end", {}) else None

    try:
        out = poll_until(attempt, 20, interval=0.3, what="iperf3 run")
    finally:
        srv.kill()
        srv.wait()
    end = out["end"]
    return end["sum_received"]["bits_per_second"] / 1e6, end["sum_sent"].get("retransmits", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_wan")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--spec", action="append", help="a vpnctl.wan spec (repeatable)")
    parser.add_argument("--cc", help="TCP congestion control for iperf3 -C (default: system's)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces)")
        return 0
    cc = args.cc or Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    print(f"TCP congestion control: {cc}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared)")
    print(f"{'path':<34} {'Mbit/s':>8} {'RTT ms':>7} {'retr':>6}  emulator")
    with namespace_pair() as pair:
        runs = [iperf(pair.client, pair.server, pair.server_ip, args.seconds)]
        for _ in range(args.reps - 1):
            runs.append(iperf(pair.client, pair.server, pair.server_ip, args.seconds))
        mbit = statistics.median(r[0] for r in runs)
        print(f"{'raw veth (no emulator)':<34} {mbit:>8.0f} {'':>7} {runs[-1][1]:>6}")
    for spec in args.spec or DEFAULT_SPECS:
        with wan_pair(spec) as wan:
            rtts = wan.ping_times(20)
            runs = [iperf(wan.a, wan.b, wan.b_ip, args.seconds, args.cc) for _ in range(args.reps)]
            mbit = statistics.median(r[0] for r in runs)
            up = wan.stats()["up"]
            note = f"lost {up['dropped_loss']}/{up['segments']} segs, re-cut {up['split']}"
            name = f"emulator {spec or '(plain wire)'}"
            rtt = statistics.median(rtts) if rtts else float("nan")
            print(f"{name:<34} {mbit:>8.0f} {rtt:>7.2f} {runs[-1][1]:>6}  {note}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
