"""`vpnctl deploy` on the real lab: a server and two clients, each with its own sshd.

The tests share one lab (building it and installing the runtime is the slow part) and run in
file order, each leaving every link up for the next: first deploy + ping, no-op redeploy,
route change, broken change rolled back, dry run, and the key-leak audit over all of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import (
    daemon_pids,
    lab_exec,
    lab_keys,
    ping_every_tunnel,
    poll_until,
    rendered_lab,
    route_behind_l1_server,
    vpnctl,
)
from vpnctl.lab import LabState

pytestmark = pytest.mark.root

OUTPUTS: list[str] = []  # everything vpnctl printed in this module: audited for keys at the end
CMDLINES: set[str] = set()  # every process command line seen while deploys ran


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    with rendered_lab(tmp_path_factory.mktemp("deploy") / "lab", clients=2, base="dep") as state:
        yield state


def _run(state: LabState, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run vpnctl while sampling every process command line on the machine."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    CMDLINES.add(raw.replace(b"\0", b" ").decode(errors="replace"))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc = vpnctl(state, *args, check=check)
    finally:
        stop.set()
        sampler.join()
    OUTPUTS.append(proc.stdout + proc.stderr)
    return proc


def test_deploying_one_end_first_waits_for_the_other_instead_of_rolling_back(
    lab: LabState,
) -> None:
    proc = _run(lab, "deploy", "server", "--wait", "3")
    assert proc.returncode == 0, proc.stdout
    assert "ROLLED BACK" not in proc.stdout
    assert "l1 deployed, not confirmed: the other end is not up to confirm" in proc.stdout
    assert set(daemon_pids(lab)) == {("server", "l1"), ("server", "l2")}


def test_first_deploy_brings_up_every_link_and_pings_cross_each_tunnel(lab: LabState) -> None:
    proc = _run(lab, "deploy", "--all", "--wait", "30")
    assert "installing runtime" in proc.stdout
    assert "confirmed up at both ends: l1, l2" in proc.stdout
    ping_every_tunnel(lab)
    key_modes = {
        oct(p.stat().st_mode & 0o777)
        for host in lab.hosts
        for p in Path(host.prefix, "etc", "vpnd").glob("*.key")
    }
    assert key_modes == {"0o600"}


def test_second_deploy_changes_nothing_and_restarts_nothing(lab: LabState) -> None:
    before = daemon_pids(lab)
    proc = _run(lab, "deploy", "--all")
    assert "no changes: every host is up to date, nothing restarted" in proc.stdout
    assert "installing runtime" not in proc.stdout
    assert daemon_pids(lab) == before


def test_changed_route_redeploys_only_that_link(lab: LabState) -> None:
    route_behind_l1_server(lab)
    before = daemon_pids(lab)
    proc = _run(lab, "deploy", "--all", "--wait", "30")
    after = daemon_pids(lab)
    assert after[("client1", "l1")] != before[("client1", "l1")], "l1 on client1 restarted"
    untouched = {k: v for k, v in before.items() if k != ("client1", "l1")}
    assert {k: after[k] for k in untouched} == untouched, proc.stdout
    assert "l1: config changed" in proc.stdout
    routes = lab_exec(lab, "client1", "ip", "route", "show", "198.18.60.0/24")
    assert "198.18.60.0/24" in routes
    ping_every_tunnel(lab)


def test_broken_change_rolls_back_and_the_old_link_stays_up(lab: LabState) -> None:
    inventory = Path(lab.directory) / "inventory.yaml"
    good = inventory.read_text()
    # the server's WAN address typed wrong: client configs now dial an address nobody has
    inventory.write_text(good.replace("address: 198.18.1.1\n", "address: 198.18.1.99\n"))
    vpnctl(lab, "render")
    proc = _run(lab, "deploy", "client1", "--wait", "6", check=False)
    assert proc.returncode == 1, proc.stdout
    assert "l1 ROLLED BACK: not up within 6s" in proc.stdout
    assert "previous version restored (client1: up, server: up)" in proc.stdout
    conf = Path(lab.hosts[1].prefix, "etc", "vpnd", "l1.conf").read_text()
    assert "server 198.18.1.1 " in conf
    assert not Path(lab.hosts[1].prefix, "var", "lib", "vpnctl", "prev").exists()
    ping_every_tunnel(lab)
    inventory.write_text(good)
    vpnctl(lab, "render")
    # back to the good inventory: nothing to do, unless vpnd_runtime's sources were edited
    # meanwhile (a new runtime stamp restarts links, and that is right too)
    out = _run(lab, "deploy", "--all", "--wait", "30").stdout
    assert "no changes" in out or "confirmed up at both ends: l1, l2" in out, out


def test_dry_run_prints_a_redacted_diff_and_touches_nothing(lab: LabState) -> None:
    inventory = Path(lab.directory) / "inventory.yaml"
    good = inventory.read_text()
    inventory.write_text(good.replace("port: 4002", "port: 4102"))
    vpnctl(lab, "render")
    # and a key file that lost its mode on a host: shown, redacted
    key = Path(lab.hosts[2].prefix, "etc", "vpnd", "l2.key")
    key.chmod(0o644)
    before = daemon_pids(lab)
    stamp_before = {h.name: _files(h.prefix) for h in lab.hosts}
    try:
        proc = _run(lab, "deploy", "--all", "--dry-run")
        assert "-server 198.18.1.1 4002" in proc.stdout
        assert "+server 198.18.1.1 4102" in proc.stdout
        assert "-server 0 4002" in proc.stdout
        assert "@@ key file, contents redacted @@" in proc.stdout
        assert daemon_pids(lab) == before
        assert {h.name: _files(h.prefix) for h in lab.hosts} == stamp_before
    finally:
        key.chmod(0o600)
        inventory.write_text(good)
        vpnctl(lab, "render")


def test_a_daemon_that_died_is_started_again_without_rewriting_files(lab: LabState) -> None:
    pids = daemon_pids(lab)
    victim = pids[("client2", "l2")]
    os.kill(victim, 15)
    poll_until(lambda: ("client2", "l2") not in daemon_pids(lab), timeout=15, what="l2 stopped")
    files = {h.name: _files(h.prefix) for h in lab.hosts}
    proc = _run(lab, "deploy", "--all", "--wait", "30")
    assert "l2: not running, start" in proc.stdout
    assert "confirmed up at both ends: l2" in proc.stdout
    after = daemon_pids(lab)
    assert after[("client2", "l2")] != victim
    assert {k: v for k, v in after.items() if k != ("client2", "l2")} == {
        k: v for k, v in pids.items() if k != ("client2", "l2")
    }
    assert {h.name: _files(h.prefix) for h in lab.hosts} == files


def test_an_interrupted_deploy_left_pending_is_confirmed_and_committed_not_taken_as_current(
    lab: LabState,
) -> None:
    state = Path(next(h.prefix for h in lab.hosts if h.name == "client1"), "var/lib/vpnctl")
    (state / "pending").write_text("")  # what an apply cut off before its commit leaves
    proc = _run(lab, "deploy", "--all", "--wait", "30")
    assert "l1: interrupted deploy not committed" in proc.stdout
    assert "confirmed up at both ends: l1" in proc.stdout
    assert not (state / "pending").exists()
    assert not (state / "prev").exists()
    assert "no changes" in _run(lab, "deploy", "--all").stdout


def test_no_key_appears_in_any_output_log_or_command_line(lab: LabState) -> None:
    OUTPUTS.append(vpnctl(lab, "status", check=False).stdout)
    OUTPUTS.append(vpnctl(lab, "status", "--json", check=False).stdout)
    keys = lab_keys(lab)
    assert len(keys) == 2
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
    assert OUTPUTS and CMDLINES
    for key in keys:
        for text in OUTPUTS:
            assert key not in text
        for cmdline in CMDLINES:
            assert key not in cmdline
    # every file the deploy left on the hosts (configs, logs, status records, runtime), except
    # the key files themselves
    for host in lab.hosts:
        for path in Path(host.prefix).rglob("*"):
            if not path.is_file() or path.suffix == ".key" or "site-packages" in path.parts:
                continue
            data = path.read_bytes()
            for key in keys:
                assert key.encode() not in data, f"key material in {path}"


def _files(prefix: str) -> dict[str, tuple[int, int]]:
    """path -> (mtime_ns, mode) of the deployed files of a host (what a dry run must not touch)."""
    out = {}
    for path in Path(prefix, "etc").rglob("*"):
        if path.is_file():
            st = path.stat()
            out[str(path)] = (st.st_mtime_ns, st.st_mode)
    return out


def test_a_link_dropped_from_the_inventory_is_stopped_and_removed_at_both_ends(
    lab: LabState,
) -> None:
    inventory = Path(lab.directory) / "inventory.yaml"
    good = inventory.read_text()
    dropped = good.replace("- name: l2\n  server: server\n  client: client2\n  port: 4002\n", "")
    assert dropped != good
    inventory.write_text(dropped)
    vpnctl(lab, "render")
    proc = _run(lab, "deploy", "--all")
    assert "l2: removed from inventory, stop" in proc.stdout
    assert set(daemon_pids(lab)) == {("server", "l1"), ("client1", "l1")}
    for host in ("server", "client2"):
        prefix = next(h.prefix for h in lab.hosts if h.name == host)
        assert not Path(prefix, "etc", "vpnd", "l2.key").exists()
        assert not Path(prefix, "etc", "vpnd", "l2.conf").exists()
    assert "no changes" in _run(lab, "deploy", "--all").stdout
