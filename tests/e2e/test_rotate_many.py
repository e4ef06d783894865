"""`vpnctl rotate` over several links at once, on the real lab (a server and four clients, each
with its own sshd): every step is deployed once to all the hosts and confirmed for every link.

The tests share one lab and run in file order: a deploy brings the four links up; `rotate l1 l2
l3` runs its three batched steps while a ping runs through each of the three tunnels -- not one
reply lost, no daemon restarted; with client2 unreachable, `rotate --all` finishes l1, l3 and l4
and names l2's step and host, l2 staying up on its key, and run again with the host back it
continues l2 alone from its own phase; `--abort` walks l3 (at step 2) and l4 (at step 1) back
together under pings; a pending edit of another link of the same hosts makes
the rotation refuse before anything is applied, naming that link and host, until
--include-pending.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import daemon_pids, rendered_lab, tunnel_ends, vpnctl
from tests.helpers.ping import RunningPing
from vpnctl.keystore import Keystore
from vpnctl.lab import LabState, _ns

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs/json/rotate.schema.json").read_text())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping")
    with rendered_lab(tmp_path_factory.mktemp("rotbatch") / "lab", clients=4, base="rb") as state:
        yield state


def _fingerprints(lab: LabState) -> dict[str, str]:
    doc = json.loads(vpnctl(lab, "keys", "--json").stdout)
    return {row["link"]: row["fingerprint"] for row in doc["links"]}


def _status_ends(lab: LabState) -> dict[str, list[dict]]:
    doc = json.loads(vpnctl(lab, "status", "--json", check=False).stdout)
    return {entry["link"]: entry["ends"] for entry in doc["links"]}


def _namespace(lab: LabState, host: str) -> str:
    return next(h.namespace for h in lab.hosts if h.name == host)


def _phases(lab: LabState) -> dict[str, str]:
    keystore = Path(lab.directory) / "keystore"
    return {
        p.name.removesuffix(".rotation.json"): json.loads(p.read_text())["phase"]
        for p in keystore.glob("*.rotation.json")
    }


def _inventory_variant(lab: LabState, where: str, edit: Callable[[dict], None]) -> list[str]:
    """vpnctl's options for a copy of the lab's inventory, edited, at ``<where>/inventory.yaml``
    (the same file name: rendered configs name it) with the lab's keystore and build/."""
    directory = Path(lab.directory)
    doc = yaml.safe_load((directory / "inventory.yaml").read_text())
    edit(doc)
    path = directory / where / "inventory.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return ["-i", str(path), "--keystore", str(directory / "keystore"),
            "--build", str(directory / "build")]  # fmt: skip


def _unreachable(name: str) -> Callable[[dict], None]:
    """An inventory edit: host ``name``'s sshd is at a port where nothing listens."""

    def edit(doc: dict) -> None:
        host = next(h for h in doc["hosts"] if h["name"] == name)
        host["ssh"] = {"host": "127.0.0.1", "port": 1}  # connection refused

    return edit


def _ping(lab: LabState, link: str) -> list[str]:
    """A ping from the client end of ``link`` to the server's tunnel address, every 50 ms."""
    client, _local, server_tunnel = tunnel_ends(lab)[link]
    return _ns(_namespace(lab, client), "ping", "-n", "-i", "0.05", "-c", "20000", server_tunnel)


LINKS = ("l1", "l2", "l3")


def test_the_links_come_up(lab: LabState) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1, l2, l3, l4" in proc.stdout, proc.stdout


