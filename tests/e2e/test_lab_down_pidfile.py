"""``vpnctl lab down`` signals only processes inside the lab's namespaces: a stale sshd pidfile
whose PID now names some other process does not get that process killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vpnctl.lab import LabState, kill_pids, lab_down, pid_alive


def _bystander() -> subprocess.Popen[bytes]:
    """A process of this test, outside any lab namespace, that runs until stdin closes."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip


def test_a_pidfile_naming_a_process_outside_the_lab_is_left_alone(tmp_path: Path) -> None:
    proc = _bystander()
    try:
        pidfile = tmp_path / "sshd.pid"
        pidfile.write_text(f"{proc.pid}\n")
        LabState(tag="pidtest", directory=str(tmp_path), mgmt_net="198.18.250.0/24",
                 namespaces=["pidtest-gone"], sshd_pidfiles=[str(pidfile)]).save()  # fmt: skip
        removed = lab_down(tmp_path)
        assert pid_alive(proc.pid)
        assert proc.poll() is None
        assert any(f"pid {proc.pid}" in line and "left alone" in line for line in removed)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_kill_checks_again_before_each_signal() -> None:
    proc = _bystander()
    try:
        asked: list[int] = []
        kill_pids([proc.pid], timeout=0.1, ours=lambda pid: asked.append(pid) is not None)
        assert proc.poll() is None, "not ours: neither SIGTERM nor SIGKILL was sent"
        assert asked == [proc.pid, proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=10)
