"""What every phase of a deploy shares: its error, the paths on a host, the defaults, the
plan and outcome records and the progress printer."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vpnctl.inventory import UserError

if TYPE_CHECKING:
    from vpnctl.deploy.runtime import Target


RUNTIME_DIR = "opt/vpnd"  # below the host prefix: venv-<stamp>/, current -> venv-<stamp>


RUNTIME_LINK = "usr/local/bin/vpnd"  # below the host prefix (rendering.RUNTIME_PATH)


COMPLETE = ".vpnctl-complete"  # in a venv-<stamp>/ whose install finished (reusable)
STATE_DIR = "var/lib/vpnctl"  # below the host prefix: deployed manifest, commit-confirm backups


UNIT_DIR = "/etc/systemd/system"


RUNTIME_DEPS = ("cryptography", "pyserial")


DEFAULT_JOBS = 8


DEFAULT_WAIT = 30.0


POLL_INTERVAL = 0.5


STAMP_LEN = 16


Echo = Callable[[str], None]


class DeployError(UserError):
    """Deploy cannot proceed (missing build, unknown host, runtime build failure...)."""


@dataclass(frozen=True)
class DesiredFile:
    """A file deploy installs on a host. ``secret`` files never appear in any output."""

    path: str
    data: bytes = field(repr=False)
    mode: int
    link: str
    kind: str  # "config" | "key" | "nextkey" | "unit"; a hub: "peer", "peerkey", "peernextkey"
    mtime: float | None = None

    @property
    def sha256(self) -> str:
        """Hex digest of the content (compared with the host's copy)."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def secret(self) -> bool:
        """True for key files."""
        return self.kind in ("key", "peerkey")


@dataclass(frozen=True)
class RemoteState:
    """What the probe found on a host."""

    stamp: str | None
    systemd_running: bool
    python: str | None
    #: path -> (sha256, mode, "user:group" or "" when not reported) or None when absent
    files: Mapping[str, tuple[str, int, str] | None]
    running: Mapping[str, bool]  # link -> daemon alive
    deployed: Mapping[str, Any] | None  # manifest recorded by the last successful deploy
    pending: bool = False  # an earlier deploy applied changes here and never committed them
    uid: int | None = None  # the ssh user's uid (deploy needs root)
    target: Target | None = None  # the host's python/machine/glibc (None: not reported)
    target_text: str | None = None  # the probe's raw target line (None: no such line)
    venvs: frozenset[str] = frozenset()  # stamps of complete runtimes on the host (reusable)
    python_exe: str | None = None  # python3's real path on the host (sys.executable)


@dataclass
class HostPlan:
    """What deploy will do on one host."""

    host: str
    use_systemd: bool
    runtime: bool  # install the runtime
    changed: dict[str, list[str]]  # link -> why (files that differ, "runtime")
    start: list[str]  # unchanged links whose daemon is not running
    removed: list[str]  # links deployed before, not rendered any more
    unchanged: list[str]
    files: list[DesiredFile]  # the files that differ from the host's copies: written, backed up
    paths: dict[str, list[str]] = field(default_factory=dict)  # link -> all its paths (rollback)
    # hubs whose only change is their peers directory: SIGHUP, no restart (hub -> why)
    reload: dict[str, list[str]] = field(default_factory=dict)
    # hub -> peer files and keys of clients removed from it: deleted (backed up first)
    prune: dict[str, list[str]] = field(default_factory=dict)
    # hub -> clients whose pairing this deploy changes (added or changed): confirmed after it
    touched_clients: dict[str, list[str]] = field(default_factory=dict)

    @property
    def noop(self) -> bool:
        """True when nothing at all would be done on this host."""
        return not (self.runtime or self.changed or self.start or self.removed or self.reload)

    @property
    def restarts(self) -> list[str]:
        """Links whose daemon will be (re)started."""
        return sorted(set(self.changed) | set(self.start))


@dataclass
class HostOutcome:
    """What happened on one host."""

    host: str
    plan: HostPlan | None = None
    error: str | None = None
    confirmed: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # link -> why not confirmable
    rolled_back: dict[str, str] = field(default_factory=dict)  # link -> why
    # link -> why it was not applied at all (its other end failed before apply)
    skipped: dict[str, str] = field(default_factory=dict)
    runtime_switched: bool = False  # the new runtime was installed (a rollback switches back)
    unreachable: bool = False  # the probe could not reach the host (ssh failed or timed out)


@dataclass
class DeployReport:
    """The result of a deploy: per host outcomes and the diff (dry run)."""

    outcomes: dict[str, HostOutcome]
    diff: str = ""
    runtime_stamp: str = ""

    @property
    def ok(self) -> bool:
        """No host failed and nothing was rolled back."""
        return all(o.error is None and not o.rolled_back for o in self.outcomes.values())

    @property
    def changed_anything(self) -> bool:
        """True when some host had something to do."""
        return any(o.plan is not None and not o.plan.noop for o in self.outcomes.values())


class _Printer:
    """Thread-safe progress lines: ``[ 2/20] client1   probed: l1 changed``."""

    def __init__(self, echo: Echo, total: int) -> None:
        self.echo = echo
        self.total = total
        self.lock = threading.Lock()
        self.done = 0

    def line(self, host: str, message: str, *, finished: bool = False) -> None:
        with self.lock:
            width = len(str(self.total))
            if finished:
                self.done += 1
                counter = f"[{self.done:>{width}}/{self.total}]"
            else:
                counter = f"[{'.' * width}/{self.total}]"
            self.echo(f"{counter} {host:<12} {message}")


def apply_timeout(plan: HostPlan) -> float:
    """The time bound of one host's apply: each stop may wait 10 s for a daemon to exit, so the
    bound grows with the number of links the apply stops and starts."""
    return 60.0 + 15.0 * (len(plan.restarts) + len(plan.removed) + len(plan.reload))
