"""The serial line's scheduler: urgent packets first, line-sized frames, a bounded bulk queue,
and a pacer that never lets more than a few milliseconds of bytes run ahead of the line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vpnd_runtime.linequeue import LEAD_SECONDS, URGENT_MAX, LineQueue, Pacer, line_rate


def test_urgent_packets_jump_the_bulk_queue_and_never_share_a_frame_with_bulk() -> None:
    q = LineQueue(115200)
    bulk = [bytes(1400) for _ in range(3)]
    ping = bytes(84)
    q.push(bulk[:2])
    q.push([ping])
    q.push(bulk[2:])
    assert q.take() == [ping]  # first, and alone (a bulk packet would hold the line 120 ms)
    assert q.take() == [bulk[0]]  # one 1,400-byte packet is more than 50 ms of line time
    assert q.take() == [bulk[1]]
    assert q.take() == [bulk[2]]
    assert q.take() == []


def test_small_bulk_packets_share_a_frame_up_to_the_budget() -> None:
    q = LineQueue(115200)  # 11,520 B/s -> a 576-byte frame budget
    packets = [bytes(URGENT_MAX + 44) for _ in range(5)]  # 300 bytes each: bulk
    q.push(packets)
    assert [len(q.take()) for _ in range(3)] == [1, 1, 1]  # 300 + 300 > 576
    fast = LineQueue(4_000_000)  # 400 KB/s -> 20,000-byte budget
    fast.push(packets)
    assert fast.take() == packets


def test_the_bulk_queue_is_bounded_and_counts_what_it_drops() -> None:
    q = LineQueue(9600)  # 960 B/s: 1.5 s is 1,440 bytes, so the floor of 4 packets applies
    q.push([bytes(1500) for _ in range(10)])
    assert len(q.bulk) == 4
    assert q.drops == {"line_queue_full": 6}
    q.push([bytes(60)] * 300)
    assert q.drops["line_urgent_full"] == 300 - 256


@given(st.lists(st.integers(20, 1500), max_size=200))
def test_every_packet_taken_is_one_pushed_in_order_within_its_class(sizes: list[int]) -> None:
    q = LineQueue(115200)
    packets = [i.to_bytes(4, "big") + bytes(n - 4) for i, n in enumerate(sizes)]
    q.push(packets)
    out = []
    while batch := q.take():
        out += batch
    assert sum(q.drops.values()) + len(out) == len(packets)
    for klass in (lambda p: len(p) <= URGENT_MAX, lambda p: len(p) > URGENT_MAX):
        sent = [p for p in packets if klass(p)]
        got = [p for p in out if klass(p)]
        assert got == [p for p in sent if p in got]  # a subsequence: order kept


def test_the_pacer_keeps_the_lead_to_a_few_milliseconds_of_line_time() -> None:
    p = Pacer(115200)
    assert p.ready(0.0)
    p.sent(1152, 0.0)  # 100 ms of line time
    assert not p.ready(0.05)
    assert p.ready(0.1 - LEAD_SECONDS)
    p.sent(1152, 0.5)  # the line was idle meanwhile: time starts from now
    assert abs(p.free_at - 0.6) < 1e-9
    assert line_rate(9600) == 960.0
