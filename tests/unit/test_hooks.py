"""Hook scripts: arguments, environment, order, timeouts that end the whole script."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.helpers.netns import poll_until
from vpnd_runtime.io.hooks import HookRun, HookRunner, run_hook


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_hooks_run_in_order_with_arguments_and_event_in_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "calls"
    script = _script(tmp_path, f'echo "$VPND_EVENT $*" >> {out}\n')
    runner = HookRunner(timeout=10)
    runner.submit("linkup", script, ["tun0", "a"], {})
    runner.submit("linkdown", script, ["tun0", "b"], {})
    runner.submit("slipdown", None, ["ignored"], {})
    assert runner.drain(10)
    runner.close(5)
    assert out.read_text().splitlines() == ["linkup tun0 a", "linkdown tun0 b"]


def test_exit_code_is_returned(tmp_path: Path) -> None:
    script = _script(tmp_path, "exit 3\n")
    assert run_hook(HookRun("linkup", script, (), ()), timeout=10) == 3


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = _script(tmp_path, f"sleep 60 &\necho $! > {pidfile}\nwait\n")
    started = time.monotonic()
    assert run_hook(HookRun("linkup", script, (), ()), timeout=0.5) is None
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # a zombie awaiting its reaper counts as gone
        return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"

    poll_until(gone, 5, what="the hook's child to be killed")


def test_a_missing_script_is_reported_not_raised(tmp_path: Path) -> None:
    assert run_hook(HookRun("linkup", str(tmp_path / "nope"), (), ()), timeout=1) is None
