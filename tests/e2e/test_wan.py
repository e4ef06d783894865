"""The WAN emulator between two real namespaces: delay, loss, reordering, rate and outage.

Each test builds A - emulator - B (tests/helpers/wan.py), sends real packets (ping, numbered UDP
datagrams) and compares what arrived with the spec and with the emulator's own counters.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import subprocess

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import vpnd
from tests.helpers.wait import poll_until
from tests.helpers.wan import wan_pair
from vpnd_runtime.keyfile import generate_key


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


def test_udp_gso_super_packets_lose_single_datagrams_and_the_rest_arrive_whole():
    require_root_netns()
    count, p = 2000, 0.3  # sent 10 datagrams of 1200 bytes per UDP_SEGMENT super-packet
    with wan_pair(f"loss={p * 100:g}%,seed=11") as pair:
        got = pair.udp(count, size=1200, gso=10)
        seqs = got["seqs"]
        assert len(seqs) == len(set(seqs))
        assert set(seqs) <= set(range(count))
        assert got["bytes"] == 1200 * len(seqs)  # each survivor cut at its own boundary
        sigma = math.sqrt(count * p * (1 - p))
        assert abs(_missing(seqs, count) - count * p) <= 5 * sigma, _missing(seqs, count)
        assert pair.stats()["up"]["split"] > 0  # super-packets were re-cut, not dropped whole


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


def test_jitter_spreads_the_delay_around_its_setting_without_reordering():
    require_root_netns()
    require_tools("ping")
    with wan_pair("delay=20ms,jitter=8ms,seed=4") as pair:
        rtts = pair.ping_times(30)
        assert all(40 - 2 * 8 - 2 <= rtt <= 40 + 2 * 8 + 2 for rtt in rtts), rtts
        assert statistics.pstdev(rtts) > 2, rtts  # a fixed 40 ms would be ~0.1 ms


def test_a_vpnd_link_runs_over_the_emulated_wan_and_carries_a_file_intact(tmp_path):
    require_root_netns()
    require_tools("ping", "socat")
    generate_key(tmp_path / "k.key", randomdev="/dev/urandom")
    with wan_pair("delay=10ms,jitter=2ms,loss=1%,seed=5") as pair:
        confs = {}
        for role, body in (
            ("server", "mode server\nserver 0 24741\nclient 0 0\n"
                       "local 198.19.0.1\nremote 198.19.0.2\n"),
            ("client", f"mode client\nserver {pair.server_ip} 24741\n"
                       "local 198.19.0.2\nremote 198.19.0.1\n"),
        ):  # fmt: skip
            confs[role] = tmp_path / f"{role}.conf"
            confs[role].write_text(
                body + f"interface {pair.tag}t\nkeyfile {tmp_path / 'k.key'}\n"
                f"pidfile {tmp_path / role}.pid\nstatusfile {tmp_path / role}.status.json\n"
                "randomdev /dev/urandom\n"
            )
        data = os.urandom(2 * 1024 * 1024)
        (tmp_path / "data").write_bytes(data)
        with (
            vpnd(pair.server, confs["server"], tmp_path, "server") as server,
            vpnd(pair.client, confs["client"], tmp_path, "client") as client,
        ):
            poll_until(lambda: server.state() == "up" and client.state() == "up", 30, "link up")
            sink = subprocess.Popen(
                pair.server.cmd("socat", "-u", "TCP-LISTEN:5001,bind=198.19.0.1,reuseaddr",
                                f"OPEN:{tmp_path / 'got'},creat,trunc"),
            )  # fmt: skip
            try:
                poll_until(
                    lambda: "5001" in pair.server.run("ss", "-ltn").stdout, 10, "socat listening"
                )
                pair.client.run("socat", "-u", f"OPEN:{tmp_path / 'data'}",
                                "TCP:198.19.0.1:5001", timeout=120)  # fmt: skip
                sink.wait(30)
            finally:
                if sink.poll() is None:
                    sink.kill()
                    sink.wait(5)
        got = (tmp_path / "got").read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        # the transfer did cross a lossy WAN (the counters file is rewritten twice a second:
        # wait for the write that follows the transfer rather than read a stale one)
        poll_until(lambda: pair.stats()["up"]["dropped_loss"] > 0, 5, "losses counted")
