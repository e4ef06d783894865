"""``vpnctl deploy``: ship the runtime, the rendered configs and the keys; restart what changed.

The package is laid out along the phases below, one module each: :mod:`.runtime` (1),
:mod:`.plan` (2, probe and plan), :mod:`.scripts` (every remote shell script), :mod:`.apply`
(3), :mod:`.confirm` (4), :mod:`.commit` (5 and 6, rollback and commit) and :mod:`.run` (the
orchestration, :func:`deploy`); :mod:`.common` holds what they share (the error, the paths on a
host, the plan and outcome records). Everything other modules use is re-exported here.

Theory of operation
-------------------
A deploy runs in phases; each phase runs over every host in parallel with a bounded pool, and
every remote action goes through :mod:`vpnctl.ssh` (one multiplexed connection per host).

1. **Runtime** (local, once per host *target*). A :class:`Target` is what a binary wheel must
   match on a host: CPython major.minor, machine (``uname -m``) and glibc version, as the probe
   reports them. :func:`build_runtime` makes a wheelhouse for one target: a wheel of
   ``vpnd_runtime`` built here (deterministic bytes, pure, fits every target) plus the wheels of
   its imports (cryptography, pyserial and their dependencies) at the versions
   installed on the operator's machine. For the operator's own target these come from
   ``pip wheel`` into :func:`wheel_cache` (as they always did: no network once warm); for any
   other target from ``pip download --only-binary=:all: --no-deps --python-version X.Y
   --implementation cp --platform manylinux_2_N_<arch>...`` (every manylinux tag the host's
   glibc accepts) into a cache keyed by the target and the pins. A target no wheel exists for
   fails that host at planning, naming host and target; nothing is applied there. The runtime's
   *stamp* is a hash over the wheels and the target, so hosts with different targets get their
   own bundle and a host whose Python was upgraded gets a fresh venv.
2. **Probe + plan.** One ssh call per host reports the installed runtime stamp, whether
   systemd runs, the host's target, the sha256 and mode of every file we would install, which
   links' daemons run, and the manifest of the last deploy (the wheelhouse for the host's
   target is built, or found cached, between probe and plan). :func:`plan_host` (pure)
   compares that with the desired files: a link *changes* when any of its files (config, key,
   unit) differs or the runtime changes; a link whose files match but whose daemon is not
   running is *started*; a link in the last deploy but no longer rendered is *removed*.
   Nothing else is touched. A link whose other end is a host of this deploy that failed at
   probe is taken out of the plan: it is not applied at either end and nobody waits for it
   (``HostOutcome.skipped`` and the recap say why); a hub's pairs with such a client are not
   confirmed.
   ``--dry-run`` stops here and prints a unified diff (key files redacted). The probe also
   reports the ssh user's uid (deploy needs root: directly, or through ``become: sudo``, which
   :mod:`vpnctl.ssh` applies to every remote command as ``sudo -n``), python3's real path, the
   complete runtimes already on the host, and a *pending* marker (below): a host where
   an earlier deploy applied changes but never committed them has every link restarted and
   confirmed again, so an interrupted deploy is never taken as current.
3. **Apply.** For each host with changes: install the runtime if its stamp differs (a new venv
   next to the old one, the wheels unpacked into it without pip by ``tools/wheel_install.py`` --
   every member checked against its RECORD hash, nothing outside the venv -- the daemon's modules
   imported once, then an atomic symlink switch; a complete ``venv-<stamp>`` already on the host is
   switched to without shipping anything), write the pending marker, back up the committed copies of
   the changed files (an existing backup of an uncommitted deploy is kept, never overwritten),
   unpack the new files from a tar stream on stdin (keys 0600, never in argv), stop removed links,
   and (re)start changed links -- ``systemctl restart`` under systemd, else SIGTERM by pidfile (only
   while a vpnd still holds the pidfile's flock, so a reused PID is never signalled), wait, ``vpnd
   -f CONF --daemon`` (a host's links all at once). A client end whose server end this deploy
   restarts on another host is started only after every apply, so its first connect finds the
   listener (no reconnect back-off). Before the files, the account the daemons run as (the
   inventory's ``daemon_user``) is created if missing; under systemd it is handed its key files. Its
   time bound grows with the number of links. If the apply fails or times out, that host is rolled
   back at once (best effort) and every link it shares with another host in this deploy is failed
   there too.
4. **Confirm.** For each changed link, poll the status records at *both* ends until both are
   up with the same key fingerprint (the one in the manifest), within ``wait`` seconds (each
   poll lets the host wait up to 3 s for its links to come up before it answers). An end
   this deploy restarted that is not running fails the link. A link whose other end this deploy
   did not touch and which is not deployed/running cannot be confirmed: reported as waiting.
5. **Roll back** (commit-confirm). A link that does not come up gets its previous files
   restored (or removed, if it is new) on every host where it changed, the previous runtime
   switched back, and the previous daemon restarted; the reason is reported.
6. **Commit.** Every host whose steps all ran records what it now runs (the new manifest, with
   rolled-back and not-applied links at their previous entry) and only then drops its backups and
   the pending marker. Ctrl-C during phases 3-6 rolls back the hosts already changed and not yet
   committed.

Apply, rollback and commit each hold ``flock`` on ``<state dir>/lock`` on the host, so two
deploys to one host never interleave (daemons are started with that descriptor closed). A host
named twice on the command line is deployed once.

A second deploy of the same build finds every hash equal and every daemon running: it changes
nothing, restarts nothing, and says so.
"""

