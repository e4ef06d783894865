"""A lone packet's cost in the daemon's own loop, in one process, warm and with cold caches.

    python -m bench.lone_path [--samples 200] [--cipher chacha20-poly1305]

Theory of operation: two real `Daemon` objects (client and server of one point-to-point link)
run their real loop turns (`Daemon._turn`: epoll wait, dispatch, the TUN and carrier callbacks,
seal/open, timers, status) on real fds, in this process, without namespaces or a kernel TUN: the
carrier is a connected socket pair (TCP: AF_UNIX stream; UDP: AF_UNIX datagram), and each TUN is
one end of an AF_UNIX SOCK_SEQPACKET pair (a packet per read and write, as a TUN; the test holds
the other end and plays the kernel). One ping is four turns: client TUN -> carrier, server
carrier -> TUN, (the test answers) server TUN -> carrier, client carrier -> TUN. Each turn is
timed from the moment its epoll wait returned to the end of the turn (`after wake`, what a ping
waits for) and whole (`turn`, which also counts the deadline work before the wait).

Cold: before each of the turns 1, 2 and 4, 32 MiB are copied, so caches and TLBs hold other data
as after the ~10 ms a ping waits (bench_core's cold figures do the same for the protocol core
alone); turn 3 follows turn 2 at once, as in the daemon (the kernel answers inside turn 2's TUN
write). The figures are in-process and exclude the kernel's work (TUN, TCP, wake-ups): they are
the part of issue 15's latency that vpnd's own Python path costs, to compare versions of the
path under the same conditions (bench/latency_probe.py measures the real thing). On a shared
machine the times swing by 2x between runs, so `--count` prints what does not: the Python calls,
C calls and bytecodes each turn executes (sys.settrace/setprofile), i.e. the path's length.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vpnd_runtime.config import parse_config
from vpnd_runtime.daemon import Daemon
from vpnd_runtime.io import poller, tcp
from vpnd_runtime.io.tun import Tun, TunWriter
from vpnd_runtime.keyfile import generate_key
from vpnd_runtime.proto.connection import Connection
from vpnd_runtime.proto.events import LinkUp
from vpnd_runtime.session import load_table, params_from_config

HDR = bytes(10)  # a virtio-net header with nothing to do
PING = HDR + b"\x45" + bytes(83)  # an 84-byte IPv4 packet (contents do not matter here)


class _Clock:
    """The daemons' epoll objects, noting when each wait returned with ready fds."""

    woke = 0

    def __init__(self) -> None:
        self.real = poller.select.epoll()
        for name in ("register", "modify", "unregister", "close", "fileno"):
            setattr(self, name, getattr(self.real, name))

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        ready = self.real.poll(timeout, maxevents)
        _Clock.woke = time.perf_counter_ns()
        return ready


def _daemon(work: Path, role: str, cipher: str, extra: str = "") -> Daemon:
    key = work / "link.key"
    if not key.exists():
        generate_key(key, randomdev="/dev/urandom")
    local, remote = (
        ("198.18.0.1", "198.18.0.2") if role == "server" else ("198.18.0.2", "198.18.0.1")
    )
    text = (
        f"mode {role}\nserver {'0' if role == 'server' else '198.18.0.1'} 379\n"
        f"local {local}\nremote {remote}\ncipher {cipher}\nkeyfile {key}\n"
        f"randomdev /dev/urandom\ninterface lp{role[0]}\nstatusfile {work}/{role}.json\n"
        f"keepalive 60\n{extra}"
    )
    config = parse_config(text, str(work / f"{role}.conf"))
    return Daemon(config, load_table(config))


def _link(
    cipher: str, work: Path, extra: str = ""
) -> tuple[Daemon, Daemon, socket.socket, socket.socket]:
    """Client and server daemons joined by a loopback TCP connection, each with a fake TUN (`extra`:
    more directives for both); returns them
    and the test's ends of their TUNs."""
    poller._epoll = _Clock
    c, s = _daemon(work, "client", cipher, extra), _daemon(work, "server", cipher, extra)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ca = socket.create_connection(listener.getsockname())
        sa, _ = listener.accept()
    now = time.monotonic()
    wall = time.time()
    params = params_from_config(c.config)
    psk = c.peer.key
    ic = Connection("initiator", psk, params, os.urandom, now, wall=wall)
    rs = Connection("responder", psk, params, os.urandom, now, wall=wall)
    ic.start(now)
    rs.receive_data(ic.data_to_send(), now)
    ic.receive_data(rs.data_to_send(), now)
    events = rs.receive_data(ic.data_to_send(), now)
    assert any(isinstance(e, LinkUp) for e in events)
    ends = []
    for d, sock, conn in ((c, ca, ic), (s, sa, rs)):
        session = d.add_pending(tcp.TcpCarrier(sock, "peer"), conn, now)
        d.pending.remove(session)
        session.peer = d.peer
        session.up = True
        d.peer.session = session
        tun_end, test_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tun_end.setblocking(False)
        d._keep = (tun_end, sock)  # type: ignore[attr-defined]
        d.link.tun = Tun(name="fake", fd=tun_end.fileno())
        d.link.writer = TunWriter(tun_end.fileno())
        d.link.up_count = 1
        d._watch_tun(True)
        d._publish(force=True)
        ends.append(test_end)
    return c, s, ends[0], ends[1]


