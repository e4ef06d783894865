"""The Python floor: what the barest possible Python relay does on this machine, beside vpnd.

    python -m bench.floor [--seconds 5] [--reps 3] [--pings 300]
                          [--only raw,floor,vpnd,wireguard-go]

Issue 15 and issue 10 set targets (added ping RTT ≤ 200 µs; ChaCha20 ≥ 0.30x raw veth; UDP
≥ 2x wireguard-go) that vpnd has not reached. This bench asks whether *any* Python design can
reach them here, by measuring, in the same run as vpnd and wireguard-go, a relay that does only
what no VPN can skip:

    epoll wait -> read the TUN (same offloads as vpnd: virtio-net header, TSO, 64 KiB
    super-packets) -> one AEAD call (cryptography, as vpnd) -> sendall on a TCP socket with a
    4-byte length; and back: recv -> cut frames -> one AEAD call -> write the TUN.

No handshake (a fixed key), no rekey, no keepalive, no routing table, no status, no replay
rules, no back-pressure beyond a blocking sendall: a relay nobody should deploy, and the least
work a Python process can do per packet. The relay runs in this same file (`--relay ROLE`),
started inside each namespace. Rows: floor without encryption (the TUN and socket copies alone),
floor with ChaCha20-Poly1305 and with AES-256-GCM, all three one thread waiting in epoll as vpnd
does; ChaCha20-Poly1305 again with one thread per direction, each blocked in its own read (as
wireguard-go's goroutines are); vpnd with both ciphers; wireguard-go when installed
(bench/peers.py).

Beside each row's Mbit/s and ping RTT p50/p99 (300 pings 10 ms apart), it prints
**machine ns/B**: the CPU time the *whole machine* spent (every process, the kernel, softirqs:
/proc/stat, all but idle and iowait) during the iperf3 runs, per byte delivered. On a machine
with N cores no path can go faster than N x 10⁹ / (machine ns/B) bytes per second, so this
column says what each design costs, whatever the scheduler made of it.

It ends with the **UDP budget**: the CPU that per-datagram AEAD calls alone (one seal and one
open of a 1,348-byte segment, the bare cryptography calls in a Python loop) need at a target
rate, next to what the inner TCP stack costs (the raw veth row's machine ns/B). If the two
already exceed the machine's cores, no Python design with per-datagram AEAD reaches the target
here, whatever else it does.

Needs root, iproute2, iperf3 and ping. Addresses: underlay 198.18.1.0/24 (namespace_pair),
tunnel 198.19.5.1/2.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from bench.bench_tunnel import SERVER_TUN, ping_rtt, vpnd_pair
from bench.peers import PEERS
from tests.helpers.netns import Pair, namespace_pair, new_tag, poll_until
from vpnd_runtime import heap
from vpnd_runtime.io.tun import Tun

FLOOR_SERVER, FLOOR_CLIENT = "198.19.5.1", "198.19.5.2"
FLOOR_PORT = 3790
READ_MAX = 65536 + 64
CIPHERS = ("chacha20-poly1305", "aes-256-gcm")
SEGMENT = 1348  # a full UDP-carrier segment's payload (vpnd's UDP mtu default, see docs)


# --- the relay (runs inside a namespace) ----------------------------------------------------


def _aead(cipher: str) -> object | None:
    """The AEAD object for `cipher` with a fixed key (both relays derive the same one), or None."""
    if cipher == "none":
        return None
    key = bytes(range(32))
    return ChaCha20Poly1305(key) if cipher.startswith("chacha") else AESGCM(key)


def relay(role: str, cipher: str, tun_name: str, peer_ip: str, design: str = "epoll") -> int:
    """Carry packets between a new TUN `tun_name` and one TCP connection, nothing more.

    `design`: "epoll", one thread waiting in epoll for either side (as vpnd does); "threads",
    one thread per direction, each blocked in its own read (as wireguard-go's goroutines are):
    a packet's arrival returns straight from the read, with no epoll_wait in between."""
    heap.tune()  # the floor pays no page faults either (vpnd_runtime/heap.py)
    local, remote = (
        (FLOOR_SERVER, FLOOR_CLIENT) if role == "server" else (FLOOR_CLIENT, FLOOR_SERVER)
    )
    tun = Tun.open(tun_name, offload=True)
    tun.configure(ipaddress.ip_address(local), ipaddress.ip_address(remote), mtu=1400)
    if role == "server":
        listener = socket.create_server(("0.0.0.0", FLOOR_PORT))
        sock, _ = listener.accept()
        listener.close()
    else:
        sock = socket.create_connection((peer_ip, FLOOR_PORT), timeout=10)
        sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    aead = _aead(cipher)
    enc = aead.encrypt if aead is not None else None
    dec = aead.decrypt if aead is not None else None
    nonce = struct.Struct("<4xQ").pack
    length = struct.Struct(">I")
    tunfd, sockfd = tun.fd, sock.fileno()
    read, write, sendall, recv = os.read, os.write, sock.sendall, sock.recv
    sent = received = 0
    buf = bytearray()

    def uplink() -> bool:
        """One packet from the TUN onto the connection (False: none was waiting)."""
        nonlocal sent
        try:
            packet = read(tunfd, READ_MAX)
        except BlockingIOError:
            return False
        if enc is not None:
            packet = enc(nonce(sent), packet, None)
            sent += 1
        sendall(length.pack(len(packet)) + packet)
        return True

    def downlink() -> bool:
        """What the connection has, cut into frames, onto the TUN (False: it closed)."""
        nonlocal received, buf
        data = recv(1 << 18)
        if not data:
            return False
        buf += data
        while len(buf) >= 4:
            (n,) = length.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            frame = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            if dec is not None:
                frame = dec(nonce(received), frame, None)
                received += 1
            write(tunfd, frame)
        return True

    print("ready", flush=True)
    if design == "threads":
        os.set_blocking(tunfd, True)

        def uplink_forever() -> None:
            while True:
                uplink()

        threading.Thread(target=uplink_forever, daemon=True).start()
        while downlink():
            pass
        return 0
    ep = select.epoll()
    ep.register(tunfd, select.EPOLLIN)
    ep.register(sockfd, select.EPOLLIN)
    while True:
        for fd, _ in ep.poll():
            if fd == tunfd:
                uplink()
            elif not downlink():
                return 0


# --- the driver -------------------------------------------------------------------------------


def machine_busy() -> float:
    """Seconds of CPU the whole machine has spent on anything but idle and iowait (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class FloorRow:
    """One line of the table."""

    path: str
    mbps: float | None = None
    rtt: tuple[float, float] | None = None
    machine_ns: float | None = None
    note: str = ""


def measure(row: FloorRow, pair: Pair, target: str, args: argparse.Namespace) -> None:
    """Pings, then `reps` iperf3 runs with the whole machine's CPU time counted over each."""
    poll_until(lambda: pair.client.ping(target, timeout=1), 20, what=f"ping {target}")
    row.rtt = ping_rtt(pair, target, args.pings)
    server = subprocess.Popen(
        pair.server.cmd("iperf3", "-s", "-B", target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rates: list[float] = []
    busy = 0.0
    delivered = 0

    def attempt() -> dict | None:
        nonlocal busy
        before = machine_busy()
        proc = pair.client.run(
            "iperf3", "-c", target, "-t", str(args.seconds), "-J",
            check=False, timeout=args.seconds + 30,
        )  # fmt: skip
        spent = machine_busy() - before
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            return None
        received = out.get("end", {}).get("sum_received")
        if not received:
            return None
        busy += spent
        return received

    try:
        for _ in range(args.reps):
            received = poll_until(attempt, 20, interval=0.3, what="iperf3 run")
            rates.append(received["bits_per_second"] / 1e6)
            delivered += int(received["bytes"])
    finally:
        server.kill()
        server.wait()
    row.mbps = statistics.median(rates)
    row.machine_ns = busy * 1e9 / delivered if delivered else None


@contextmanager
def floor_pair(pair: Pair, cipher: str, log: Path, design: str = "epoll") -> Iterator[None]:
    """Start the two relays (server first) and stop them, by PID, on exit."""
    procs: list[subprocess.Popen[str]] = []
    errors = open(log, "a")  # noqa: SIM115 (closed below, after the relays that write to it)
    try:
        for role, ns in (("server", pair.server), ("client", pair.client)):
            argv = ns.cmd(
                sys.executable, "-m", "bench.floor", "--relay", role, "--cipher", cipher,
                "--tun", f"{pair.tag}f", "--peer", pair.server_ip, "--design", design,
            )  # fmt: skip
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            procs.append(proc)
            if role == "server":
                # The server prints "ready" only after accept, so wait for its listener instead.
                poll_until(
                    lambda ns=ns: f":{FLOOR_PORT:04X}" in ns.run("cat", "/proc/net/tcp").stdout,
                    10,
                    what="floor relay listening",
                )
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor relay did not start; see {log}")
        yield
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errors.close()


def udp_budget(raw_ns: float | None, targets: dict[str, float], cores: int) -> list[str]:
    """Lines of the UDP budget table: the bare AEAD calls' CPU at each target rate."""
    aead = ChaCha20Poly1305(os.urandom(32))
    segs = [os.urandom(SEGMENT) for _ in range(64)]
    nonces = [struct.pack("<4xQ", i) for i in range(64)]
    sealed = [aead.encrypt(n, s, None) for n, s in zip(nonces, segs, strict=True)]
    enc, dec = aead.encrypt, aead.decrypt

    def per_segment(fn: object) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                fn()  # type: ignore[operator]
            best = min(best, (time.perf_counter() - t) / (200 * 64))
        return best

    seal = per_segment(lambda: [enc(n, s, None) for n, s in zip(nonces, segs, strict=True)])
    opn = per_segment(lambda: [dec(n, s, None) for n, s in zip(nonces, sealed, strict=True)])
    lines = [
        "",
        f"UDP budget ({cores} cores): per {SEGMENT}-byte segment the bare seal costs "
        f"{seal * 1e6:.2f} µs and the bare open {opn * 1e6:.2f} µs (best of 5, a Python loop of "
        "cryptography calls and nothing else)",
        "",
        "| target | Mbit/s | segments/s | AEAD calls, CPU-s/s | inner TCP stack (raw row), CPU-s/s "
        "| sum | cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mbps in targets.items():
        per_s = mbps * 1e6 / 8 / SEGMENT
        aead_cpu = per_s * (seal + opn)
        stack = (raw_ns or 0.0) * mbps * 1e6 / 8 / 1e9
        lines.append(
            f"| {name} | {mbps:,.0f} | {per_s:,.0f} | {aead_cpu:.2f} | {stack:.2f} "
            f"| {aead_cpu + stack:.2f} | {cores} |"
        )
    lines.append(
        "The sum leaves out the kernel's UDP, GSO/GRO and TUN work and every Python step beyond "
        "the AEAD call; where it already reaches the cores, the target is out of reach here."
    )
    return lines


def print_table(rows: list[FloorRow], raw: FloorRow) -> None:
    """The table, with added RTT and the ratio to raw veth."""
    base = raw.rtt[0] if raw.rtt else 0.0
    print(
        "| path | Mbit/s | ÷ raw | RTT p50 µs | p99 µs | added RTT µs | machine ns/B |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        if row.mbps is None:
            print(f"| {row.path} | | | | | | | {row.note}")
            continue
        ratio = f"{row.mbps / raw.mbps:.2f}" if raw.mbps else ""
        p50, p99 = row.rtt or (0.0, 0.0)
        added = "—" if row is raw else f"{p50 - base:.0f}"
        ns = f"{row.machine_ns:.2f}" if row.machine_ns else ""
        print(
            f"| {row.path} | {row.mbps:,.0f} | {ratio} | {p50:.0f} | {p99:.0f} | {added} | {ns} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="iperf3 runs per row (median; default 3)")
    ap.add_argument("--pings", type=int, default=300, help="pings per row (default 300)")
    ap.add_argument("--only", default="", help="comma-separated: raw, floor, vpnd, wireguard-go")
    ap.add_argument("--relay", choices=("server", "client"), help=argparse.SUPPRESS)
    ap.add_argument("--cipher", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--tun", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--design", default="epoll", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.relay:
        return relay(args.relay, args.cipher, args.tun, args.peer, args.design)

    wanted = set(filter(None, args.only.split(","))) or {"raw", "floor", "vpnd", "wireguard-go"}
    for tool in ("ip", "iperf3", "ping"):
        if not shutil.which(tool):
            print(f"needs {tool}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN, ping -i 0.01)", file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[FloorRow] = []
    with (
        tempfile.TemporaryDirectory(prefix="vb-floor-") as tmp,
        namespace_pair(new_tag("vf")) as pair,
    ):
        work = Path(tmp)
        raw = FloorRow("raw veth (MTU 1500)")
        measure(raw, pair, pair.server_ip, args)
        rows.append(raw)

        def done(row: FloorRow) -> None:
            rows.append(row)
            print(f"  measured {row.path}", file=sys.stderr, flush=True)

        if "floor" in wanted:
            for cipher, design in (
                ("none", "epoll"),
                *((c, "epoll") for c in CIPHERS),
                (CIPHERS[0], "threads"),
            ):
                row = FloorRow(f"Python floor relay, {cipher}, {design}")
                with floor_pair(pair, cipher, work / "floor.log", design):
                    measure(row, pair, FLOOR_SERVER, args)
                done(row)
        if "vpnd" in wanted:
            for cipher in CIPHERS:
                row = FloorRow(f"vpnd TCP, {cipher}")
                with vpnd_pair(pair, work, cipher):
                    measure(row, pair, SERVER_TUN, args)
                done(row)
        for peer in PEERS:
            if peer.label not in wanted:
                continue
            row = FloorRow(peer.label)
            if peer.missing_tools():
                row.note = f"not installed ({', '.join(peer.missing_tools())}): skipped"
            else:
                with peer.start(pair) as tunnel:
                    measure(row, pair, tunnel.server_addr, args)
            done(row)
    print_table(rows, raw)
    wg = next((r for r in rows if r.path == "wireguard-go" and r.mbps), None)
    targets = {}
    if raw.mbps:
        targets["issue 15: ChaCha20 0.30x raw (as UDP)"] = 0.30 * raw.mbps
    if wg is not None and wg.mbps:
        targets["issue 10: UDP 2x wireguard-go"] = 2 * wg.mbps
        targets["wireguard-go's own rate"] = wg.mbps
    print("\n".join(udp_budget(raw.machine_ns, targets, os.cpu_count() or 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
