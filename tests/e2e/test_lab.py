"""The lab: namespaced hosts reachable over ssh, a WAN between them, and nothing left after down."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import free_mgmt_net, lab_traces, running_lab, unique_tag
from vpnctl import lab as labmod
from vpnctl.lab import LabError, LabState, lab_down, lab_up


def _ssh(state: LabState, host: str, command: str) -> str:
    cfg = str(Path(state.directory) / "ssh_config")
    return subprocess.run(
        ["ssh", "-F", cfg, host, command], capture_output=True, text=True, timeout=20, check=True
    ).stdout


def test_lab_hosts_answer_ssh_with_pinned_keys_and_reach_each_other_over_the_wan(tmp_path):
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    with running_lab(tmp_path / "lab", clients=2) as state:
        assert [h.name for h in state.hosts] == ["server", "client1", "client2"]
        for host in state.hosts:
            addrs = _ssh(state, host.name, "ip -br addr show dev wan0")
            assert host.wan_ip in addrs
        ping = labmod.lab_exec(state, "client2", "ping", "-c", "1", "-W", "2", "198.18.1.1")
        assert "1 received" in ping
        inventory = (Path(state.directory) / "inventory.yaml").read_text()
        assert "client2" in inventory
        assert "198.18.1.12" in inventory
        # every address the lab hands out is inside 198.18.0.0/15
        for host in state.hosts:
            assert host.mgmt_ip.startswith("198.18.")
            assert host.wan_ip.startswith("198.18.")


def test_lab_down_removes_namespaces_links_processes_and_files(tmp_path):
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    directory = tmp_path / "lab"
    tag = unique_tag("d")
    state = lab_up(directory, clients=1, tag=tag, mgmt_net=free_mgmt_net())
    try:
        _ssh(state, "client1", "true")  # leaves an ssh control master behind
        pids = [p for ns in state.namespaces for p in labmod.namespace_pids(ns)]
        assert pids, "sshd should be running inside the lab"
    finally:
        lab_down(directory)
    assert lab_traces(tag) == []
    assert not directory.exists()
    for pid in pids:
        assert not labmod.pid_alive(pid), f"process {pid} outlived lab down"
    leftovers = subprocess.run(
        ["pgrep", "-f", str(directory)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


def test_lab_down_cleans_up_a_lab_whose_up_crashed_halfway(tmp_path, monkeypatch):
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    directory = tmp_path / "lab"
    tag = unique_tag("c")

    def crash(*_args: object, **_kw: object) -> None:
        raise KeyboardInterrupt("simulated crash while waiting for sshd")

    monkeypatch.setattr(labmod, "_wait_tcp", crash)
    monkeypatch.setattr(labmod, "lab_down", lambda _d: [])  # a crash runs no cleanup
    with pytest.raises(KeyboardInterrupt):
        lab_up(directory, clients=2, tag=tag, mgmt_net=free_mgmt_net())
    monkeypatch.undo()
    assert lab_traces(tag), "the simulated crash should have left a half-built lab"
    lab_down(directory)
    assert lab_traces(tag) == []
    assert not directory.exists()


def test_lab_up_rejects_a_bad_tag_client_count_or_subnet_before_touching_anything(tmp_path):
    with pytest.raises(LabError, match="tag"):
        lab_up(tmp_path / "a", tag="Bad-Tag")
    with pytest.raises(LabError, match="--clients"):
        lab_up(tmp_path / "b", clients=0, tag="ok")
    with pytest.raises(LabError, match="management net"):
        lab_up(tmp_path / "c", tag="ok", mgmt_net="10.0.0.0/24")
    assert not any(tmp_path.iterdir())
