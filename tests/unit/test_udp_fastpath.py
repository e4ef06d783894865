"""The UDP hot paths of the protocol core keep the meaning of the plain code they replace:
`SendState.seal_datagrams` seals the same bytes as one `seal_prefixed` per batch, and the
receiver's inlined replay window accepts exactly what RFC 6479's window says (any order, any
duplicates, any loss), counting every refusal."""

from __future__ import annotations

import os
import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from vpnd_runtime.proto.connection import INDEX_LEN, Connection, Params
from vpnd_runtime.proto.events import Packets
from vpnd_runtime.proto.session import REPLAY_WINDOW, SendState, make_aead

PSK = bytes(range(32))
WALL = 1_700_000_000.0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(1, 120), st.integers(1300, 1500), st.integers(1400, 1420)),
        max_size=60,
    ),
    limit=st.sampled_from([1414, 1500, 200, 65536]),
    cipher=st.sampled_from(["chacha20-poly1305", "aes-256-gcm"]),
    counter=st.integers(0, 2**40),
)
def test_seal_datagrams_equals_one_seal_per_batch(
    sizes: list[int], limit: int, cipher: str, counter: int
) -> None:
    key = bytes(range(1, 33))
    fast, slow = (SendState(make_aead(cipher, key), 7, 0.0) for _ in range(2))
    fast.counter = slow.counter = counter
    packets = [bytes([n & 0xFF]) * n for n in sizes]
    got: list[bytes] = []
    want: list[bytes] = []
    n_fast = fast.seal_datagrams(b"\0\0\x11\x11", packets, limit, got)
    n_slow = slow._seal_datagrams_slow(b"\0\0\x11\x11", packets, limit, want)
    assert got == want and n_fast == n_slow == len(got)
    assert fast.counter == slow.counter == counter + len(got)


def _established() -> tuple[Connection, Connection]:
    params = Params(datagram=True, sendbuf=1414, keepalive=1e6, keyttl=1e6)
    i = Connection("initiator", PSK, params, os.urandom, 0.0, wall=WALL, index=0x1111)
    r = Connection("responder", PSK, params, os.urandom, 0.0, wall=WALL, index=0x2222)
    i.start(0.0)
    for src, dst in ((i, r), (r, i), (i, r)):
        dst.receive_datagrams([d[INDEX_LEN:] for d in src.datagrams_to_send()], 0.0)
    return i, r


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3 * REPLAY_WINDOW),
    seed=st.integers(0, 2**32),
    shuffle_span=st.sampled_from([1, 8, 300, 5000]),
    dup=st.floats(0, 0.3),
    loss=st.floats(0, 0.3),
)
@example(n=1, seed=1170, shuffle_span=1, dup=0.0, loss=0.25)  # the only datagram lost
def test_inlined_replay_window_accepts_exactly_what_rfc6479_accepts(
    n: int, seed: int, shuffle_span: int, dup: float, loss: float
) -> None:
    rnd = random.Random(seed)
    i, r = _established()
    sent = []
    for k in range(n):  # one packet per datagram, its number inside
        i.send_packets([k.to_bytes(4, "big") + bytes(1396)], 0.0)
        sent += i.datagrams_to_send()
    # Reorder within windows of `shuffle_span`, lose some, replay some (possibly much later).
    order = sorted(range(n), key=lambda k: k + rnd.uniform(0, shuffle_span))
    wire = [k for k in order if rnd.random() >= loss]
    for _ in range(int(len(wire) * dup)):
        wire.insert(rnd.randrange(len(wire) + 1), rnd.choice(wire or [0]))
    # The model: a counter is accepted if above the top, or within the window and unseen. The
    # initiator's CONFIRM (counter 0) was accepted in the handshake.
    top, seen, want, refused = 0, {0}, [], 0
    for k in wire:
        counter = k + 1
        if counter > top or (top - counter < REPLAY_WINDOW and counter not in seen):
            seen.add(counter)
            top = max(top, counter)
            want.append(k)
        else:
            refused += 1
    got = []
    pos = 0
    while pos < len(wire):  # in reads of 1..64 datagrams, as GRO hands them
        step = rnd.randint(1, 64)
        grams = [memoryview(sent[k])[INDEX_LEN:] for k in wire[pos : pos + step]]
        pos += step
        for ev in r.receive_datagrams(grams, 0.0):
            if isinstance(ev, Packets):
                got += [int.from_bytes(p[:4], "big") for p in ev.packets]
    assert got == want
    assert r.stats.drops.get("replay", 0) == refused
    assert r.stats.packets_in == len(want)
    assert r._recv[r._recv_epoch].window.top == top
    assert r._recv[r._recv_epoch].next_counter == top + 1
