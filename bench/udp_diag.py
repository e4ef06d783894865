"""Where a vpnd UDP link loses time or packets on the LAN: counters around one iperf3 run.

    python -m bench.udp_diag [--seconds 5] [--cipher chacha20-poly1305] [--transport udp]
                             [--profile DIR]

Builds the bench's two namespaces and a vpnd link, runs a single-stream iperf3 (client ->
server) and prints, as deltas over the run: Mbit/s and the inner TCP's retransmits; each
namespace's UDP counters (/proc/net/snmp: InErrors, RcvbufErrors, SndbufErrors); each daemon's
status drops and datagram counters; each daemon's CPU seconds. With `--profile DIR` it samples
both daemons with py-spy (collapsed stacks, DIR/server.txt and client.txt); with `--wan SPEC`
the link runs through the lab WAN emulator. Needs root, iproute2, iperf3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.bench_tunnel import cpu_seconds
from bench.bench_udp import SERVER_TUN, vpnd_link
from tests.helpers.netns import Netns, Pair, namespace_pair, new_tag, poll_until


def snmp(ns: Netns) -> dict[str, int]:
    """The namespace's Udp and Tcp counters from /proc/net/snmp."""
    text = ns.run("cat", "/proc/net/snmp", "/proc/net/netstat").stdout.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(text[::2], text[1::2], strict=False):
        proto, _, keys = names.partition(": ")
        for k, v in zip(keys.split(), values.split(": ")[1].split(), strict=False):
            out[f"{proto}.{k}"] = int(v)
    return out


