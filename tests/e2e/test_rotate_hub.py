"""`vpnctl rotate <hub>.<client>` on the real lab: a hub client's key is replaced while a ping
runs from that client through the hub, and the other client's session is not touched.

The new key goes into the hub's peer file for the client (``nextkey``) and the hub is reloaded
(its PID stays), never restarted; at the end `vpnctl status` shows the new key at the client and
in the hub's view of it. Both clients' keys then rotate together (one deploy per step) with
client2 unreachable: client1's finishes, client2's stops at step 1 naming the host, and a rerun
with the host back finishes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import daemon_pids, rendered_lab, vpnctl
from tests.helpers.ping import RunningPing
from vpnctl.lab import LabState, _ns

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    directory = tmp_path_factory.mktemp("rotatehub") / "lab"
    with rendered_lab(directory, clients=2, base="roth", hub=True) as state:
        yield state


def _status(lab: LabState) -> dict[str, dict]:
    doc = json.loads(vpnctl(lab, "status", "--json", check=False).stdout)
    return {entry["link"]: entry for entry in doc["links"]}


def test_a_hub_clients_key_rotates_under_a_ping_and_the_hub_is_only_reloaded(
    lab: LabState,
) -> None:
    vpnctl(lab, "deploy", "--all", "--wait", "30")
    before = _status(lab)
    assert all(entry["up"] for entry in before.values()), before
    other_since = {e["host"]: e["uptime"] for e in before["hub/client2"]["ends"]}
    manifest = json.loads((Path(lab.directory) / "build/server/manifest.json").read_text())
    hub_tunnel = manifest["links"]["hub"]["local"]
    client1 = next(h for h in lab.hosts if h.name == "client1")
    pids = daemon_pids(lab)
    argv = _ns(client1.namespace, "ping", "-n", "-i", "0.05", "-c", "20000", hub_tunnel)
    with RunningPing(argv) as ping:
        proc = vpnctl(lab, "rotate", "hub.client1", "--wait", "30", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reload (no restart)" in proc.stdout and "hub: client client1 changed" in proc.stdout
    assert ping.lost() == [], ping.output
    assert daemon_pids(lab) == pids, "the hub and its clients were reloaded, never restarted"
    keys = {row["link"]: row for row in json.loads(vpnctl(lab, "keys", "--json").stdout)["links"]}
    new = keys["hub.client1"]["fingerprint"]
    after = _status(lab)
    pair = after["hub/client1"]
    assert pair["up"], pair
    assert {e["role"] for e in pair["ends"]} == {"hub", "client"}
    for end in pair["ends"]:
        assert end["session_key_fingerprint"] == new, pair
        assert end["key_fingerprint"] == new, pair
        assert end["next_key_fingerprint"] is None, pair
    # client2's key and session were not touched: its session kept growing older
    assert after["hub/client2"]["up"]
    for end in after["hub/client2"]["ends"]:
        assert end["key_fingerprint"] == keys["hub.client2"]["fingerprint"]
        if other_since.get(end["host"]) is not None and end["uptime"] is not None:
            assert end["uptime"] >= other_since[end["host"]], after["hub/client2"]
    server = next(h for h in lab.hosts if h.name == "server")
    assert not list(Path(server.prefix, "etc/vpnd/hub.peers").glob("*.next.key"))


def test_two_clients_rotate_together_and_an_unreachable_one_is_finished_by_a_rerun(
    lab: LabState,
) -> None:
    directory = Path(lab.directory)
    doc = yaml.safe_load((directory / "inventory.yaml").read_text())
    next(h for h in doc["hosts"] if h["name"] == "client2")["ssh"] = {"host": "127.0.0.1",
                                                                     "port": 1}  # fmt: skip
    down = directory / "client2-down" / "inventory.yaml"  # same name: configs carry it
    down.parent.mkdir()
    down.write_text(yaml.safe_dump(doc, sort_keys=False))
    options = ["-i", str(down), "--keystore", str(directory / "keystore"),
               "--build", str(directory / "build")]  # fmt: skip
    manifest = json.loads((directory / "build/server/manifest.json").read_text())
    client1 = next(h for h in lab.hosts if h.name == "client1")
    argv = _ns(client1.namespace, "ping", "-n", "-i", "0.05", "-c", "20000",
               manifest["links"]["hub"]["local"])  # fmt: skip
    pids = daemon_pids(lab)
    with RunningPing(argv) as ping:
        proc = vpnctl(lab, *options, "rotate", "--all", "--wait", "15", "--json", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ping.lost() == [], ping.output
    assert daemon_pids(lab) == pids
    results = {e["link"]: e for e in json.loads(proc.stdout)["links"]}
    assert results["hub.client1"]["result"] == "rotated", results
    assert results["hub.client2"]["result"] == "failed", results
    assert (results["hub.client2"]["error"]["step"], results["hub.client2"]["error"]["host"]) == (
        "accept", "client2")  # fmt: skip
    assert len([ln for ln in proc.stderr.splitlines() if ": deploying to " in ln]) == 3
    assert _status(lab)["hub/client2"]["up"]
    proc = vpnctl(lab, "rotate", "hub.client2", "--wait", "30", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hub.client2: continuing a rotation recorded at step 1 (accept)" in proc.stdout
    keys = {row["link"]: row for row in json.loads(vpnctl(lab, "keys", "--json").stdout)["links"]}
    after = _status(lab)
    for name in ("client1", "client2"):
        pair = after[f"hub/{name}"]
        assert pair["up"], pair
        for end in pair["ends"]:
            assert end["session_key_fingerprint"] == keys[f"hub.{name}"]["fingerprint"], pair
            assert end["next_key_fingerprint"] is None, pair
    assert daemon_pids(lab) == pids
