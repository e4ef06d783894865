"""`vpnctl rotate` on the real lab (a server and a client, each with its own sshd): the key of a
link is replaced while a ping runs through the tunnel, and not one reply is lost.

The tests share one lab and run in file order: a deploy brings the link up; `rotate l1` runs
its three steps (accept, switch, retire) under a ping -- no daemon restarts, no reply missing,
and `vpnctl status` then shows the new key at both ends; a rotation whose server host cannot be
reached stops at step 1 with the step and the host named, and the link stays up on its key; run
again with the host back, it continues and finishes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import daemon_pids, lab_exec, rendered_lab, tunnel_ends, vpnctl
from tests.helpers.ping import RunningPing
from vpnctl.lab import LabState, _ns

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    with rendered_lab(tmp_path_factory.mktemp("rotate") / "lab", clients=1, base="rot") as state:
        yield state


def _keystore_fingerprint(lab: LabState, link: str) -> str:
    doc = json.loads(vpnctl(lab, "keys", "--json").stdout)
    return next(row["fingerprint"] for row in doc["links"] if row["link"] == link)


def _status_ends(lab: LabState, link: str) -> list[dict]:
    proc = vpnctl(lab, "status", "--json", check=False)
    doc = json.loads(proc.stdout)
    return next(entry["ends"] for entry in doc["links"] if entry["link"] == link)


def _host(lab: LabState, name: str):
    return next(h for h in lab.hosts if h.name == name)


def test_the_link_comes_up(lab: LabState) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1" in proc.stdout


def test_rotate_under_a_running_ping_loses_no_reply(lab: LabState) -> None:
    old = _keystore_fingerprint(lab, "l1")
    client, _local, server_tunnel = tunnel_ends(lab)["l1"]
    pids = daemon_pids(lab)
    # replies before the first step and after the last: a request lost at any moment of the
    # rotation is an icmp_seq without a reply
    argv = _ns(_host(lab, client).namespace, "ping", "-n", "-i", "0.05", "-c", "20000",
               server_tunnel)  # fmt: skip
    with RunningPing(argv) as ping:
        proc = vpnctl(lab, "rotate", "l1", "--wait", "30", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("1/3", "2/3", "3/3"):
        assert f"l1: step {step} confirmed" in proc.stdout, proc.stdout
    assert ping.lost() == [], ping.output
    assert daemon_pids(lab) == pids, "a rotation reloads the daemons, never restarts them"
    new = _keystore_fingerprint(lab, "l1")
    assert new != old
    ends = _status_ends(lab, "l1")
    assert {e["host"] for e in ends} == {"server", "client1"}
    for end in ends:
        assert end["state"] == "up", ends
        assert end["key_fingerprint"] == new, ends
        assert end["session_key_fingerprint"] == new, ends
        assert end["next_key_fingerprint"] is None, ends
    for host in lab.hosts:  # the next-key file was removed when the old key was retired
        assert not list(Path(host.prefix, "etc", "vpnd").glob("*.next.key")), host.name
    assert not list((Path(lab.directory) / "keystore").glob("*.rotation.json"))
    keys = vpnctl(lab, "keys").stdout
    assert re.search(rf"l1\s+{new}\s+\d+[sm]", keys), keys


def test_an_unreachable_server_stops_the_rotation_at_step_1_and_the_link_stays_up(
    lab: LabState,
) -> None:
    old = _keystore_fingerprint(lab, "l1")
    directory = Path(lab.directory)
    doc = yaml.safe_load((directory / "inventory.yaml").read_text())
    server = next(h for h in doc["hosts"] if h["name"] == "server")
    server["ssh"] = {"host": "127.0.0.1", "port": 1}  # nothing listens: connection refused
    broken = directory / "inventory-unreachable.yaml"  # beside: the same keystore and build/
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    pids = daemon_pids(lab)
    proc = vpnctl(lab, "-i", str(broken), "rotate", "l1", "--wait", "10", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "l1: step 1 (accept) FAILED at server" in proc.stdout, proc.stdout
    assert "unreachable" in proc.stdout, proc.stdout
    assert "run `vpnctl rotate l1` again" in proc.stdout, proc.stdout
    assert "`vpnctl rotate --abort l1`" in proc.stdout, proc.stdout
    # the link never left its key: both ends up on it, nothing restarted, nothing applied
    assert daemon_pids(lab) == pids
    ends = _status_ends(lab, "l1")
    assert [e["state"] for e in ends] == ["up", "up"], ends
    assert {e["session_key_fingerprint"] for e in ends} == {old}, ends
    assert {e["next_key_fingerprint"] for e in ends} == {None}, ends
    client, _local, server_tunnel = tunnel_ends(lab)["l1"]
    out = lab_exec(lab, client, "ping", "-c", "2", "-i", "0.2", "-W", "3", server_tunnel)
    assert " 0% packet loss" in out, out
    # the host is back: the same command continues where it stopped and finishes
    proc = vpnctl(lab, "rotate", "l1", "--wait", "30", "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    jsonschema.validate(result, json.loads((REPO / "docs/json/rotate.schema.json").read_text()))
    assert result["ok"] is True
    (entry,) = result["links"]
    assert entry["result"] == "rotated"
    assert entry["old_fingerprint"] == old
    assert [s["step"] for s in entry["steps"]] == ["accept", "switch", "retire"]
    assert "continuing a rotation recorded at step 1" in proc.stderr
    assert {e["session_key_fingerprint"] for e in _status_ends(lab, "l1")} == {
        entry["new_fingerprint"]
    }
