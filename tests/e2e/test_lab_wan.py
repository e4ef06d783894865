"""`vpnctl lab up --wan`: the WAN emulator sits between the clients and the server."""

from __future__ import annotations

import statistics
import subprocess

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import VPNCTL, free_mgmt_net, lab_traces, unique_tag
from vpnctl import lab as labmod
from vpnctl.lab import LabError, lab_down, lab_up


def _rtts(state: labmod.LabState, host: str, address: str, count: int) -> list[float]:
    labmod.lab_exec(state, host, "ping", "-n", "-c", "1", "-W", "2", address)  # resolves ARP
    out = labmod.lab_exec(state, host, "ping", "-n", "-c", str(count), "-i", "0.05", address)
    return [float(w.split("=", 1)[1]) for w in out.split() if w.startswith("time=")]


def test_a_ping_from_a_client_to_the_server_crosses_the_lab_wan_and_its_delay(tmp_path):
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    directory = tmp_path / "lab"
    state = lab_up(directory, clients=2, tag=unique_tag("w"), mgmt_net=free_mgmt_net(),
                   wan="delay=10ms,seed=2")  # fmt: skip
    try:
        assert state.wan_pid and labmod.pid_alive(state.wan_pid)
        to_server = _rtts(state, "client1", "198.18.1.1", 10)
        assert abs(statistics.median(to_server) - 20) <= 2, to_server
        # two clients meet on the switch without crossing the emulator
        between_clients = _rtts(state, "client1", "198.18.1.12", 5)
        assert statistics.median(between_clients) < 5, between_clients
    finally:
        removed = lab_down(directory)
    pid = state.wan_pid
    assert any(item.startswith(f"wan emulator pid {pid}; up: ") for item in removed), removed
    assert not labmod.pid_alive(pid)
    assert lab_traces(state.tag) == []


def test_lab_up_refuses_a_bad_wan_spec_before_building_anything(tmp_path):
    tag = unique_tag("w")
    with pytest.raises(LabError, match=r"--wan: wan spec field 'loss=2': '2' is not a percentage"):
        lab_up(tmp_path / "lab", clients=1, tag=tag, mgmt_net=free_mgmt_net(), wan="loss=2")
    assert not (tmp_path / "lab").exists()
    assert lab_traces(tag) == []


def test_the_cli_prints_the_wan_on_up_and_its_counters_on_down(tmp_path):
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    directory = tmp_path / "lab"
    tag = unique_tag("w")
    up = subprocess.run(
        [VPNCTL, "lab", "up", "-n", "1", "--dir", str(directory), "--tag", tag,
         "--mgmt-net", free_mgmt_net(), "--wan", "up.delay=5ms,down.loss=1%"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert "wan:       up.delay=5ms,down.loss=1% (pid " in up.stdout
    finally:
        down = subprocess.run(
            [VPNCTL, "lab", "down", "--dir", str(directory)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert "wan emulator pid " in down.stdout
    assert lab_traces(tag) == []
