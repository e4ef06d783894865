"""`vpnctl status` on the real lab: both ends of every link, a cut WAN link, an unreachable host."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import poll_until, rendered_lab, vpnctl
from vpnctl.lab import LabState

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    with rendered_lab(tmp_path_factory.mktemp("status") / "lab", clients=2, base="st") as state:
        vpnctl(state, "deploy", "--all", "--wait", "30")
        yield state


def _status(state: LabState, *args: str) -> tuple[int, dict]:
    proc = vpnctl(state, "status", "--json", *args, check=False)
    return proc.returncode, json.loads(proc.stdout)


def _link(doc: dict, name: str) -> dict:
    return next(link for link in doc["links"] if link["link"] == name)


def test_status_shows_every_link_up_from_both_ends_with_matching_keys(lab: LabState) -> None:
    code, doc = _status(lab)
    assert code == 0, doc
    assert doc["all_up"] is True
    for link in doc["links"]:
        assert link["up"] is True
        assert sorted(e["role"] for e in link["ends"]) == ["client", "server"]
        assert len({e["key_fingerprint"] for e in link["ends"]}) == 1
        for end in link["ends"]:
            assert end["state"] == "up"
            assert end["peer"]
            assert end["uptime"] is not None
            assert end["key_age"] is not None
    table = vpnctl(lab, "status").stdout
    assert "2/2 link(s) up" in table
    assert "KEY AGE" in table


def test_status_shows_a_link_down_after_its_wan_link_is_cut(lab: LabState) -> None:
    subprocess.run(["ip", "-n", f"{lab.tag}-client1", "link", "set", "wan0", "down"], check=True)
    try:

        def l1_down() -> dict | None:
            code, doc = _status(lab)
            link = _link(doc, "l1")
            return doc if code == 1 and not link["up"] and _link(doc, "l2")["up"] else None

        doc = poll_until(l1_down, timeout=20, what="l1 reported down, l2 still up", interval=0.5)
        why = _link(doc, "l1")["why"]
        assert "no answer from peer" in why or "unreach" in why.lower(), why
        table = vpnctl(lab, "status", check=False).stdout
        assert "DOWN l1:" in table
        assert "1/2 link(s) up" in table
    finally:
        subprocess.run(["ip", "-n", f"{lab.tag}-client1", "link", "set", "wan0", "up"], check=True)
    poll_until(lambda: _status(lab)[0] == 0, timeout=30, what="l1 back up", interval=0.5)


def test_an_unreachable_host_shows_as_unreachable_within_the_bound(lab: LabState) -> None:
    client2 = next(h for h in lab.hosts if h.name == "client2")
    subprocess.run(["ip", "link", "set", client2.root_veth, "down"], check=True)
    try:
        started = time.monotonic()
        code, doc = _status(lab, "--timeout", "4")
        elapsed = time.monotonic() - started
        assert code == 1
        assert "client2" in doc["unreachable"]
        assert elapsed < 10, f"status took {elapsed:.1f}s with a 4 s bound"
        ends = {e["host"]: e for e in _link(doc, "l2")["ends"]}
        assert ends["client2"]["state"] == "unreachable"
        assert ends["server"]["state"] == "up"  # the other hosts still answered
        assert _link(doc, "l1")["up"] is True
    finally:
        subprocess.run(["ip", "link", "set", client2.root_veth, "up"], check=True)


def test_status_of_one_host_also_asks_the_far_end_of_its_links(lab: LabState) -> None:
    code, doc = _status(lab, "client1")
    assert code == 0
    assert [link["link"] for link in doc["links"]] == ["l1"]
    assert sorted(e["host"] for e in doc["links"][0]["ends"]) == ["client1", "server"]
