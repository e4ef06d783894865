"""Running the operator's scripts (slipup/slipdown/linkup/linkdown) without stalling the tunnel.

Scripts run one at a time, in the order they were asked for, on a worker thread: a slow linkup
script never delays packets, and linkdown can never overtake the linkup it undoes. Each run has a
timeout (the script is killed after it), and its exit code is logged. The arguments a script gets
are documented in docs/directives.md: the interface name first (as vpnd's slipup/slipdown), then
local, remote and the peer's carrier address; the same facts are in VPND_* environment variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from dataclasses import dataclass

from vpnd_runtime.trusted import check_trusted

log = logging.getLogger("vpnd.hooks")

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class HookRun:
    """One script invocation."""

    event: str  # slipup, slipdown, linkup, linkdown
    script: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


class HookRunner:
    """A single worker thread that runs hooks in order; `drain()` waits for the queue to empty."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._queue: queue.Queue[HookRun | threading.Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="vpnd-hooks", daemon=True)
        self._thread.start()

    def submit(self, event: str, script: str | None, args: list[str], env: dict[str, str]) -> None:
        """Queue `script` for `event`; a None script is no hook and does nothing."""
        if not script:
            return
        env = {**env, "VPND_EVENT": event}
        self._queue.put(HookRun(event, script, tuple(args), tuple(sorted(env.items()))))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every hook queued so far has finished; True when drained within `timeout`."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued hooks (bounded by `timeout`) and stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            run_hook(item, self.timeout)


def run_hook(item: HookRun, timeout: float) -> int | None:
    """Run one hook now, logging how it ended; returns the exit code (None on timeout/failure)."""
    import subprocess  # noqa: PLC0415 - lazy: ~1 MB of RSS a daemon without hooks never needs

    try:  # checked on every run: a script made writable after start is not run either
        check_trusted(item.script, f"{item.event} script")
    except OSError as exc:
        log.error("%s script %s not run: %s", item.event, item.script, exc)
        return None
    env = dict(os.environ)
    env.update(dict(item.env))
    argv = [item.script, *item.args]
    try:
        # Its own session, so a timeout ends the script's children too (killpg), not just it.
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        log.error("%s script %s could not run: %s", item.event, item.script, exc.strerror or exc)
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        log.warning("%s script %s killed after %.0f s timeout", item.event, item.script, timeout)
        return None
    output = out.decode(errors="replace").strip()
    if output:
        for line in output.splitlines()[-5:]:
            log.info("%s: %s", item.event, line)
    if proc.returncode == 0:
        log.info("%s script %s exited 0", item.event, item.script)
    else:
        log.warning("%s script %s exited %d", item.event, item.script, proc.returncode)
    return proc.returncode