def test_three_links_rotate_together_under_running_pings_and_lose_no_reply(
    lab: LabState,
) -> None:
    old = _fingerprints(lab)
    pids = daemon_pids(lab)
    with ExitStack() as stack:
        pings = {link: stack.enter_context(RunningPing(_ping(lab, link))) for link in LINKS}
        proc = vpnctl(lab, "rotate", "l1", "l2", "l3", "--wait", "30", "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for link, ping in pings.items():
        assert ping.lost() == [], (link, ping.output)
    assert daemon_pids(lab) == pids, "a rotation reloads the daemons, never restarts them"
    # one deploy per step for the three links, to the union of their hosts
    batches = [line for line in proc.stderr.splitlines() if ": deploying to " in line]
    assert len(batches) == 3, proc.stderr
    assert all("l1, l2, l3: deploying to 4 host(s)" in line for line in batches), batches
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["ok"] is True and doc["pending"] == []
    assert [(e["link"], e["result"]) for e in doc["links"]] == [
        ("l1", "rotated"), ("l2", "rotated"), ("l3", "rotated")]  # fmt: skip
    new = _fingerprints(lab)
    status = _status_ends(lab)
    for entry in doc["links"]:
        link = entry["link"]
        assert [s["step"] for s in entry["steps"]] == ["accept", "switch", "retire"]
        assert entry["old_fingerprint"] == old[link] != new[link] == entry["new_fingerprint"]
        for end in status[link]:
            assert (end["state"], end["session_key_fingerprint"]) == ("up", new[link]), status
            assert end["next_key_fingerprint"] is None, status
    assert new["l4"] == old["l4"]  # not named: untouched
    assert _phases(lab) == {}


def test_one_unreachable_host_stops_its_link_only_and_a_rerun_completes_it(
    lab: LabState,
) -> None:
    old = _fingerprints(lab)
    pids = daemon_pids(lab)

    broken = _inventory_variant(lab, "client2-down", _unreachable("client2"))
    proc = vpnctl(lab, *broken, "rotate", "--all", "--wait", "15", "--json",
                  check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    results = {e["link"]: e for e in doc["links"]}
    assert {k: e["result"] for k, e in results.items()} == {
        "l1": "rotated", "l2": "failed", "l3": "rotated", "l4": "rotated"}  # fmt: skip
    error = results["l2"]["error"]
    assert (error["step"], error["host"]) == ("accept", "client2"), error
    assert "unreachable" in error["why"], error
    assert "l2: step 1 (accept) FAILED at client2" in proc.stderr, proc.stderr
    assert "run `vpnctl rotate l2` again" in error["advice"], error
    assert daemon_pids(lab) == pids
    assert _phases(lab) == {"l2": "accept"}
    # l2 never left its key: both ends up on it, its server end not even given the new one
    ends = _status_ends(lab)["l2"]
    assert [e["state"] for e in ends] == ["up", "up"], ends
    assert {e["session_key_fingerprint"] for e in ends} == {old["l2"]}, ends
    assert {e["next_key_fingerprint"] for e in ends} == {None}, ends
    # the host is back: the same command continues l2 from its step 1; the others are done
    proc = vpnctl(lab, "rotate", "--all", "--wait", "30", "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    results = {e["link"]: e for e in doc["links"]}
    assert results["l2"]["result"] == "rotated"
    assert results["l2"]["old_fingerprint"] == old["l2"]
    assert "l2: continuing a rotation recorded at step 1 (accept)" in proc.stderr
    assert _phases(lab) == {}
    new = _fingerprints(lab)
    assert all(new[link] != old[link] for link in ("l1", "l2", "l3", "l4")), (old, new)
    status = _status_ends(lab)
    for link in ("l1", "l2", "l3", "l4"):
        assert {(e["state"], e["session_key_fingerprint"]) for e in status[link]} == {
            ("up", new[link])
        }, status
    assert daemon_pids(lab) == pids


def test_abort_walks_several_links_back_together_from_their_own_phases(lab: LabState) -> None:
    old = _fingerprints(lab)
    # l4 stops at step 1 (client4 unreachable); l3 is taken to step 2 by hand, as a rotation
    # stopped there would leave it: accept deployed, then switch
    down = _inventory_variant(lab, "client4-down", _unreachable("client4"))
    proc = vpnctl(lab, *down, "rotate", "l4", "--wait", "15", check=False)
    assert proc.returncode == 1 and "l4: step 1 (accept) FAILED at client4" in proc.stdout
    store = Keystore(Path(lab.directory) / "keystore")
    store.generate("l3", staged=True)
    for phase in ("accept", "switch"):
        store.set_rotation_phase("l3", phase)
        vpnctl(lab, "render")
        vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert _phases(lab) == {"l3": "switch", "l4": "accept"}
    ends = _status_ends(lab)
    assert {e["session_key_fingerprint"] for e in ends["l3"]} != {old["l3"]}, ends
    pids = daemon_pids(lab)
    with ExitStack() as stack:
        pings = {link: stack.enter_context(RunningPing(_ping(lab, link))) for link in ("l3", "l4")}
        proc = vpnctl(lab, "rotate", "--abort", "l3", "l4", "--wait", "30", "--json", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for link, ping in pings.items():
        assert ping.lost() == [], (link, ping.output)
    assert daemon_pids(lab) == pids
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    steps = {e["link"]: [(s["step"], s["number"]) for s in e["steps"]] for e in doc["links"]}
    assert steps == {
        "l3": [("accept", "back 1/2"), ("restore", "back 2/2")],
        "l4": [("restore", "back 1/1")],
    }
    assert {e["link"]: e["result"] for e in doc["links"]} == {"l3": "aborted", "l4": "aborted"}
    # the restore batch carried both links in one deploy
    assert len([ln for ln in proc.stderr.splitlines() if ": deploying to " in ln]) == 2
    assert _phases(lab) == {}
    status = _status_ends(lab)
    for link in ("l3", "l4"):
        assert {
            (e["session_key_fingerprint"], e["next_key_fingerprint"]) for e in status[link]
        } == {(old[link], None)}, status


def test_a_pending_change_of_another_link_is_refused_until_included(lab: LabState) -> None:
    old = _fingerprints(lab)
    pids = daemon_pids(lab)

    def edit_l4(doc: dict) -> None:
        next(link for link in doc["links"] if link["name"] == "l4")["maxdelay"] = 30

    edited = _inventory_variant(lab, "l4-edited", edit_l4)
    vpnctl(lab, *edited, "render")  # rendered, not deployed: pending at both ends of l4
    proc = vpnctl(lab, *edited, "rotate", "l1", "--wait", "30", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refused: the next step would also deploy changes" in proc.stdout, proc.stdout
    assert "server: l4: would restart (config changed)" in proc.stdout, proc.stdout
    assert "client4" not in proc.stdout  # not a host of l1: rotate l1 never deploys there
    assert "`vpnctl deploy server`" in proc.stdout, proc.stdout
    assert "--include-pending" in proc.stdout, proc.stdout
    assert "1 refused" in proc.stdout, proc.stdout
    # nothing was applied anywhere and no rotation is recorded
    assert daemon_pids(lab) == pids
    assert _phases(lab) == {}
    assert {e["next_key_fingerprint"] for e in _status_ends(lab)["l1"]} == {None}
    # included: the rotation goes through and l4's edit with it on l1's hosts (a restart of
    # l4's server end alone; its client end, on client4, waits for a deploy there)
    proc = vpnctl(lab, *edited, "rotate", "l1", "--include-pending", "--wait", "30", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rotated" in proc.stdout, proc.stdout
    after = daemon_pids(lab)
    assert {key for key in after if after[key] != pids.get(key)} == {("server", "l4")}
    assert _fingerprints(lab)["l1"] != old["l1"]
    assert "maxdelay 30" in (Path(lab.directory) / "build/server/etc/vpnd/l4.conf").read_text()
