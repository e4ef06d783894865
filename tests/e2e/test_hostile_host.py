"""A hostile (or broken) host over real ssh: escape sequences, wrong types and a damaged deploy
record reach vpnctl status and deploy through the lab's real sshd, and must come out as data --
escaped, and as that host's error line -- never raw on the terminal nor as a crash."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import rendered_lab, vpnctl
from vpnctl.lab import LabState

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen")
    with rendered_lab(tmp_path_factory.mktemp("hostile") / "lab", clients=1, base="ho") as state:
        yield state


def _entry(state: LabState, host: str) -> dict:
    manifest = json.loads((Path(state.directory) / "build" / host / "manifest.json").read_text())
    return manifest["links"]["l1"]


def _plant(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def test_status_escapes_a_hostile_record_and_reports_a_malformed_one(lab: LabState) -> None:
    sleeper = subprocess.Popen(["sleep", "120"])  # a live pid for the planted pidfiles
    try:
        now = time.time()
        record = {"state": "up\x1b]0;owned\x07", "reason": "\x1b[2J", "since": now - 30,
                  "updated": now, "pid": sleeper.pid, "peer": "198.18.1.9:1\x1b[31m",
                  "key_fingerprint": "ab12\u202e", "bytes_in": 1, "bytes_out": 2}  # fmt: skip
        server, client = _entry(lab, "server"), _entry(lab, "client1")
        for entry, rec in ((server, record), (client, {**record, "last_rtt": "fast"})):
            _plant(entry["config"], "# planted\n")
            _plant(entry["pidfile"], f"{sleeper.pid}\n")
            _plant(entry["statusfile"], json.dumps(rec))
        proc = vpnctl(lab, "status", "--wide", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr == ""
        assert "\x1b" not in proc.stdout and "\u202e" not in proc.stdout
        assert "up\\x1b]0;owned\\x07" in proc.stdout
        assert "198.18.1.9:1\\x1b[31m" in proc.stdout
        assert (
            "BAD ANSWER client1: link l1: malformed answer: field 'last_rtt' is 'fast', not a "
            "number" in proc.stdout.splitlines()
        )
        doc = json.loads(vpnctl(lab, "status", "--json", check=False).stdout)
        assert set(doc["bad_answers"]) == {"client1"}
        _plant(server["statusfile"], '{"state": "up", "pid": ')  # cut short
        proc = vpnctl(lab, "status", check=False)
        assert (
            "BAD ANSWER server: link l1: malformed answer: the status record is not JSON (cut "
            "short?)" in proc.stdout.splitlines()
        ), proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
        for entry in (_entry(lab, "server"), _entry(lab, "client1")):
            for key in ("config", "pidfile", "statusfile"):
                Path(entry[key]).unlink(missing_ok=True)


def test_deploy_reports_a_damaged_deploy_record_as_that_hosts_failure(lab: LabState) -> None:
    host = next(h for h in lab.hosts if h.name == "client1")
    record = Path(host.prefix) / "var/lib/vpnctl/manifest.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("[1, 2, 3]")
    try:
        proc = vpnctl(lab, "deploy", "--dry-run", "--all", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        recap = proc.stdout[proc.stdout.index("RECAP") :].splitlines()
        assert recap[0] == "RECAP (dry run: nothing was changed)"
        assert recap[1].split()[:2] == ["server", "changed"]
        assert recap[2] == (
            "client1  failed       malformed probe answer: var/lib/vpnctl/manifest.json on the "
            "host is not a vpnctl manifest"
        )
        assert recap[3] == "2 host(s): 0 ok, 1 changed, 1 failed, 0 unreachable"
    finally:
        os.unlink(record)