def measure(cipher: str, samples: int) -> dict[str, list[tuple[float, float]]]:
    """{'warm'|'cold': [(after-wake µs, turn µs) for each of the 4 turns, p50 over samples]}"""
    junk, zeros = bytearray(32 << 20), bytes(32 << 20)
    clock = time.perf_counter_ns
    out = {}
    with tempfile.TemporaryDirectory(prefix="vb-lone-") as tmp:
        c, s, ct, st = _link(cipher, Path(tmp))
        for name, cold in (("warm", False), ("cold", True)):
            figures: list[list[tuple[float, float]]] = [[], [], [], []]

            def turn(d: Daemon, k: int, evict: bool, figures: list = figures) -> None:
                if evict:
                    junk[:] = zeros
                t0 = clock()
                d._turn()
                t1 = clock()
                figures[k].append(((t1 - _Clock.woke) / 1e3, (t1 - t0) / 1e3))

            for _ in range(samples + 5):
                ct.send(PING)
                turn(c, 0, cold)
                turn(s, 1, cold)
                st.send(st.recv(70000))  # the kernel answers the ping inside the TUN write
                turn(s, 2, False)
                turn(c, 3, cold)
                got = ct.recv(70000)
                assert got == PING, got
            out[name] = [
                (statistics.median(a for a, _ in f[5:]), statistics.median(b for _, b in f[5:]))
                for f in figures
            ]
        for d in (c, s):
            d.link.writer.close()
            d.sel.close()
    return out


def count(cipher: str) -> list[tuple[int, int, int]]:
    """(Python calls, C calls, bytecodes) each of the 4 turns of one warm ping executes: the
    path's length, free of the timing noise of a shared machine."""
    figures = []
    with tempfile.TemporaryDirectory(prefix="vb-lone-") as tmp:
        c, s, ct, st = _link(cipher, Path(tmp))
        tally = [0, 0, 0]

        def trace(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "call":
                tally[0] += 1
                frame.f_trace_opcodes = True
            elif event == "opcode":
                tally[2] += 1
            return trace

        def profile(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "c_call":
                tally[1] += 1

        def turn(d: Daemon) -> None:
            tally[:] = [0, 0, 0]
            sys.settrace(trace)
            sys.setprofile(profile)
            try:
                d._turn()
            finally:
                sys.settrace(None)
                sys.setprofile(None)
            figures.append((tally[0], tally[1], tally[2]))

        for _ in range(3):  # the last ping counts (the first ones warm the caches of lookups)
            figures.clear()
            ct.send(PING)
            turn(c)
            turn(s)
            st.send(st.recv(70000))
            turn(s)
            turn(c)
            ct.recv(70000)
        for d in (c, s):
            d.link.writer.close()
            d.sel.close()
    return figures


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--cipher", default="chacha20-poly1305")
    ap.add_argument("--count", action="store_true", help="count calls and bytecodes instead")
    args = ap.parse_args(argv)
    names = ["C TUN -> carrier", "S carrier -> TUN", "S TUN -> carrier", "C carrier -> TUN"]
    if args.count:
        counted = count(args.cipher)
        print(f"{'turn':<18} {'Py calls':>9} {'C calls':>8} {'bytecodes':>10}")
        for n, (py, cc, ops) in zip(names, counted, strict=True):
            print(f"{n:<18} {py:>9} {cc:>8} {ops:>10}")
        print(
            f"{'one ping':<18} {sum(x[0] for x in counted):>9} {sum(x[1] for x in counted):>8}"
            f" {sum(x[2] for x in counted):>10}"
        )
        return
    res = measure(args.cipher, args.samples)
    print(
        f"vpnd {args.cipher} over TCP; p50 µs over {args.samples} pings; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'turn':<18} {'warm wake':>10} {'warm turn':>10} {'cold wake':>10} {'cold turn':>10}")
    for k, n in enumerate(names):
        (ww, wt), (cw, ct) = res["warm"][k], res["cold"][k]
        print(f"{n:<18} {ww:>10.1f} {wt:>10.1f} {cw:>10.1f} {ct:>10.1f}")
    tw = sum(x[0] for x in res["warm"])
    tc = sum(x[0] for x in res["cold"])
    print(f"{'sum after wake':<18} {tw:>10.1f} {'':>10} {tc:>10.1f}")


if __name__ == "__main__":
    main()
