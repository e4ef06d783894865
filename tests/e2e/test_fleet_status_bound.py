"""``vpnctl status`` answers within its time bound however many hosts are silent (no hosts
needed: the ssh layer is replaced by hosts that never answer)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vpnctl import fleetstatus
from vpnctl.inventory import Ssh
from vpnctl.ssh import SshTimeout

HOSTS = 12


class SilentHost:
    """A host that never answers: each call waits out its own bound, then times out."""

    calls = 0

    def __init__(self, name: str, settings: Ssh, **_: Any) -> None:
        self.name = name

    def run(self, command: str, *, timeout: float = 30.0, **_: Any) -> None:
        SilentHost.calls += 1
        threading.Event().wait(timeout)
        raise SshTimeout(self.name, f"no answer within {timeout:g}s")


def _build(tmp_path: Path) -> Path:
    for i in range(HOSTS):
        peer = i + 1 if i % 2 == 0 else i - 1
        link = f"l{i // 2}"
        base = f"/srv/h{i}"
        manifest = {"host": f"h{i}", "prefix": base, "links": {link: {
            "peer": f"h{peer}", "role": "server" if i % 2 == 0 else "client",
            "config": f"{base}/l.conf", "keyfile": f"{base}/l.key",
            "pidfile": f"{base}/l.pid", "statusfile": f"{base}/l.json"}}}  # fmt: skip
        (tmp_path / f"h{i}").mkdir()
        (tmp_path / f"h{i}" / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_many_silent_hosts_are_reported_unreachable_within_one_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleetstatus, "SshHost", SilentHost)
    inventory = SimpleNamespace(
        file="inv.yaml",
        hosts=[SimpleNamespace(name=f"h{i}", ssh=Ssh(host=f"h{i}")) for i in range(HOSTS)],
    )
    started = time.monotonic()
    status = fleetstatus.collect(inventory, _build(tmp_path), timeout=0.6, jobs=2)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"{HOSTS} silent hosts, 2 jobs, 0.6 s bound: took {elapsed:.1f}s"
    assert sorted(status.unreachable) == sorted(f"h{i}" for i in range(HOSTS))
    assert not status.all_up
    assert any("bound ran out first" in why for why in status.unreachable.values())
