"""`vpnctl deploy` against a real systemd: lab hosts booted as containers (`lab up --systemd`).

One lab (a server and two clients, each a ``systemd-nspawn -b`` container with its own systemd
and sshd, vpnctl/nspawn.py) shared by the tests in file order, each leaving every link up for
the next: units installed, enabled and started; the hardened unit runs as the ``vpnd`` user with
its two capabilities; a no-op redeploy restarts nothing; a change restarts only its unit; a
crash-looping unit is detected and rolled back; ``systemctl stop`` leaves no TUN or route; a
reboot brings the link back. A last test deploys a hub to a second lab and reloads it.

The Debian rootfs is built once per machine (about a minute, cached in /var/cache/vpnctl) by
the first ``lab up --systemd``; every lab after that boots from it in about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import (
    free_mgmt_net,
    lab_exec,
    lab_traces,
    ping_every_tunnel,
    poll_until,
    rendered_lab,
    route_behind_l1_server,
    tunnel_ends,
    unique_tag,
    vpnctl,
)
from vpnctl.lab import LabState, container_exec, container_leader, lab_down, lab_up

pytestmark = pytest.mark.root

UNITS = {("server", "l1"), ("server", "l2"), ("client1", "l1"), ("client2", "l2")}
# CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10): what the unit grants, nothing else
CAPS = f"{(1 << 12) | (1 << 10):016x}"


def _require() -> None:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping", "systemd-nspawn", "debootstrap", "nsenter")


def _systemd_lab(directory: Path, *, clients: int, hub: bool = False) -> LabState:
    return lab_up(directory, clients=clients, tag=unique_tag("sd"), mgmt_net=free_mgmt_net(),
                  hub=hub, systemd=True, say=print)  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    _require()
    directory = tmp_path_factory.mktemp("systemd") / "lab"
    with rendered_lab(directory, clients=2, base="sd", systemd=True, say=print) as state:
        yield state


def _sh(lab: LabState, host: str, *argv: str) -> str:
    return container_exec(lab, host, *argv).stdout


def _unit(lab: LabState, host: str, link: str) -> dict[str, str]:
    """Properties of a link's unit as systemd in the host's container reports them."""
    props = "MainPID,NRestarts,ActiveState,SubState,UnitFileState,ExecMainStartTimestampMonotonic"
    out = _sh(lab, host, "systemctl", "show", f"vpnd-{link}", "-p", props)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _units(lab: LabState) -> dict[tuple[str, str], tuple[str, str]]:
    """(host, link) -> (MainPID, start time) of every unit: what a restart changes."""
    out = {}
    for host, link in sorted(UNITS):
        unit = _unit(lab, host, link)
        out[(host, link)] = (unit["MainPID"], unit["ExecMainStartTimestampMonotonic"])
    return out


def _record(lab: LabState, host: str, link: str) -> dict[str, object]:
    """The link's status record inside the container (its /run is the container's own)."""
    proc = container_exec(lab, host, "cat", f"/run/vpnd/{link}.status.json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}


def _host(lab: LabState, name: str) -> Path:
    """The container's root as seen from here (its overlay)."""
    return Path(next(h.rootfs for h in lab.hosts if h.name == name))


def test_lab_hosts_boot_a_real_systemd_and_the_inventory_says_so(lab: LabState) -> None:
    for host in lab.hosts:
        state = _sh(lab, host.name, "systemctl", "is-system-running", "--wait")
        assert state.strip() == "running", f"{host.name}: {state}"
        assert _sh(lab, host.name, "cat", "/proc/1/comm").strip() == "systemd"
        assert _sh(lab, host.name, "systemctl", "is-active", "ssh").strip() == "active"
    inventory = (Path(lab.directory) / "inventory.yaml").read_text()
    assert "systemd: true" in inventory
    assert "daemon_user" not in inventory  # the default account, as on a real host


def test_first_deploy_installs_enables_and_starts_every_unit(lab: LabState) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1, l2" in proc.stdout, proc.stdout
    build = Path(lab.directory) / "build"
    for host, link in UNITS:
        unit = f"vpnd-{link}.service"
        installed = _host(lab, host) / "etc/systemd/system" / unit
        assert installed.read_bytes() == (build / host / "systemd" / unit).read_bytes()
        props = _unit(lab, host, link)
        assert props["UnitFileState"] == "enabled", (host, link, props)
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert props["NRestarts"] == "0", (host, link, props)
        record = _record(lab, host, link)
        assert record.get("state") == "up", (host, link, record)
    ping_every_tunnel(lab)
    status = vpnctl(lab, "status").stdout  # reads the same records over ssh
    assert "2/2 link(s) up" in status, status


