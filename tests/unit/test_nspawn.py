"""The pure parts of `lab up --systemd` (vpnctl/nspawn.py, vpnctl/lab.py): the nspawn command
line, the cache's naming, the inventory of a systemd lab, old lab records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpnctl import nspawn
from vpnctl.lab import LabHost, LabState, lab_inventory


def test_the_nspawn_command_line_carries_every_flag_a_lab_host_needs() -> None:
    argv = nspawn.nspawn_argv(Path("/l/hosts/server/rootfs"), "t1-server", "t1-server",
                              Path("/l/hosts/server/tun"))  # fmt: skip
    for flag in (
        "--boot",
        "--register=no",  # no systemd on the machine running the lab
        "--keep-unit",
        "--network-namespace-path=/run/netns/t1-server",
        "--bind=/l/hosts/server/tun:/dev/net/tun",  # a private 0666 node, not the machine's
        "--capability=CAP_NET_ADMIN",  # else TUNSETIFF fails with EPERM
        "--directory=/l/hosts/server/rootfs",
    ):
        assert flag in argv
    script = nspawn.SUPERVISOR.format(cgroups="/cg", machine="m", argv="nspawn")
    assert "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 nspawn" in script
    assert '"$rc" = 133' in script  # a reboot boots it again


def test_the_cache_is_named_by_the_recipe_and_a_complete_tree_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VPNCTL_ROOTFS_CACHE", str(tmp_path))
    assert nspawn.rootfs_cache() == tmp_path
    name = nspawn.recipe_id()
    assert name.startswith(f"{nspawn.SUITE}-") and name == nspawn.recipe_id()
    built = tmp_path / name
    built.mkdir()
    (built / nspawn.COMPLETE).write_text("debootstrap ...\n")
    said: list[str] = []
    assert nspawn.ensure_rootfs(said.append) == built
    assert said == []  # nothing to build: no message


def test_a_systemd_lab_inventory_is_that_of_real_hosts(tmp_path: Path) -> None:
    hosts = [
        LabHost("server", "server", "t-server", "198.18.200.2", "198.18.1.1", "/", "tm0",
                rootfs=str(tmp_path / "server/rootfs"), machine="t-server"),
        LabHost("client1", "client", "t-client1", "198.18.200.3", "198.18.1.11", "/", "tm1",
                rootfs=str(tmp_path / "client1/rootfs"), machine="t-client1"),
    ]  # fmt: skip
    inv = lab_inventory(hosts, tmp_path, tmp_path, systemd=True)
    defaults = inv["defaults"]
    assert isinstance(defaults, dict)
    assert defaults["systemd"] is True
    assert "daemon_user" not in defaults  # the default account `vpnd`, as deploy makes it
    assert [h["prefix"] for h in inv["hosts"]] == ["/", "/"]  # type: ignore[attr-defined]
    plain = lab_inventory(hosts, tmp_path, tmp_path)
    assert plain["defaults"]["systemd"] is False  # type: ignore[index]
    assert plain["defaults"]["daemon_user"] == "root"  # type: ignore[index]


def test_a_lab_record_from_before_systemd_labs_still_loads(tmp_path: Path) -> None:
    record = {
        "tag": "old", "directory": str(tmp_path), "mgmt_net": "198.18.200.0/24",
        "hosts": [{"name": "server", "role": "server", "namespace": "old-server",
                   "mgmt_ip": "198.18.200.2", "wan_ip": "198.18.1.1",
                   "prefix": str(tmp_path / "hosts/server/root"), "root_veth": "oldm0"}],
    }  # fmt: skip
    (tmp_path / "lab.json").write_text(json.dumps(record))
    state = LabState.load(tmp_path)
    assert state.systemd is False and state.container_cgroups == {}
    assert state.hosts[0].rootfs == ""


def test_each_debian_release_has_its_own_cached_tree_and_the_bookworm_name_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bullseye (Python 3.9) beside bookworm: two trees, two locks; an unknown release is
    refused before anything is built."""
    monkeypatch.setenv("VPNCTL_ROOTFS_CACHE", str(tmp_path))
    assert nspawn.recipe_id("bookworm") == nspawn.recipe_id()
    old, new = nspawn.recipe_id("bullseye"), nspawn.recipe_id("bookworm")
    assert old.startswith("bullseye-") and old.split("-")[1] != new.split("-")[1]
    for name in (old, new):
        (tmp_path / name).mkdir()
        (tmp_path / name / nspawn.COMPLETE).write_text("debootstrap ...\n")
    assert nspawn.ensure_rootfs(None, "bullseye") == tmp_path / old
    assert nspawn.ensure_rootfs(None) == tmp_path / new
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == sorted([f"{old}.lock", f"{new}.lock"])
    with pytest.raises(
        nspawn.NspawnError, match=r"Debian release 'buster': the lab knows bullseye"
    ):
        nspawn.ensure_rootfs(None, "buster")


def test_lab_releases_are_one_for_every_host_or_one_per_host_server_first() -> None:
    from vpnctl.lab import LabError, parse_releases

    assert parse_releases("bullseye", 3) == ["bullseye"] * 3
    assert parse_releases("bullseye,bookworm", 2) == ["bullseye", "bookworm"]
    with pytest.raises(LabError, match=r"--release bullseye,bookworm: give one release, or one"):
        parse_releases("bullseye,bookworm", 3)
    with pytest.raises(LabError, match=r"'jessie' is not one of bullseye, bookworm, trixie"):
        parse_releases("jessie", 2)


def test_a_release_without_systemd_hosts_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    from vpnctl.lab import LabError, lab_up

    with pytest.raises(LabError, match=r"--release picks the Debian release of systemd hosts"):
        lab_up(tmp_path / "lab", clients=1, release="bullseye")
    assert not (tmp_path / "lab").exists()
