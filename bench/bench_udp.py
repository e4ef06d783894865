"""vpnd over UDP against vpnd over TCP and wireguard-go, on a clean veth and through a lossy WAN.

    python -m bench.bench_udp [--seconds 8] [--reps 1] [--losses 0,0.1,1,3] [--delay 10ms]
                              [--cc cubic] [--only lan|wan]

Single TCP stream (iperf3, client -> server) through each tunnel, every row in one run:

1. **LAN**: two namespaces joined by veth (198.18.1.0/24): raw veth; vpnd UDP and vpnd TCP, each
   with ChaCha20-Poly1305 and AES-256-GCM; wireguard-go (bench/peers.py: $WIREGUARD_GO or the
   0.0.20231211 build /work/shared/tools/get-wireguard-go-2023.sh unpacks). Mbit/s, ratio to raw
   veth, and each daemon's CPU ns per delivered byte (server/client).
2. **WAN**: the same two hosts through the lab's WAN emulator (tests/helpers/wan.py) with
   `delay` each way (default 10 ms: 20 ms RTT) and each loss rate (per packet, both directions):
   raw path, vpnd UDP, vpnd TCP (ChaCha20-Poly1305), wireguard-go; Mbit/s and the inner TCP's
   retransmits, with the ratios the issue sets targets for (UDP/wireguard-go, UDP/TCP). vpnd
   TCP runs twice when the host's default congestion control is not CUBIC: with the default
   (its carrier socket's, e.g. BBR, which ignores random loss) and with CUBIC set per carrier
   socket (TCP_CONGESTION through a sitecustomize: the sysctl is refused in the namespaces
   here), the default of most Linux hosts and so the realistic TCP-over-TCP case.

The machine is shared with other jobs: absolute figures move with its load (printed before and
after), ratios within one table are what count. Needs root, iproute2, iperf3, ping (and `wg` for
the wireguard-go rows, which are skipped with a note when it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.bench_tunnel import iperf as iperf_cpu
from bench.bench_wan import iperf as iperf_retr
from bench.peers import wireguard_go, wireguard_go_binary
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until, vpnd
from vpnd_runtime.keyfile import generate_key

SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
PORT = 379
WG_TARGET = "198.19.2.1"  # bench/peers.py WG_SERVER


@contextmanager
def vpnd_link(pair: Pair, work: Path, cipher: str, transport: str) -> Iterator[tuple[int, int]]:
    """A vpnd server and client over `transport` with `cipher`; yields their PIDs once up."""
    key = work / "bench.key"
    if not key.exists():
        generate_key(key, randomdev="/dev/urandom")
    name = f"{transport}-{cipher}"
    confs = {}
    for role, local, remote in (
        ("server", SERVER_TUN, CLIENT_TUN),
        ("client", CLIENT_TUN, SERVER_TUN),
    ):
        server_line = f"server 0 {PORT}" if role == "server" else f"server {pair.server_ip} {PORT}"
        conf = work / f"{role}-{name}.conf"
        conf.write_text(
            f"mode {role}\n{server_line}\ntransport {transport}\nlocal {local}\nremote {remote}\n"
            f"cipher {cipher}\nkeyfile {key}\nrandomdev /dev/urandom\ninterface {pair.tag}t\n"
            f"statusfile {work}/{role}-{name}.status.json\nkeepalive 5\n"
        )
        confs[role] = conf

    def state(role: str) -> str | None:
        try:
            return json.loads((work / f"{role}-{name}.status.json").read_text()).get("state")
        except (OSError, ValueError):
            return None

    with (
        vpnd(pair.server, confs["server"], work, f"server-{name}") as s,
        vpnd(pair.client, confs["client"], work, f"client-{name}") as c,
    ):
        poll_until(lambda: state("server") == "up" and state("client") == "up", 30, what="up")
        poll_until(lambda: pair.client.ping(SERVER_TUN, timeout=1), 20, what="tunnel ping")
        yield s.pid, c.pid


_SITECUSTOMIZE = """\
# bench_udp: give every TCP socket of this Python process the congestion control named in
# $VPND_BENCH_CARRIER_CC (per socket, TCP_CONGESTION: allowed to root in a namespace where the
# net.ipv4.tcp_congestion_control sysctl is refused).
import os as _os, socket as _socket
_CC = _os.environ.get("VPND_BENCH_CARRIER_CC", "").encode()
if _CC:
    _init = _socket.socket.__init__
    def _with_cc(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.type == _socket.SOCK_STREAM and self.family in (_socket.AF_INET, _socket.AF_INET6):
            try:
                self.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_CONGESTION, _CC)
            except OSError:
                pass
    _socket.socket.__init__ = _with_cc
