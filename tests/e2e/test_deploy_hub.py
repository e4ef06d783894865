"""`vpnctl deploy` of a hub on the real lab: one vpnd on the server for several clients.

One lab (a server and four clients, each with its own sshd) shared by the tests in file order:
the hub is deployed with three clients; adding the fourth only reloads the hub (same hub PID,
the other clients' sessions keep their start time and their age keeps growing); removing one
revokes it (its peer file and key are gone from the hub, and its old config and key open
nothing any more) while the others stay up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import free_mgmt_net, lab_exec, lab_ping, poll_until, unique_tag, vpnctl
from vpnctl.lab import LabState, lab_down, lab_up

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    directory = tmp_path_factory.mktemp("hubdeploy") / "lab"
    state = lab_up(directory, clients=4, tag=unique_tag("hub"), mgmt_net=free_mgmt_net(), hub=True)
    try:
        inventory = directory / "inventory.yaml"
        text = inventory.read_text()
        assert "  - client4\n" in text
        inventory.write_text(text.replace("  - client4\n", ""))  # client4 joins later
        vpnctl(state, "keygen")
        vpnctl(state, "render")
        yield state
    finally:
        lab_down(directory)


def _prefix(lab: LabState, host: str) -> Path:
    return Path(next(h.prefix for h in lab.hosts if h.name == host))


def _hub_record(lab: LabState) -> dict[str, Any]:
    return json.loads((_prefix(lab, "server") / "run/vpnd/hub.status.json").read_text())


def _hub_pid(lab: LabState) -> int:
    return int((_prefix(lab, "server") / "run/vpnd/hub.pid").read_text())


def _sessions(lab: LabState) -> dict[str, tuple[str, float | None, float | None]]:
    """client -> (state, session_started, session_age) as the hub reports it in peers[]."""
    return {
        p["name"]: (p["state"], p["session_started"], p["session_age"])
        for p in _hub_record(lab)["peers"]
    }


def _manifest_client(lab: LabState, client: str) -> dict[str, Any]:
    manifest = json.loads((Path(lab.directory) / "build/server/manifest.json").read_text())
    return manifest["links"]["hub"]["clients"][client]


def _address(lab: LabState, client: str) -> str:
    return _manifest_client(lab, client)["address"]


def _hub_address(lab: LabState) -> str:
    manifest = json.loads((Path(lab.directory) / "build/server/manifest.json").read_text())
    return manifest["links"]["hub"]["local"]


def test_hub_with_three_clients_deploys_and_every_client_reaches_hub_and_each_other(
    lab: LabState,
) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: hub/client1, hub/client2, hub/client3" in proc.stdout
    assert sorted(_sessions(lab)) == ["client1", "client2", "client3"]
    hub = _hub_address(lab)
    for client in ("client1", "client2", "client3"):
        lab_ping(lab, client, hub)
        lab_ping(lab, "server", _address(lab, client))
    lab_ping(lab, "client1", _address(lab, "client2"))  # client to client, through the hub
    lab_ping(lab, "client3", _address(lab, "client1"))
    # And over IPv6 too (every link is dual-stack by default): client to client through the hub
    address6 = _manifest_client(lab, "client2")["address6"]
    poll_until(
        lambda: (
            " 0% packet loss"
            in lab_exec(lab, "client1", "sh", "-c", f"ping -6 -c 2 -i 0.2 -W 2 {address6}; true")
        ),
        15,
        what=f"client1 pings client2 at {address6} through the hub",
    )
    status = vpnctl(lab, "status")
    assert "hub        3/3 UP   server" in status.stdout, status.stdout
    assert "3/3 link(s) up" in status.stdout


def test_adding_a_client_only_reloads_the_hub_and_other_sessions_keep_growing(
    lab: LabState,
) -> None:
    pid = _hub_pid(lab)
    before = _sessions(lab)
    assert all(state == "up" for state, _, _ in before.values()), before
    inventory = Path(lab.directory) / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace("  - client3\n", "  - client3\n  - client4\n")
    )
    keygen = vpnctl(lab, "keygen").stdout
    assert "created hub.client4" in keygen
    assert keygen.count("kept    hub.client") == 3
    render = vpnctl(lab, "render").stdout
    assert "build/server/etc/vpnd/hub.conf" not in render  # the hub's config is unchanged
    assert "created build/server/etc/vpnd/hub.peers/client4.peer" in render
    dry = vpnctl(lab, "deploy", "--all", "--dry-run").stdout
    assert (
        "# server: hub hub: client client4 added: would reload it (SIGHUP), not restart it\n"
        in (dry)
    )
    assert "+++ server:" in dry and "client4.peer (new)" in dry
    assert "client4.key (new)\n@@ key file, contents redacted @@" in dry
    key = (Path(lab.directory) / "keystore/hub.client4.key").read_text().strip()
    assert key not in dry
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "server       hub: client client4 added, reload (no restart)" in proc.stdout
    assert "reloaded: hub" in proc.stdout
    assert "confirmed up at both ends: hub/client4" in proc.stdout
    assert _hub_pid(lab) == pid, "the hub was restarted"
    after = _sessions(lab)
    assert after["client4"][0] == "up"
    for client, (_, started, age) in before.items():
        state, started_now, _ = after[client]
        assert (state, started_now) == ("up", started), f"{client}: session replaced"
        assert age is not None
        poll_until(
            lambda c=client, a=age: (_sessions(lab)[c][2] or 0) > a,
            timeout=10,
            what=f"{client}'s session age grows past {age}",
        )
    lab_ping(lab, "client4", _hub_address(lab))
    lab_ping(lab, "client4", _address(lab, "client1"))


def test_removing_a_client_revokes_it_and_leaves_the_others_up(
    lab: LabState, tmp_path: Path
) -> None:
    pid = _hub_pid(lab)
    before = _sessions(lab)
    client2 = _prefix(lab, "client2")
    keep = tmp_path / "old-client2"  # client2's config and key as they were
    keep.mkdir()
    shutil.copy(client2 / "etc/vpnd/hub.conf", keep / "hub.conf")
    shutil.copy(client2 / "etc/vpnd/hub.key", keep / "hub.key")
    inventory = Path(lab.directory) / "inventory.yaml"
    inventory.write_text(inventory.read_text().replace("  - client2\n", ""))
    render = vpnctl(lab, "render").stdout
    assert "removed build/server/etc/vpnd/hub.peers/client2.peer" in render
    assert "build/server/etc/vpnd/hub.conf" not in render
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "server       hub: client client2 removed, reload (no restart)" in proc.stdout
    assert "client2      hub: removed from inventory, stop" in proc.stdout
    assert _hub_pid(lab) == pid, "the hub was restarted"
    peers_dir = _prefix(lab, "server") / "etc/vpnd/hub.peers"
    assert sorted(p.name for p in peers_dir.iterdir()) == [
        f"{c}.{ext}" for c in ("client1", "client3", "client4") for ext in ("key", "peer")
    ]
    poll_until(lambda: "client2" not in _sessions(lab), timeout=10, what="client2 cut")
    after = _sessions(lab)
    for client in ("client1", "client3", "client4"):
        assert after[client][:2] == ("up", before[client][1]), f"{client}: session replaced"

    # The old config and key of client2 open nothing any more.
    conf = (keep / "hub.conf").read_text()
    old_prefix = str(client2)
    conf = conf.replace(f"keyfile {old_prefix}/etc/vpnd/hub.key", f"keyfile {keep}/hub.key")
    conf = conf.replace(f"{old_prefix}/run/vpnd/", f"{keep}/")
    (keep / "hub.conf").write_text(conf)
    vpnd = str(Path(lab.directory) / "hosts/client2/root/usr/local/bin/vpnd")
    daemon = subprocess.Popen(
        ["ip", "netns", "exec", f"{lab.tag}-client2", vpnd, "-f", str(keep / "hub.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = keep / "hub.status.json"

        seen: list[dict[str, Any]] = []

        def refused() -> dict[str, Any] | None:
            assert daemon.poll() is None, f"the old client's vpnd exited {daemon.returncode}"
            if not status.exists():
                return None
            seen.append(json.loads(status.read_text()))
            return seen[-1] if seen[-1].get("reason") else None

        try:
            record = poll_until(refused, timeout=30, what="the revoked client refused")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last record: {seen[-1:]}") from None
        assert record["state"] != "up", record
        assert "client2" not in _sessions(lab)
        assert _hub_record(lab)["peers_up"] == 3
    finally:
        os.kill(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=15)
    status = vpnctl(lab, "status")
    assert "3/3 link(s) up" in status.stdout, status.stdout
