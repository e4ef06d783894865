"""The pure parts of the hub benchmark: addressing, timers, /proc parsing, figures, table."""

from __future__ import annotations

import argparse

import pytest

from bench.bench_hub import (
    cpu_percent,
    cpu_ticks,
    format_table,
    parse_clients,
    ramp_figures,
    run_delay_s,
    vm_kib,
)
from bench.hub_loadgen import DeadlineQueue, host_count, source_address, tunnel_address


def test_source_addresses_are_the_hosts_of_the_range_in_order_and_wrap() -> None:
    assert host_count("198.18.4.0/22") == 1022
    assert source_address("198.18.4.0/22", 0) == "198.18.4.1"
    assert source_address("198.18.4.0/22", 255) == "198.18.5.0"
    assert source_address("198.18.4.0/22", 1021) == "198.18.7.254"
    assert source_address("198.18.4.0/22", 1022) == "198.18.4.1"  # more clients than sources


def test_a_thousand_clients_get_distinct_tunnel_addresses() -> None:
    addrs = {tunnel_address("198.19.16.0/20", i) for i in range(1000)}
    assert len(addrs) == 1000
    assert tunnel_address("198.19.16.0/20", 0) == "198.19.16.1"


def test_tunnel_addresses_do_not_wrap() -> None:
    with pytest.raises(ValueError, match="no tunnel address for client 2"):
        tunnel_address("198.19.0.0/30", 2)


def test_addresses_outside_the_benchmarking_range_are_refused() -> None:
    with pytest.raises(ValueError, match="only uses addresses inside"):
        source_address("10.0.0.0/24", 0)


def test_deadline_queue_pops_due_keys_and_forgets_rearmed_ones() -> None:
    q = DeadlineQueue()
    q.arm(1, 5.0)
    q.arm(2, 3.0)
    q.arm(3, 4.0)
    q.arm(2, 10.0)  # re-armed: its 3.0 entry is stale
    q.arm(3, None)  # disarmed
    assert q.next() == 5.0
    assert q.due(4.9) == []
    assert q.due(5.0) == [1]
    assert q.next() == 10.0
    assert q.due(100.0) == [2]
    assert q.next() is None


def test_cpu_ticks_reads_utime_and_stime_even_with_odd_process_names() -> None:
    line = "4242 (py (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0 99 1 2"
    assert cpu_ticks(line) == 281
    assert cpu_percent(100, 150, 10.0, 100) == pytest.approx(5.0)


def test_vm_kib_reads_one_field_of_proc_status() -> None:
    text = "Name:\tpython3\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n"
    assert vm_kib(text, "VmRSS") == 40960
    assert vm_kib(text, "VmHWM") == 51200
    assert vm_kib(text, "VmSwap") == 0


def test_ramp_figures_time_first_to_last_up_and_rate_from_first_connect() -> None:
    assert ramp_figures({"first_up": 0.5, "last_up": 4.5, "ever_up": 900}) == (4.0, 200.0)
    assert ramp_figures({"first_up": None, "last_up": None, "ever_up": 0}) == (None, None)


def test_parse_clients_accepts_a_list_and_names_a_bad_count() -> None:
    assert parse_clients("100, 1_000") == [100, 1000]
    with pytest.raises(argparse.ArgumentTypeError, match="'5000'"):
        parse_clients("100,5000")


def test_format_table_aligns_runs_and_targets() -> None:
    table = format_table(
        ["N=1", "N=10"], [("rss", ["1.0", "12.5"], "<= 60"), ("ok", ["y", "n"], "")]
    )
    assert table.splitlines() == [
        "     N=1  N=10  target",
        "rss  1.0  12.5  <= 60",
        "ok     y     n",
    ]


def test_run_delay_is_the_second_schedstat_field_in_seconds() -> None:
    assert run_delay_s("123456789 2500000000 42\n") == 2.5
