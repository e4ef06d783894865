"""`vpnctl rotate` on systemd hosts (lab containers, `lab up --systemd`): each step reaches the
daemon by `systemctl reload` (ExecReload: SIGHUP), the daemon runs as its own user and reads
the new key files handed to it, no unit restarts (MainPID, NRestarts), and a ping through the
tunnel loses no reply.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import free_mgmt_net, tunnel_ends, unique_tag, vpnctl
from tests.helpers.ping import RunningPing
from vpnctl.lab import LabState, _ns, container_exec, lab_down, lab_up

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping", "systemd-nspawn", "debootstrap", "nsenter")
    directory = tmp_path_factory.mktemp("rotsd") / "lab"
    state = lab_up(directory, clients=1, tag=unique_tag("rsd"), mgmt_net=free_mgmt_net(),
                   systemd=True, say=print)  # fmt: skip
    try:
        vpnctl(state, "keygen")
        vpnctl(state, "render")
        yield state
    finally:
        lab_down(directory)


def _unit(lab: LabState, host: str) -> tuple[str, str, str]:
    out = container_exec(lab, host, "systemctl", "show", "vpnd-l1", "-p",
                         "MainPID,NRestarts,ExecMainStartTimestampMonotonic").stdout  # fmt: skip
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return props["MainPID"], props["NRestarts"], props["ExecMainStartTimestampMonotonic"]


def test_rotate_on_systemd_hosts_reloads_the_units_and_loses_no_reply(lab: LabState) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "60")
    assert "confirmed up at both ends: l1" in proc.stdout, proc.stdout
    units = {host: _unit(lab, host) for host in ("server", "client1")}
    client, _local, server_tunnel = tunnel_ends(lab)["l1"]
    namespace = next(h.namespace for h in lab.hosts if h.name == client)
    argv = _ns(namespace, "ping", "-n", "-i", "0.05", "-c", "20000", server_tunnel)
    with RunningPing(argv) as ping:
        proc = vpnctl(lab, "rotate", "l1", "--wait", "60", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ping.lost() == [], ping.output
    assert {host: _unit(lab, host) for host in units} == units, "a unit was restarted"
    new = next(
        row["fingerprint"]
        for row in json.loads(vpnctl(lab, "keys", "--json").stdout)["links"]
        if row["link"] == "l1"
    )
    doc = json.loads(vpnctl(lab, "status", "--json").stdout)
    (link,) = doc["links"]
    assert link["up"], link
    for end in link["ends"]:
        assert (end["key_fingerprint"], end["session_key_fingerprint"]) == (new, new), link
        assert end["next_key_fingerprint"] is None, link
    for host in lab.hosts:  # the daemon's own user holds the key; no next key is left behind
        root = Path(host.rootfs)
        assert not list((root / "etc/vpnd").glob("*.next.key")), host.name
        owner = container_exec(lab, host.name, "stat", "-c", "%U", "/etc/vpnd/l1.key").stdout
        assert owner.strip() != "root", host.name
