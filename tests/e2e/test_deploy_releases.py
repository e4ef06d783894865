"""The runtime on the Pythons a fleet really has: a link between a Debian 11 (bullseye, Python
3.9) host and a Debian 12 (bookworm, Python 3.11) host, both booted as systemd containers
(``lab up --systemd --release bullseye,bookworm``), deployed by vpnctl as any fleet.

Deploy probes each host's target, fetches the cp39 wheelhouse for the bullseye host (cryptography
and cffi wheels for 3.9, no cp311-only wheel) and installs it without pip (RECORD-hash checked
unpack into ``venv --without-pip``); the link comes up, a ping crosses it, status reads both
ends, and the bullseye daemon is really run by python3.9.

The bullseye rootfs is built once per machine beside the bookworm one (about a minute more on a
fresh machine; cached in /var/cache/vpnctl/rootfs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pypi_reachable, require, require_root_netns, require_tools
from tests.helpers.lab import lab_ping, rendered_lab, tunnel_ends, vpnctl
from vpnctl import nspawn
from vpnctl.lab import LabState, container_exec

pytestmark = pytest.mark.root

RELEASES = {"server": ("bullseye", "3.9"), "client1": ("bookworm", "3.11")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "ping", "systemd-nspawn", "debootstrap", "nsenter")
    require(pypi_reachable(), "PyPI is unreachable: the bullseye host's cp39 wheels are fetched")
    directory = tmp_path_factory.mktemp("releases") / "lab"
    with rendered_lab(directory, clients=1, base="rel", systemd=True,
                      release="bullseye,bookworm", say=print) as state:  # fmt: skip
        yield state


def _sh(lab: LabState, host: str, *argv: str) -> str:
    return container_exec(lab, host, *argv).stdout


def test_each_host_boots_its_own_debian_release_and_python(lab: LabState) -> None:
    for host in lab.hosts:
        release, python = RELEASES[host.name]
        assert host.release == release
        os_release = _sh(lab, host.name, "cat", "/etc/os-release")
        assert f"VERSION_CODENAME={release}" in os_release, (host.name, os_release)
        version = _sh(lab, host.name, "python3", "-c", "import sys; print(sys.version)")
        assert version.startswith(f"{python}."), (host.name, version)
    state = json.loads((Path(lab.directory) / "lab.json").read_text())
    assert [h["release"] for h in state["hosts"]] == ["bullseye", "bookworm"]


def test_a_link_between_python_3_9_and_3_11_hosts_deploys_comes_up_and_reads_both_ends(
    lab: LabState,
) -> None:
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1" in proc.stdout, proc.stdout
    # the bullseye host got a wheelhouse for its own Python: cp39 (or abi3 for 3.9) wheels
    server = next(h for h in lab.hosts if h.name == "server")
    site = Path(server.rootfs, "opt/vpnd/current/lib")
    assert [p.name for p in site.iterdir()] == ["python3.9"], list(site.iterdir())
    dists = sorted(p.name for p in (site / "python3.9/site-packages").glob("*.dist-info"))
    assert any(d.startswith("cryptography-") for d in dists), dists
    assert any(d.startswith("vpnd_runtime-") for d in dists), dists
    wheel_tags = [(site / "python3.9/site-packages" / d / "WHEEL").read_text() for d in dists]
    assert not [t for t in wheel_tags if "cp311" in t or "cp312" in t], wheel_tags
    # ... and its daemon runs on python3.9 under systemd
    pid = _sh(lab, "server", "systemctl", "show", "vpnd-l1", "-p", "MainPID", "--value").strip()
    assert pid.isdigit() and pid != "0", pid
    exe = _sh(lab, "server", "readlink", "-f", f"/proc/{pid}/exe").strip()
    assert os.path.basename(exe) == "python3.9", exe
    # a ping through the tunnel, from the bookworm end to the bullseye end and back
    for link, (client, client_tunnel, server_tunnel) in tunnel_ends(lab).items():
        lab_ping(lab, client, server_tunnel, count=3, what=f"{link}: ")
        lab_ping(lab, "server", client_tunnel, what=f"{link}: ")
    status = vpnctl(lab, "status").stdout  # reads both ends' records over ssh
    assert "1/1 link(s) up" in status, status
    doc = json.loads(vpnctl(lab, "status", "--json").stdout)
    assert doc["all_up"] is True, doc
    (link,) = doc["links"]
    ends = {end["host"]: end for end in link["ends"]}
    assert set(ends) == {"server", "client1"}, link
    assert {end["state"] for end in ends.values()} == {"up"}, link
    assert ends["server"]["key_fingerprint"] == ends["client1"]["key_fingerprint"], link


def test_a_second_deploy_to_the_mixed_fleet_changes_nothing(lab: LabState) -> None:
    assert "no changes" in vpnctl(lab, "deploy", "--all").stdout


def test_the_bullseye_rootfs_is_cached_beside_the_bookworm_one() -> None:
    cache = nspawn.rootfs_cache()
    for suite in ("bullseye", "bookworm"):
        assert (cache / nspawn.recipe_id(suite) / nspawn.COMPLETE).exists(), suite
