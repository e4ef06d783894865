"""Ctrl-C during a deploy rolls back the hosts it already changed (no hosts needed: the ssh
layer is replaced by scripted hosts and the runtime build by a stub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.workspace import workspace
from vpnctl import deploy as deploymod
from vpnctl.inventory import load_inventory
from vpnctl.keystore import Keystore
from vpnctl.ssh import RemoteResult

RAN: list[tuple[str, str]] = []


class ScriptedHost:
    """Probe: a root host with nothing deployed. Apply on beta: the operator hits Ctrl-C."""

    def __init__(self, name: str, settings: Any, **_: Any) -> None:
        self.name = name

    def run(self, command: str, **_: Any) -> RemoteResult:
        if 'echo "uid $(id -u)"' in command:
            RAN.append((self.name, "probe"))
            return RemoteResult(0, b"stamp s1\nsystemd no\npython /usr/bin/python3\nuid 0\n", b"")
        if "tar -x" in command:
            RAN.append((self.name, "apply"))
            if self.name == "beta":
                raise KeyboardInterrupt
            return RemoteResult(0, b"applied-at 1.0\n", b"")
        RAN.append((self.name, "rollback" if "/pending" in command else "other"))
        return RemoteResult(0, b"", b"")


def test_ctrl_c_during_apply_rolls_back_every_host_already_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from vpnctl.cli import app

    base = workspace(tmp_path)
    for step in ("keygen", "render"):
        result = CliRunner().invoke(app, [*base, step])
        assert result.exit_code == 0, result.output
    monkeypatch.setattr("vpnctl.deploy.run.SshHost", ScriptedHost)
    stub = deploymod.Runtime(stamp="s1", wheels=(), pip=tmp_path / "pip.whl")
    monkeypatch.setattr("vpnctl.deploy.runtime.build_runtime", lambda *_a, **_k: stub)
    monkeypatch.setattr(deploymod.Runtime, "tarball", lambda _self: b"")
    lines: list[str] = []
    RAN.clear()
    with pytest.raises(KeyboardInterrupt):
        deploymod.deploy(load_inventory(tmp_path / "inventory.yaml"), ["alpha", "beta"],
                         tmp_path / "build", Keystore(tmp_path / "keystore"), jobs=1,
                         echo=lines.append)  # fmt: skip
    assert ("alpha", "apply") in RAN and ("beta", "apply") in RAN
    assert {("alpha", "rollback"), ("beta", "rollback")} <= set(RAN)
    assert "interrupted: rolling back the hosts already changed" in lines