"""


@contextmanager
def carrier_cc(cc: str | None, work: Path) -> Iterator[None]:
    """vpnd processes started inside use congestion control `cc` on their TCP carrier sockets
    (a sitecustomize on PYTHONPATH sets TCP_CONGESTION per socket; the daemon is unchanged);
    None: the host's default."""
    if cc is None:
        yield
        return
    site = work / "carrier-cc"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "VPND_BENCH_CARRIER_CC")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), saved["PYTHONPATH"]) if p)
    os.environ["VPND_BENCH_CARRIER_CC"] = cc
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def lan_table(args: argparse.Namespace, work: Path) -> None:
    rows: list[tuple[str, float | None, str]] = []
    with namespace_pair(new_tag("vbu")) as pair:
        raw, _ = iperf_cpu(pair, pair.server_ip, args.seconds, args.reps)
        rows.append(("raw veth (MTU 1500)", raw, ""))
        for transport in ("udp", "tcp"):
            for cipher in ("chacha20-poly1305", "aes-256-gcm"):
                with vpnd_link(pair, work, cipher, transport) as pids:
                    mbps, cpu = iperf_cpu(pair, SERVER_TUN, args.seconds, args.reps, pids)
                rows.append((f"vpnd {transport.upper()}, {cipher}", mbps, _cpu(cpu)))
        secs, reps = args.seconds, args.reps
        rows.append(_wg_row(pair, lambda p, pids: iperf_cpu(p, WG_TARGET, secs, reps, pids)))
    print(f"\nLAN: single TCP stream, iperf3 -t {args.seconds}, median of {args.reps}")
    print(f"{'path':<36} {'Mbit/s':>8} {'÷ raw':>6}  CPU ns/B server/client, note")
    for name, mbps, note in rows:
        if mbps is None:
            print(f"{name:<36} {'-':>8} {'-':>6}  {note}")
        else:
            print(f"{name:<36} {mbps:>8,.0f} {mbps / raw:>6.2f}  {note}")
    figures = {n: m for n, m, _ in rows}
    wg = figures.get("wireguard-go")
    udp = figures.get("vpnd UDP, chacha20-poly1305")
    if wg and udp:
        print(f"vpnd UDP (ChaCha20) ÷ wireguard-go: {udp / wg:.2f}  (issue target: >= 2)")


def _cpu(cpu: tuple[float, ...]) -> str:
    return "/".join(f"{c:.2f}" for c in cpu) if cpu else ""


def _wg_row(
    pair: Pair, measure: Callable[[Pair, tuple[int, ...]], tuple]
) -> tuple[str, float | None, str]:
    if wireguard_go_binary() is None:
        return ("wireguard-go", None, "not installed: skipped")
    try:
        with wireguard_go(pair) as tunnel:
            result = measure(pair, tunnel.pids)
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        return ("wireguard-go", None, f"failed: {str(exc).splitlines()[0]}")
    mbps = result[0]
    extra = _cpu(result[1]) + ", " if isinstance(result[1], tuple) else f"retr {result[1]}, "
    return ("wireguard-go", mbps, extra + tunnel.note)