def user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid`, all threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def link_stats(ns: Netns, ifname: str, short: str) -> dict[str, int]:
    """rx/tx packets, errors and drops of `ifname` in `ns` (ip -s -j link)."""
    data = json.loads(ns.run("ip", "-s", "-j", "link", "show", ifname).stdout)[0]["stats64"]
    kinds = ("packets", "dropped", "errors")
    return {f"{short}.{d}.{k}": data[d][k] for d in ("rx", "tx") for k in kinds}


def counters(ns: Netns, tun: str, veth: str) -> dict[str, int]:
    return snmp(ns) | link_stats(ns, tun, "tun") | link_stats(ns, veth, "veth")


def status(work: Path, role: str, name: str) -> dict:
    try:
        return json.loads((work / f"{role}-{name}.status.json").read_text())
    except (OSError, ValueError):
        return {}


UDP_KEYS = ["Udp.InDatagrams", "Udp.InErrors", "Udp.RcvbufErrors", "Udp.SndbufErrors",
            "Udp.OutDatagrams", "Tcp.RetransSegs"]  # fmt: skip
LINK_KEYS = [f"{dev}.{d}.{k}" for dev in ("tun", "veth") for d in ("rx", "tx")
             for k in ("packets", "dropped")]  # fmt: skip
#: Counter names (/proc/net/snmp, /proc/net/netstat) worth printing when they moved.
ODD = ("Err", "Discard", "Drop", "Lost", "DSACK", "Reord", "Timeout", "Spurious", "Retrans",
       "Prune", "Collapse", "OFO")  # fmt: skip


def _delta(a: dict[str, int], b: dict[str, int], keys: list[str]) -> str:
    def short(k: str) -> str:
        return k.split(".", 1)[1] if k.startswith(("Udp.", "Tcp.", "TcpExt.", "Ip.")) else k

    return ", ".join(f"{short(k)} {b.get(k, 0) - a.get(k, 0)}" for k in keys)


@contextmanager
def _underlay(spec: str | None) -> Iterator[Pair]:
    """The bench's veth pair, or the two hosts of the lab WAN (tests/helpers/wan.py)."""
    if not spec:
        with namespace_pair(new_tag("vbd")) as pair:
            yield pair
        return
    from tests.helpers.wan import wan_pair  # noqa: PLC0415 — the emulator only when asked

    with wan_pair(spec, new_tag("vbd")) as wp:
        pair = Pair(wp.tag, wp.b, wp.a, "wan0", "wan0")
        yield pair
        stats = wp.stats()
        legs = {d: st for d, st in stats.items() if isinstance(st, dict)}
        print(f"emulator: { {d: {k: v for k, v in st.items() if v} for d, st in legs.items()} }")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.udp_diag")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--cipher", default="chacha20-poly1305")
    ap.add_argument("--transport", default="udp", choices=("udp", "tcp"))
    ap.add_argument("--profile", type=Path, help="py-spy stacks of both daemons into DIR")
    ap.add_argument("--txqueuelen", type=int, help="set both TUNs' txqueuelen first")
    ap.add_argument("--gso-max", type=int, help="set both TUNs' gso_max_size first")
    ap.add_argument("--wan", help="through the lab WAN emulator with this spec (delay=10ms,...)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces)")
        return 0
    keys = [*UDP_KEYS, *LINK_KEYS]
    name = f"{args.transport}-{args.cipher}"
    with (
        tempfile.TemporaryDirectory(prefix="vb-diag-") as tmp,
        _underlay(args.wan) as pair,
    ):
        work = Path(tmp)
        with vpnd_link(pair, work, args.cipher, args.transport) as pids:
            srv = subprocess.Popen(
                pair.server.cmd("iperf3", "-s", "-1", "-B", SERVER_TUN),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            spies = []
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                for role, pid in zip(("server", "client"), pids, strict=True):
                    out_file = str(args.profile / f"{role}.txt")
                    spies.append(subprocess.Popen(
                        ["py-spy", "record", "-p", str(pid), "-d", str(args.seconds), "-r", "200",
                         "-o", out_file, "--format", "raw", "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            tun = f"{pair.tag}t"
            if args.gso_max is not None:
                for ns in (pair.server, pair.client):
                    ns.run("ip", "link", "set", tun, "gso_max_size", str(args.gso_max))
            if args.txqueuelen is not None:
                for ns in (pair.server, pair.client):
                    ns.run("ip", "link", "set", tun, "txqueuelen", str(args.txqueuelen))
            before = [counters(pair.server, tun, pair.server_if),
                      counters(pair.client, tun, pair.client_if)]  # fmt: skip
            st0 = [status(work, r, name) for r in ("server", "client")]
            cpu0 = [cpu_seconds(p) for p in pids]
            us0 = [user_sys(p) for p in pids]
            try:

                def attempt() -> dict | None:
                    argv = ("iperf3", "-c", SERVER_TUN, "-t", str(args.seconds), "-J")
                    proc = pair.client.run(*argv, check=False, timeout=args.seconds + 30)
                    try:
                        out = json.loads(proc.stdout)
                    except ValueError:
                        return None
                    return out if "sum_received" in out.get("end", {}) else None

                out = poll_until(attempt, 20, interval=0.3, what="iperf3")
            finally:
                srv.kill()
                srv.wait()
            cpu1 = [cpu_seconds(p) for p in pids]
            us1 = [user_sys(p) for p in pids]
            after = [counters(pair.server, tun, pair.server_if),
                     counters(pair.client, tun, pair.client_if)]  # fmt: skip
            poll_until(lambda: status(work, "server", name) != st0[0], 5, what="status rewrite")
            st1 = [status(work, r, name) for r in ("server", "client")]
            for spy in spies:
                spy.wait(timeout=args.seconds + 30)
    end = out["end"]
    mbps = end["sum_received"]["bits_per_second"] / 1e6
    retr = end["sum_sent"].get("retransmits")
    print(f"{name}: {mbps:,.0f} Mbit/s, retransmits {retr}, load {os.getloadavg()[0]:.1f}")
    for i, role in enumerate(("server", "client")):
        user, system = (us1[i][k] - us0[i][k] for k in (0, 1))
        print(f"{role}: cpu {cpu1[i] - cpu0[i]:.2f} s (user {user:.2f}, system {system:.2f}); "
              f"{_delta(before[i], after[i], keys)}")  # fmt: skip
        moved = [
            k for k in after[i] if any(w in k for w in ODD) and after[i][k] != before[i].get(k)
        ]
        print(f"  moved: {_delta(before[i], after[i], moved)}")
        print(f"  status drops {st1[i].get('drops')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
