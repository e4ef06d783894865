"""A serial link goes through the operator path like any other: inventory -> keygen -> render ->
deploy over ssh -> both ends up -> ping through the line -> status.

The 'cable' is a socat PTY pair whose two ends the lab's server and client open as their serial
devices (the lab hosts share the filesystem, each with its own network namespace).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import lab_exec, poll_until, running_lab, vpnctl
from tests.helpers.pty import pty_pair
from vpnctl.lab import LabError

pytestmark = pytest.mark.root


def test_a_serial_link_deploys_comes_up_and_passes_ping_like_any_other(tmp_path: Path) -> None:
    require_root_netns()
    require_tools("sshd", "ssh", "socat", "ping")
    with (
        running_lab(tmp_path / "lab", clients=1, base="ser") as state,
        pty_pair(f"{state.tag}-line") as line,
    ):
        # Given the lab's inventory with one more link, over a serial line
        inventory_path = Path(state.directory) / "inventory.yaml"
        inventory = yaml.safe_load(inventory_path.read_text())
        server, client = inventory["links"][0]["server"], inventory["links"][0]["client"]
        inventory["links"].append(
            {
                "name": "line",
                "server": server,
                "client": client,
                "transport": "serial",
                "devices": {"server": line.a, "client": line.b},
                "speed": 115200,
                "localline": True,
                "nortscts": True,
            }
        )
        inventory_path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        # When it is keyed, rendered, checked and deployed like the TCP link
        vpnctl(state, "keygen")
        vpnctl(state, "render")
        vpnctl(state, "render", "--check")
        deployed = vpnctl(state, "deploy", "--all")
        assert "line" in deployed.stdout
        # Then both ends are up with one key, and the tunnel carries pings
        status = json.loads(vpnctl(state, "status", "--json").stdout)
        line_status = next(link for link in status["links"] if link["link"] == "line")
        assert line_status["up"], line_status
        build = Path(state.directory) / "build"
        far = json.loads((build / server / "manifest.json").read_text())["links"]["line"]["local"]

        def pings() -> bool:
            try:
                lab_exec(state, client, "ping", "-c", "2", "-W", "2", far)
            except LabError:
                return False
            return True

        poll_until(pings, timeout=20, what="ping through the serial tunnel")