def test_the_hardened_unit_runs_as_its_user_with_only_its_two_capabilities(
    lab: LabState,
) -> None:
    for host, link in sorted(UNITS):
        uid = _sh(lab, host, "id", "-u", "vpnd").strip()
        assert uid.isdigit() and uid != "0", (host, uid)
        pid = _unit(lab, host, link)["MainPID"]
        status = _sh(lab, host, "cat", f"/proc/{pid}/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split() == [uid] * 4, (host, link, fields["Uid"])
        assert fields["CapEff"].strip() == CAPS, (host, link, fields["CapEff"])
        assert fields["CapPrm"].strip() == CAPS, (host, link, fields["CapPrm"])
        assert fields["NoNewPrivs"].strip() == "1"
        # its key is readable by it and nobody else
        key = _sh(lab, host, "stat", "-c", "%U %a", f"/etc/vpnd/{link}.key").split()
        assert key == ["vpnd", "600"], (host, link, key)


def test_second_deploy_changes_nothing_and_restarts_no_unit(lab: LabState) -> None:
    before = _units(lab)
    proc = vpnctl(lab, "deploy", "--all")
    assert "no changes: every host is up to date, nothing restarted" in proc.stdout
    assert _units(lab) == before


def test_a_changed_link_restarts_only_its_unit(lab: LabState) -> None:
    route_behind_l1_server(lab)
    before = _units(lab)
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    after = _units(lab)
    assert "l1: config changed" in proc.stdout, proc.stdout
    assert after[("client1", "l1")] != before[("client1", "l1")], "client1's l1 restarted"
    assert {k: v for k, v in after.items() if k != ("client1", "l1")} == {
        k: v for k, v in before.items() if k != ("client1", "l1")
    }, proc.stdout
    assert "198.18.60.0/24" in lab_exec(lab, "client1", "ip", "route", "show", "198.18.60.0/24")
    ping_every_tunnel(lab)


def test_a_crash_looping_unit_is_detected_and_rolled_back(lab: LabState) -> None:
    """l1 moves to a port another service holds on the server: its new vpnd exits at once and
    systemd restarts it every 5 s (`is-active` says active between crashes). The deploy goes by
    the status records, rolls l1 back at both ends, and the old l1 is up again."""
    server_ns = next(h.namespace for h in lab.hosts if h.name == "server")
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "python3", "-c",
         "import socket, sys\n"
         "s = socket.socket(); s.bind(('0.0.0.0', 4101)); s.listen()\n"
         "print('listening', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    inventory = Path(lab.directory) / "inventory.yaml"
    good = inventory.read_text()
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "listening\n"
        assert "port: 4001\n" in good
        inventory.write_text(good.replace("port: 4001\n", "port: 4101\n"))
        vpnctl(lab, "render")
        started = time.time()
        proc = vpnctl(lab, "deploy", "--all", "--wait", "12", check=False)
        assert proc.returncode == 1, proc.stdout
        assert "l1 ROLLED BACK" in proc.stdout, proc.stdout
        # the new daemon did fail under systemd (before the rollback's restart fixed it)
        journal = _sh(lab, "server", "journalctl", "-u", "vpnd-l1", "--no-pager", "-o", "cat",
                      "--since", f"@{int(started)}")  # fmt: skip
        assert "Address already in use" in journal, journal
        assert "vpnd-l1.service: Failed with result 'exit-code'" in journal, journal
        conf = (_host(lab, "server") / "etc/vpnd/l1.conf").read_text()
        assert "4001" in conf and "4101" not in conf
        # the restored unit runs for good: up by its record, at both ends
        for host in ("server", "client1"):
            poll_until(
                lambda h=host: _record(lab, h, "l1").get("state") == "up",
                timeout=30,
                what=f"l1 up again on {host}",
            )
            assert _unit(lab, host, "l1")["ActiveState"] == "active"
        ping_every_tunnel(lab)
    finally:
        inventory.write_text(good)
        if squatter.stdin:
            squatter.stdin.close()
        squatter.wait(timeout=10)
    vpnctl(lab, "render")
    out = vpnctl(lab, "deploy", "--all", "--wait", "30").stdout
    assert "no changes" in out or "confirmed up at both ends" in out, out


def test_systemctl_stop_leaves_no_tun_and_no_route_behind(lab: LabState) -> None:
    client2 = next(h for h in lab.hosts if h.name == "client2")
    ends = tunnel_ends(lab)
    _client, _local, server_tunnel = ends["l2"]
    assert "vpn-l2" in lab_exec(lab, "client2", "ip", "-br", "link")
    _sh(lab, "client2", "systemctl", "stop", "vpnd-l2")
    assert _unit(lab, "client2", "l2")["ActiveState"] == "inactive"
    links = lab_exec(lab, "client2", "ip", "-br", "link")
    routes = lab_exec(lab, "client2", "ip", "-4", "route", "show")
    assert "vpn-l2" not in links, links
    assert "vpn-l2" not in routes and server_tunnel not in routes, routes
    # and the server's end of l2 only: its l1 TUN stays
    _sh(lab, "server", "systemctl", "stop", "vpnd-l2")
    server_links = lab_exec(lab, "server", "ip", "-br", "link")
    assert "vpn-l2" not in server_links and "vpn-l1" in server_links, server_links
    assert "vpn-l2" not in lab_exec(lab, "server", "ip", "-4", "route", "show")
    assert client2.namespace  # (the namespace itself stays: only vpnd's traces go)
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "l2: not running, start" in proc.stdout, proc.stdout
    assert "confirmed up at both ends: l2" in proc.stdout, proc.stdout
    ping_every_tunnel(lab)


def test_a_reboot_of_the_host_brings_the_link_back(lab: LabState) -> None:
    leader = container_leader(lab, "client1")
    assert leader is not None
    # systemd answers before it goes down; nsenter may lose its session on the way
    container_exec(lab, "client1", "systemctl", "reboot", check=False)
    poll_until(
        lambda: container_leader(lab, "client1") not in (None, leader),
        timeout=60,
        what="client1's container booted again",
    )
    poll_until(
        lambda: _record(lab, "client1", "l1").get("state") == "up",
        timeout=60,
        what="l1 up on client1 after the reboot (its unit is enabled)",
    )
    assert _unit(lab, "client1", "l1")["NRestarts"] == "0"
    poll_until(
        lambda: _record(lab, "server", "l1").get("state") == "up", timeout=30, what="server l1"
    )
    ping_every_tunnel(lab)
    # and deploy finds the host as it left it
    assert "no changes" in vpnctl(lab, "deploy", "--all").stdout


def test_a_hub_on_a_systemd_host_takes_a_new_client_by_systemctl_reload(
    tmp_path: Path,
) -> None:
    """A second lab: a hub on the server for client1; client2 joins by a reload of the unit
    (ExecReload, SIGHUP), with the same MainPID. Its teardown leaves no trace."""
    _require()
    directory = tmp_path / "hublab"
    hub = _systemd_lab(directory, clients=2, hub=True)
    try:
        inventory = directory / "inventory.yaml"
        text = inventory.read_text()
        assert "  - client2\n" in text
        inventory.write_text(text.replace("  - client2\n", ""))
        vpnctl(hub, "keygen")
        vpnctl(hub, "render")
        first = vpnctl(hub, "deploy", "--all", "--wait", "15").stdout
        assert "confirmed up at both ends: hub/client1" in first, first
        before = _unit(hub, "server", "hub")
        assert before["ActiveState"] == "active"
        inventory.write_text(text)
        vpnctl(hub, "keygen")
        vpnctl(hub, "render")
        proc = vpnctl(hub, "deploy", "--all", "--wait", "15")
        assert "hub: client client2 added, reload (no restart)" in proc.stdout, proc.stdout
        assert "reloaded: hub" in proc.stdout, proc.stdout
        assert "confirmed up at both ends: hub/client2" in proc.stdout, proc.stdout
        after = _unit(hub, "server", "hub")
        assert after["MainPID"] == before["MainPID"], "the hub was restarted, not reloaded"
        assert after["NRestarts"] == "0"
        # what lets the hub, vpnd from its first instruction, read its clients
        keys = [f"/etc/vpnd/hub.peers/client{i}.key" for i in (1, 2)]
        peers = _sh(hub, "server", "stat", "-c", "%n %U:%G %a", "/etc/vpnd/hub.peers", *keys)
        assert peers.split("\n")[:3] == [
            "/etc/vpnd/hub.peers root:vpnd 750",
            "/etc/vpnd/hub.peers/client1.key vpnd:vpnd 600",
            "/etc/vpnd/hub.peers/client2.key vpnd:vpnd 600",
        ], peers
        journal = _sh(hub, "server", "journalctl", "-u", "vpnd-hub", "--no-pager", "-o", "cat")
        assert "Reloaded vpnd-hub.service" in journal, journal
    finally:
        lab_down(directory)


def test_lab_down_removes_every_container_overlay_and_cgroup(tmp_path: Path) -> None:
    """nspawn leaves its payload/ and supervisor/ cgroups behind: lab down removes them, the
    overlays and the namespaces, and leaves the cached rootfs as it was."""
    _require()
    directory = tmp_path / "downlab"
    state = _systemd_lab(directory, clients=1)
    try:
        cgroups = [c for dirs in state.container_cgroups.values() for c in dirs]
        rootfs = [h.rootfs for h in state.hosts]
        assert len(rootfs) == 2 and all(os.path.ismount(r) for r in rootfs)
        assert all(os.path.isdir(os.path.join(c, "payload")) for c in cgroups[:1]), cgroups
        # a file a host writes stays in its own overlay, never in the shared rootfs
        container_exec(state, "client1", "touch", "/etc/written-by-client1")
        assert Path(rootfs[1], "etc/written-by-client1").exists()
        assert not Path(rootfs[0], "etc/written-by-client1").exists()
    finally:
        lab_down(directory)
    assert lab_traces(state.tag) == []
    assert [c for c in cgroups if os.path.exists(c)] == [], "payload/supervisor cgroups left"
    mounts = Path("/proc/self/mounts").read_text()
    assert not [r for r in rootfs if r in mounts], "overlay left mounted"
    assert not directory.exists()
