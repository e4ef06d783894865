"""The rendered systemd unit and configs: vpnd runs as an unprivileged user in a sealed unit.

`systemd-analyze security --offline=true` rates a unit file without a running systemd (this
machine has none; the real-systemd run of the unit is a later issue). The score must stay ≤ 2.5.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from vpnctl.inventory import InventoryError, allocate_tunnels, parse_inventory
from vpnctl.rendering import render
from vpnd_runtime.config import parse_config
from vpnd_runtime.keyfile import fingerprint

INVENTORY = """version: 1
{defaults}hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
    prefix: /srv/beta
links:
  - name: ab
    server: alpha
    client: beta
  - name: line
    server: alpha
    client: beta
    transport: serial
    devices: {{server: /dev/ttyS0, client: /dev/ttyUSB0}}
"""


def _render(defaults: str = "") -> dict[str, bytes]:
    text = INVENTORY.format(defaults=defaults)
    inventory, _ = allocate_tunnels(parse_inventory(text, "inv.yaml"), {}, "record")
    keys = {link.name: fingerprint(hashlib.sha256(link.name.encode()).digest())
            for link in inventory.links}  # fmt: skip
    return render(inventory, keys)


def _exposure(unit: bytes, directory: Path, name: str) -> tuple[float, str]:
    require(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (apt: systemd)")
    path = directory / name  # the unit's file name must end in .service
    path.write_bytes(unit)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=25", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr  # --threshold=25: at most 2.5
    return float(found.group(1)), proc.stdout


@pytest.mark.parametrize(
    ("host", "link"), [("alpha", "ab"), ("beta", "ab"), ("alpha", "line"), ("beta", "line")]
)
def test_the_rendered_unit_scores_at_most_2_5_exposure(tmp_path: Path, host: str, link: str):
    unit = _render()[f"{host}/systemd/vpnd-{link}.service"]
    score, report = _exposure(unit, tmp_path, f"vpnd-{link}.service")
    assert score <= 2.5, report


def test_the_unit_runs_vpnd_as_the_vpnd_user_with_two_capabilities_only():
    unit = _render()["alpha/systemd/vpnd-ab.service"].decode()
    lines = set(unit.splitlines())
    assert {
        "User=vpnd",
        "Group=vpnd",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DeviceAllow=/dev/net/tun rw",
        "RuntimeDirectory=vpnd",
        "RuntimeDirectoryPreserve=yes",
    } <= lines
    # a host with a prefix has its run directory elsewhere: made for the user, then writable
    beta = set(_render()["beta/systemd/vpnd-ab.service"].decode().splitlines())
    assert {"ExecStartPre=+/bin/chown vpnd:vpnd /srv/beta/run/vpnd",
            "ReadWritePaths=/srv/beta/run/vpnd"} <= beta  # fmt: skip
    # a serial side may open its line
    serial = set(_render()["alpha/systemd/vpnd-line.service"].decode().splitlines())
    assert {"DeviceAllow=/dev/ttyS0 rw", "SupplementaryGroups=dialout"} <= serial


def test_the_rendered_configs_name_the_user_so_a_root_start_drops_to_it():
    files = _render()
    for host in ("alpha", "beta"):
        config = parse_config(files[f"{host}/etc/vpnd/ab.conf"].decode())
        assert (config.user, config.group) == ("vpnd", "vpnd")


def test_daemon_user_and_group_come_from_the_inventory():
    files = _render("defaults:\n  daemon_user: vpn\n  daemon_group: netops\n")
    config = parse_config(files["alpha/etc/vpnd/ab.conf"].decode())
    assert (config.user, config.group) == ("vpn", "netops")
    assert "User=vpn\nGroup=netops\n" in files["alpha/systemd/vpnd-ab.service"].decode()


def test_daemon_user_root_keeps_the_old_root_daemon_in_a_still_sealed_unit(tmp_path: Path):
    files = _render("defaults:\n  daemon_user: root\n")
    config = parse_config(files["alpha/etc/vpnd/ab.conf"].decode())
    assert config.user is None
    unit = files["alpha/systemd/vpnd-ab.service"]
    assert b"User=" not in unit
    score, report = _exposure(unit, tmp_path, "vpnd-ab.service")
    assert score <= 2.5, report


@pytest.mark.parametrize("value", ["-x", "a b", "bad:name", "0"])
def test_a_malformed_daemon_user_is_an_inventory_error(value: str):
    with pytest.raises(InventoryError, match="daemon_user"):
        _render(f"defaults:\n  daemon_user: {value!r}\n")