def wan_table(args: argparse.Namespace, work: Path) -> None:
    from tests.helpers.wan import wan_pair  # noqa: PLC0415 — the emulator only for this table

    host = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    cc = args.cc or host
    # vpnd's TCP carrier twice: with the host's default congestion control and, when that is
    # not it, with CUBIC (the default of most Linux hosts; BBR ignores random loss and so hides
    # what loss does to TCP over TCP).
    carriers = [host] + (["cubic"] if host != "cubic" else [])
    tcp_cols = [f"TCP/{c}" for c in carriers]
    print(f"\nWAN: delay {args.delay} each way, loss per packet both ways; inner TCP: {cc}; "
          f"vpnd's TCP carrier: {' and '.join(carriers)} (host default: {host}); "
          f"iperf3 -t {args.seconds}")  # fmt: skip
    head = "".join(f" {c:>10}" for c in tcp_cols)
    ratios = "".join(f" {'UDP÷' + c:>11}" for c in tcp_cols)
    print(f"{'loss':>5}  {'raw':>7} {'vpnd UDP':>9}{head} {'wg-go':>7}  {'UDP÷wg':>7}{ratios}"
          f"  retransmits raw/UDP/{'/'.join(tcp_cols)}/wg")  # fmt: skip
    for loss in args.losses:
        spec = f"delay={args.delay}" + (f",loss={loss}%" if loss else "") + ",seed=3"
        figures: dict[str, tuple[float, int] | None] = {}
        with wan_pair(spec, new_tag("vbw")) as wp:
            pair = Pair(wp.tag, wp.b, wp.a, "wan0", "wan0")

            def run(target: str) -> tuple[float, int]:
                return iperf_retr(wp.a, wp.b, target, args.seconds, args.cc)

            figures["raw"] = run(wp.b_ip)
            with vpnd_link(pair, work, "chacha20-poly1305", "udp"):
                figures["udp"] = run(SERVER_TUN)
            for carrier, col in zip(carriers, tcp_cols, strict=True):
                with (
                    carrier_cc(None if carrier == host else carrier, work),
                    vpnd_link(pair, work, "chacha20-poly1305", "tcp"),
                ):
                    figures[col] = run(SERVER_TUN)
            _, mbps, note = _wg_row(pair, lambda p, pids: run(WG_TARGET))
            figures["wg"] = None if mbps is None else (mbps, int(note.split()[1].rstrip(",")))

        def cell(key: str, width: int, figures: dict = figures) -> str:
            v = figures.get(key)
            return f"{v[0]:>{width},.0f}" if v else f"{'-':>{width}}"

        def ratio(a: str, b: str, figures: dict = figures) -> str:
            x, y = figures.get(a), figures.get(b)
            return f"{x[0] / y[0]:.2f}" if x and y and y[0] else "-"

        keys = ("raw", "udp", *tcp_cols, "wg")
        retr = "/".join(str(figures[k][1]) if figures.get(k) else "-" for k in keys)
        tcp_cells = "".join(f" {cell(c, 10)}" for c in tcp_cols)
        tcp_ratios = "".join(f" {ratio('udp', c):>11}" for c in tcp_cols)
        print(f"{loss:>4g}%  {cell('raw', 7)} {cell('udp', 9)}{tcp_cells} {cell('wg', 7)}  "
              f"{ratio('udp', 'wg'):>7}{tcp_ratios}  {retr}", flush=True)  # fmt: skip
    print("issue targets at 1 % loss: UDP ÷ wireguard-go >= 0.8, UDP ÷ TCP >= 3")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_udp")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--losses", default="0,0.1,1,3", help="loss percentages for the WAN table")
    ap.add_argument("--delay", default="10ms", help="one-way WAN delay (RTT = twice this)")
    ap.add_argument("--cc", help="inner TCP congestion control for the WAN table (iperf3 -C)")
    ap.add_argument("--only", choices=("lan", "wan"))
    args = ap.parse_args(argv)
    args.losses = [float(x) for x in args.losses.split(",") if x.strip()]
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces)")
        return 0
    print(f"load average before: {_load()} (the machine is shared: ratios count)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vb-udp-") as tmp:
        if args.only in (None, "lan"):
            lan_table(args, Path(tmp))
        if args.only in (None, "wan"):
            wan_table(args, Path(tmp))
    print(f"load average after: {_load()}; {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
