"""Throughput of the protocol core's data path, without any I/O.

Run: `python -m bench.bench_core [--repeat N]` (each figure: best of N windows of ~16 MB).

For each cipher and payload size it measures, in MB/s of packet payload:
- seal+frame: `send_packets([pkt]) + data_to_send()`: one packet per call, as the daemon does for
  a GSO super-packet (64 KiB) or a plain MTU-sized read (1,400 bytes);
- seal+frame batched (1,400 only): 46 packets per call, one frame per sendbuf (64 KiB);
- unframe+open: `receive_data(frame)` on the peer, delivering the packets;
- the bare AEAD `encrypt` on the same size, as the ceiling the Python work is compared with.

Then a lone 84-byte packet's cost in µs, warm and with cold caches (`lone_packet`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from vpnd_runtime.proto import Connection, LinkUp, Params
from vpnd_runtime.proto.session import make_aead

CIPHERS = ["chacha20-poly1305", "aes-256-gcm", "aes-128-gcm"]
SIZES = [1400, 65536]
PSK = os.urandom(32)


def established(cipher: str) -> tuple[Connection, Connection]:
    """Two connected endpoints (in memory) using `cipher`; huge keyttl so no rekey interferes."""
    p = Params(cipher=cipher, keyttl=1e9, keepalive=1e9)
    wall = time.time()
    i = Connection("initiator", PSK, p, os.urandom, 0.0, wall=wall)
    r = Connection("responder", PSK, p, os.urandom, 0.0, wall=wall)
    i.start(0.0)
    r.receive_data(i.data_to_send(), 0.0)
    i.receive_data(r.data_to_send(), 0.0)
    events = r.receive_data(i.data_to_send(), 0.0)
    assert any(isinstance(e, LinkUp) for e in events)
    return i, r


def best_rate(fn: Callable[[], object], ops: int, payload: int, repeat: int) -> float:
    """Best of `repeat` windows of `ops` calls (as timeit: the least disturbed run); MB/s."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(ops):
            fn()
        best = min(best, time.perf_counter() - start)
    return ops * payload / best / 1e6


def measure(cipher: str, size: int, batch: int, repeat: int) -> tuple[float, float, float]:
    """(seal+frame MB/s, unframe+open MB/s, bare AEAD encrypt MB/s) for `batch` packets per call."""
    packets = [os.urandom(size) for _ in range(batch)]
    payload = size * batch
    ops = max(50, int(16e6 / payload))

    sender, receiver = established(cipher)

    def seal() -> bytes:
        sender.send_packets(packets, 0.0)
        return sender.data_to_send()

    frames = [seal() for _ in range(ops * (repeat + 1))]  # also the input of the open test
    seal_rate = best_rate(seal, ops, payload, repeat)

    feed = iter(frames)
    receive = receiver.receive_data
    open_rate = best_rate(lambda: receive(next(feed), 0.0), ops, payload, repeat)

    aead = make_aead(cipher, os.urandom(32))
    nonce = bytes(12)
    plain = b"".join(packets)
    aead_rate = best_rate(lambda: aead.encrypt(nonce, plain, b"header"), ops, payload, repeat)
    return seal_rate, open_rate, aead_rate


def lone_packet(cipher: str, samples: int) -> dict[str, tuple[float, float, float]]:
    """A ping's cost in the protocol core, warm and cold: p50 µs of seal+frame, unframe+open and
    the bare AEAD encrypt of one 84-byte packet, each called back to back (warm) or right after
    32 MiB were copied (cold: caches and TLBs hold other data, as after the ~10 ms a ping waits
    between packets while the rest of the machine runs). Issue 15 attributes vpnd's added RTT
    to cold caches; this is that effect on the code a packet runs in vpnd, without I/O."""
    ping = os.urandom(84)
    junk, zeros = bytearray(32 << 20), bytes(32 << 20)
    sender, receiver = established(cipher)
    aead = make_aead(cipher, os.urandom(32))
    nonce = bytes(12)
    clock = time.perf_counter_ns
    frames: list[bytes] = []

    def seal() -> None:
        sender.send_packets([ping], 0.0)
        frames.append(sender.data_to_send())

    def open_() -> None:
        receiver.receive_data(frames.pop(0), 0.0)

    def bare() -> None:
        aead.encrypt(nonce, ping, b"")

    def timed(fn: Callable[[], object], cold: bool) -> float:
        if cold:
            junk[:] = zeros  # 64 MiB of memory traffic: more than any cache here holds
        t0 = clock()
        fn()
        return (clock() - t0) / 1e3

    out = {}
    for name, cold in (("warm", False), ("cold", True)):
        figures = []
        for fn in (seal, open_, bare):  # open_ takes, in order, the frames seal just made
            figures.append(statistics.median(timed(fn, cold) for _ in range(samples)))
        out[name] = (figures[0], figures[1], figures[2])
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed windows per figure (best kept)")
    args = ap.parse_args(argv)
    rows = []
    for cipher in CIPHERS:
        for size, batch in [(1400, 1), (1400, 46), (65536, 1)]:
            seal, open_, aead = measure(cipher, size, batch, args.repeat)
            rows.append((cipher, size, batch, seal, open_, aead))
    head = f"{'cipher':<18} {'payload':>8} {'pkts/call':>9} {'seal+frame':>11} {'unframe+open':>13}"
    head += f" {'bare AEAD':>10} {'seal/AEAD':>9}"
    print(head)
    print("-" * len(head))
    for cipher, size, batch, seal, open_, aead in rows:
        print(
            f"{cipher:<18} {size:>8} {batch:>9} {seal:>8.0f} MB/s {open_:>10.0f} MB/s"
            f" {aead:>5.0f} MB/s {seal / aead:>9.2f}"
        )
    print("(MB/s of packet payload, 1 MB = 10^6 bytes; one core; no I/O)")
    print(
        "\nOne 84-byte packet (a ping), p50 µs over 200 calls: warm = back to back, "
        "cold = each call right after copying 32 MiB"
    )
    print(f"{'cipher':<18} {'caches':>6} {'seal+frame':>11} {'unframe+open':>13} {'bare AEAD':>10}")
    for cipher in CIPHERS[:2]:
        for name, (seal, open_, aead) in lone_packet(cipher, 200).items():
            print(f"{cipher:<18} {name:>6} {seal:>11.1f} {open_:>13.1f} {aead:>10.1f}")


if __name__ == "__main__":
    main()