from __future__ import annotations

# The names below are re-exported: other modules and the tests import them from here.
# ruff: noqa: F401
from vpnctl.deploy.apply import (
    apply_timeout,
)
from vpnctl.deploy.commit import (
    _committed_manifest,
)
from vpnctl.deploy.common import (
    DEFAULT_JOBS,
    DEFAULT_WAIT,
    POLL_INTERVAL,
    RUNTIME_DEPS,
    RUNTIME_DIR,
    RUNTIME_LINK,
    STAMP_LEN,
    STATE_DIR,
    UNIT_DIR,
    DeployError,
    DeployReport,
    DesiredFile,
    Echo,
    HostOutcome,
    HostPlan,
    RemoteState,
    _Printer,
)
from vpnctl.deploy.confirm import (
    BAD_ANSWER,
    STALE_AFTER,
    LinkRecord,
    _confirm_units,
    _peer_record,
    confirm_links,
    finite_number,
    parse_status_output,
    read_statuses,
)
from vpnctl.deploy.plan import (
    check_remote,
    desired_files,
    load_manifest,
    parse_probe,
    plan_host,
    redacted_diff,
)
from vpnctl.deploy.run import (
    _apply_confirm_commit,
    _dry_run_diff,
    deploy,
)
from vpnctl.deploy.runtime import (
    MIN_PYTHON,
    TARGET_PY,
    Runtime,
    Target,
    _runtime_wheel,
    build_runtime,
    dependency_closure,
    local_target,
    parse_target,
    runtime_stamp,
    target_cache,
    wheel_cache,
)
from vpnctl.deploy.scripts import (
    _SH_FUNCS,
    _SH_LOCKED,
    LOCK_WAIT,
    _account_sh,
    _run_as,
    _start_sh,
    _stop_sh,
    apply_script,
    commit_script,
    install_runtime_script,
    probe_script,
    rollback_script,
    status_command,
    status_script,
)

__all__ = [
    "DeployError",
    "DeployReport",
    "DesiredFile",
    "HostPlan",
    "RemoteState",
    "Runtime",
    "Target",
    "build_runtime",
    "deploy",
    "desired_files",
    "local_target",
    "parse_target",
    "plan_host",
    "redacted_diff",
]
