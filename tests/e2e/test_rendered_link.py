"""From inventory to a working tunnel: keygen -> render -> the two rendered configs run by vpnd.

This is the whole operator path minus SSH: the key is placed where the manifest says (as deploy
does), and each side's rendered config is started with `vpnd -f` inside its own namespace.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import namespace_pair, new_tag, poll_until, vpnd
from vpnctl.cli import app

pytestmark = pytest.mark.root


def test_rendered_pair_of_one_link_comes_up_and_passes_ping(tmp_path: Path) -> None:
    require_root_netns()
    require_tools("ping")
    tag = new_tag("vr")
    roots = {h: tmp_path / f"{tag}-{h}" for h in ("hq", "branch")}
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        textwrap.dedent(f"""\
        version: 1
        defaults:
          systemd: false
          daemon_user: root  # the prefixes sit below pytest's 0700 tmp_path
          keepalive: 2
        hosts:
          - name: hq
            address: 198.18.1.1
            ssh: {{host: 198.18.0.1}}
            prefix: {roots["hq"]}
          - name: branch
            address: 198.18.1.2
            ssh: {{host: 198.18.0.2}}
            prefix: {roots["branch"]}
        links:
          - name: {tag}
            server: hq
            client: branch
            port: 24742
            routes:
              server: [198.18.100.0/24]
    """)
    )
    runner = CliRunner()
    opts = [
        "-i",
        str(inventory),
        "--keystore",
        str(tmp_path / "ks"),
        "--build",
        str(tmp_path / "build"),
    ]
    # Given keys and rendered configs that check out
    for command in (["keygen"], ["render"], ["render", "--check"]):
        result = runner.invoke(app, [*opts, *command])
        assert result.exit_code == 0, result.output
    with namespace_pair(tag) as pair:
        pair.server.run("ip", "addr", "add", "198.18.100.1/24", "dev", "lo")
        procs = {}
        for host, ns in (("hq", pair.server), ("branch", pair.client)):
            manifest = json.loads((tmp_path / "build" / host / "manifest.json").read_text())
            link = manifest["links"][tag]
            # When the files are where the manifest says (deploy's job) ...
            for rel in link["files"]:
                dest = roots[host] / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "build" / host / rel, dest)
            keyfile = Path(link["keyfile"])
            keyfile.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "ks" / f"{tag}.key", keyfile)
            keyfile.chmod(0o600)
            procs[host] = (ns, Path(link["config"]), link)
        # ... and vpnd runs the rendered config on each side
        with (
            vpnd(procs["hq"][0], procs["hq"][1], tmp_path, "hq") as server,
            vpnd(procs["branch"][0], procs["branch"][1], tmp_path, "branch") as client,
        ):
            poll_until(
                lambda: server.state() == "up" and client.state() == "up",
                20,
                what="rendered link up",
            )
            # Then the tunnel passes ping, both ways and to the network behind the server
            assert pair.client.ping(procs["hq"][2]["local"])
            assert pair.server.ping(procs["branch"][2]["local"])
            assert pair.client.ping("198.18.100.1")
            assert client.status()["key_fingerprint"] == procs["branch"][2]["key_fingerprint"]
