"""deploy and the account vpnd runs as: created on the host (once), handed what it must read and
write, and nothing when the inventory keeps the daemon root."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from tests.conftest import require, require_tools
from vpnctl.deploy import DesiredFile, HostPlan, _account_sh, _start_sh, apply_script

PREFIX = "/srv/h1"
ENTRY = {
    "config": f"{PREFIX}/etc/vpnd/l1.conf",
    "keyfile": f"{PREFIX}/etc/vpnd/l1.key",
    "pidfile": f"{PREFIX}/run/vpnd/l1.pid",
    "statusfile": f"{PREFIX}/run/vpnd/l1.status.json",
}


def _manifest(run_as: list[str] | None) -> dict:
    return {"host": "h1", "prefix": PREFIX, "systemd": True, "run_as": run_as,
            "links": {"l1": ENTRY}}  # fmt: skip


def _plan(use_systemd: bool) -> HostPlan:
    files = [
        DesiredFile(ENTRY["config"], b"mode server\n", 0o644, "l1", "config"),
        DesiredFile(ENTRY["keyfile"], b"ab" * 32 + b"\n", 0o600, "l1", "key"),
    ]
    return HostPlan("h1", use_systemd, False, ["l1"], [], [], [], files, {})


def test_the_account_is_created_once_and_then_left_alone():
    require(os.geteuid() == 0, "needs root (useradd)")
    require_tools("useradd", "groupadd", "userdel", "groupdel", "getent")
    name = f"vpndt{os.getpid() % 100000}"
    script = _account_sh((name, name))
    try:
        for _ in range(2):  # the second deploy finds it and changes nothing
            proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True,
                                  timeout=60, check=False)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
        entry = pwd.getpwnam(name)
        assert entry.pw_uid < 1000  # a system account
        assert entry.pw_shell == "/usr/sbin/nologin"
        assert entry.pw_dir == "/nonexistent"
        assert not os.path.exists(f"/home/{name}")
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


def test_apply_creates_the_account_before_unpacking_and_hands_it_the_key_under_systemd():
    script = apply_script(_plan(use_systemd=True), _manifest(["vpnd", "vpnd"]), {})
    account = script.index("useradd --system --gid vpnd")
    assert account < script.index("tar -x")
    assert f"chown vpnd:vpnd {ENTRY['keyfile']}" in script  # systemd starts vpnd as the user
    assert f"chmod 0755 {PREFIX}/etc/vpnd" in script  # it reads its config there


def test_without_systemd_the_user_gets_the_key_too_and_the_run_directories():
    script = apply_script(_plan(use_systemd=False), _manifest(["vpnd", "vpnd"]), {})
    # vpnd starts as root and accepts a key of its `user`; after the drop, SIGHUP (a key
    # rotation's next key) reads the keys again as that user
    assert f"chown vpnd:vpnd {ENTRY['keyfile']}" in script
    assert f"chown vpnd:vpnd {PREFIX}/run/vpnd {PREFIX}/run/vpnd;" in script


def test_a_root_daemon_needs_no_account_and_no_chown():
    for use_systemd in (True, False):
        script = apply_script(_plan(use_systemd), _manifest(None), {})
        assert "useradd" not in script
        assert "chown" not in script
    assert "chown" not in _start_sh("l1", ENTRY, PREFIX, use_systemd=False, run_as=None)
