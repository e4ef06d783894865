"""deploy's stop step (no systemd): signal the PID a pidfile names only while a vpnd still holds
the pidfile's flock, so a stale pidfile whose PID was reused never kills an unrelated process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import require_tools
from vpnctl.deploy import _SH_FUNCS, _SH_LOCKED, _stop_sh, probe_script

LOCKER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what vpnd's write_pidfile does
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _stop(pidfile: Path) -> subprocess.CompletedProcess[str]:
    script = _SH_FUNCS + _SH_LOCKED + _stop_sh("l1", {"pidfile": str(pidfile)}, use_systemd=False)
    return subprocess.run(
        ["sh", "-c", script], check=True, capture_output=True, text=True, timeout=30
    )


def test_a_stale_pidfile_naming_an_unrelated_live_process_does_not_get_it_killed(tmp_path):
    require_tools("flock", "sleep")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "l1.pid"
        pidfile.write_text(f"{bystander.pid}\n")  # the PID was reused; nobody holds the lock
        _stop(pidfile)
        assert bystander.poll() is None, "deploy's stop step killed an unrelated process"
        assert not pidfile.exists()  # the stale file is cleared
    finally:
        bystander.kill()
        bystander.wait(10)


def test_a_pidfile_locked_by_its_daemon_gets_that_daemon_stopped(tmp_path):
    require_tools("flock")
    pidfile = tmp_path / "l1.pid"
    daemon = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(pidfile)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().strip() == "ready"
        _stop(pidfile)
        assert daemon.wait(10) == -15  # SIGTERM
    finally:
        daemon.kill()
        daemon.wait(10)


def test_the_probe_does_not_count_a_stale_pidfile_naming_a_live_process_as_running(tmp_path):
    # else deploy would plan "nothing to do" for a link whose daemon is gone
    require_tools("flock", "sleep")
    bystander = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "l1.pid"
    manifest = {"prefix": str(tmp_path), "links": {"l1": {"pidfile": str(pidfile)}}}
    try:
        pidfile.write_text(f"{bystander.pid}\n")
        out = subprocess.run(["sh", "-c", probe_script(manifest, [])], capture_output=True,
                             text=True, timeout=60, check=True).stdout  # fmt: skip
        assert "running l1 no" in out.splitlines()
    finally:
        bystander.kill()
        bystander.wait(10)
