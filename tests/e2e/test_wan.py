"""The WAN emulator between two real namespaces: delay, loss, reordering, rate and outage.

Each test builds A - emulator - B (tests/helpers/wan.py), sends real packets (ping, numbered UDP
datagrams) and compares what arrived with the spec and with the emulator's own counters.
"""

from __future__ import annotations

import math
import statistics

from tests.conftest import require_root_netns, require_tools
from tests.helpers.wait import poll_until
from tests.helpers.wan import wan_pair


def _missing(seqs: list[int], count: int) -> int:
    return count - len(set(seqs))


def test_ping_through_a_20ms_wan_takes_20ms_each_way():
    require_root_netns()
    require_tools("ping")
    with wan_pair("delay=20ms") as pair:
        rtts = pair.ping_times(20)
        assert len(rtts) == 20
        one_way = statistics.median(rtts) / 2
        assert abs(one_way - 20) <= 2, rtts
        assert min(rtts) >= 40 - 2, rtts  # a packet is never early
        down = pair.stats()["down"]
        assert abs(down["delay_avg_ms"] - 20) < 0.5, down


def test_each_direction_has_its_own_delay():
    require_root_netns()
    require_tools("ping")
    with wan_pair("up.delay=15ms,down.delay=5ms") as pair:
        rtts = pair.ping_times(10)
        assert abs(statistics.median(rtts) - 20) <= 2, rtts
        stats = pair.stats()
        assert abs(stats["up"]["delay_avg_ms"] - 15) < 0.5
        assert abs(stats["down"]["delay_avg_ms"] - 5) < 0.5


def test_loss_over_10000_datagrams_is_within_statistical_bounds_and_counted():
    require_root_netns()
    count, p = 10_000, 0.05
    with wan_pair(f"loss={p * 100:g}%,seed=7") as pair:
        got = pair.udp(count)
        lost = _missing(got["seqs"], count)
        sigma = math.sqrt(count * p * (1 - p))  # ~21.8 datagrams
        assert abs(lost - count * p) <= 5 * sigma, f"lost {lost} of {count}"
        # every datagram missing at B was dropped by the emulator and counted there
        up = poll_until(
            lambda: (s := pair.stats()["up"])["dropped_loss"] >= lost and s,
            5,
            "the emulator's loss counter",
        )
        assert up["dropped_loss"] - lost <= 3  # the few others are ARP/ND frames
        assert up["dropped_queue"] == up["dropped_outage"] == 0


def test_reordering_lets_some_datagrams_overtake_and_counts_them():
    require_root_netns()
    count = 2000
    with wan_pair("delay=10ms,reorder=5%,seed=3") as pair:
        got = pair.udp(count, interval=0.0005)
        seqs = got["seqs"]
        assert _missing(seqs, count) == 0
        highest, overtaken = -1, 0
        for seq in seqs:
            if seq < highest:
                overtaken += 1
            highest = max(highest, seq)
        assert overtaken > 0, "no datagram arrived after a later one"
        reordered = poll_until(lambda: pair.stats()["up"]["reordered"], 5, "reorder counter")
        assert 0.02 * count < reordered < 0.10 * count


def test_rate_limit_paces_delivery_and_drops_what_overflows_the_queue():
    require_root_netns()
    count, size, rate = 2000, 1000, 20e6
    with wan_pair("up.rate=20mbit,up.limit=200kb") as pair:
        got = pair.udp(count, size=size)
        n = len(got["seqs"])
        assert 150 < n < count, n  # the queue (200 KiB) and what drained meanwhile got through
        spread = got["times"][-1] - got["times"][0]
        wire_bits = (n - 1) * (size + 42) * 8  # + UDP, IP and Ethernet headers
        assert wire_bits / spread <= rate * 1.05, f"{wire_bits / spread / 1e6:.1f} Mbit/s"
        up = poll_until(lambda: pair.stats()["up"]["dropped_queue"], 5, "queue drops")
        assert up == count - n


def test_an_outage_drops_everything_for_its_duration():
    require_root_netns()
    count, interval = 400, 0.01  # 4 s of datagrams; the outage is 1 s of them, from 1.5 s
    with wan_pair("outage=1s@1.5s") as pair:
        got = pair.udp(count, interval=interval, idle=3.0)  # B waits out the outage
        seqs = sorted(set(got["seqs"]))
        missing = sorted(set(range(count)) - set(seqs))
        assert missing, "nothing was lost during the outage"
        assert missing == list(range(missing[0], missing[-1] + 1)), "the gap is one run"
        assert 80 <= len(missing) <= 110, len(missing)  # 1 s at 10 ms, give or take pacing
        dropped = poll_until(lambda: pair.stats()["up"]["dropped_outage"], 5, "outage counter")
        assert dropped >= len(missing)
