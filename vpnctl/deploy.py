"""``vpnctl deploy``: ship the runtime, the rendered configs and the keys; restart what changed.

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
   Nothing else is touched.
   ``--dry-run`` stops here and prints a unified diff (key files redacted). The probe also
   reports the ssh user's uid (deploy needs root) and a *pending* marker (below): a host where
   an earlier deploy applied changes but never committed them has every link restarted and
   confirmed again, so an interrupted deploy is never taken as current.
3. **Apply.** For each host with changes: install the runtime if its stamp differs (a new
   venv next to the old one, then an atomic symlink switch), write the pending marker, back up
   the committed copies of the changed files (an existing backup of an uncommitted deploy is
   kept, never overwritten), unpack the new files from a tar stream on stdin (keys 0600, never
   in argv), stop removed links, and (re)start changed links -- ``systemctl restart`` under
   systemd, else SIGTERM by pidfile (only while a vpnd still holds the pidfile's flock, so a
   reused PID is never signalled), wait, ``vpnd -f CONF --daemon``. Before the files, the
   account the daemons run as (the inventory's ``daemon_user``) is created if missing; under
   systemd it is handed its key files. Its time bound grows with
   the number of links. If the apply fails or times out, that host is rolled back at once (best
   effort) and every link it shares with another host in this deploy is failed there too.
4. **Confirm.** For each changed link, poll the status records at *both* ends until both are
   up with the same key fingerprint (the one in the manifest), within ``wait`` seconds. An end
   this deploy restarted that is not running fails the link. A link whose other end this deploy
   did not touch and which is not deployed/running cannot be confirmed: reported as waiting.
5. **Roll back** (commit-confirm). A link that does not come up gets its previous files
   restored (or removed, if it is new) on every host where it changed, the previous runtime
   switched back, and the previous daemon restarted; the reason is reported.
6. **Commit.** Every host whose steps all ran records what it now runs (the new manifest, with
   rolled-back links at their previous entry) and only then drops its backups and the pending
   marker. Ctrl-C during phases 3-6 rolls back the hosts already changed and not yet committed.

Apply, rollback and commit each hold ``flock`` on ``<state dir>/lock`` on the host, so two
deploys to one host never interleave (daemons are started with that descriptor closed). A host
named twice on the command line is deployed once.

A second deploy of the same build finds every hash equal and every daemon running: it changes
nothing, restarts nothing, and says so.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import hashlib
import io
import json
import math
import os
import platform
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import vpnd_runtime
from vpnctl.hostdata import check_record, clean_json
from vpnctl.inventory import Host, Inventory, UserError
from vpnctl.keystore import Keystore
from vpnctl.ssh import SshError, SshHost, SshTimeout, SshUnreachable, quote

try:
    from packaging.requirements import Requirement
except ImportError:  # pip (which deploy runs anyway) vendors the same library
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

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

RUNTIME_DIR = "opt/vpnd"  # below the host prefix: venv-<stamp>/, current -> venv-<stamp>
RUNTIME_LINK = "usr/local/bin/vpnd"  # below the host prefix (rendering.RUNTIME_PATH)
STATE_DIR = "var/lib/vpnctl"  # below the host prefix: deployed manifest, commit-confirm backups
UNIT_DIR = "/etc/systemd/system"
RUNTIME_DEPS = ("cryptography", "pyserial")
DEFAULT_JOBS = 8
DEFAULT_WAIT = 30.0
POLL_INTERVAL = 0.5
STAMP_LEN = 16
# A fixed timestamp for the files inside the runtime wheel: same sources -> same bytes -> same
# stamp, so an unchanged runtime is never reinstalled.
_ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)

Echo = Callable[[str], None]


class DeployError(UserError):
    """Deploy cannot proceed (missing build, unknown host, runtime build failure...)."""


# --------------------------------------------------------------------------------------------
# 1. The runtime wheelhouse


@dataclass(frozen=True)
class Runtime:
    """The wheelhouse shipped to hosts: its files and the stamp that names this version."""

    stamp: str
    wheels: tuple[Path, ...]  # installed into the host's venv
    pip: Path  # pip's own wheel, run in place (``python pip.whl/pip``) to install them

    def tarball(self) -> bytes:
        """Wheels and pip as an uncompressed tar (wheels are already compressed)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for wheel in self.wheels:
                tar.add(wheel, arcname=wheel.name)
            tar.add(self.pip, arcname=f"tools/{self.pip.name}")
        return buf.getvalue()


def _runtime_wheel(out_dir: Path) -> Path:
    """Build ``vpnd_runtime-<version>-py3-none-any.whl`` from the package sources, byte-stable."""
    version = vpnd_runtime.__version__
    package = Path(vpnd_runtime.__file__).parent
    dist = f"vpnd_runtime-{version}"
    sources = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    files: list[tuple[str, bytes]] = [
        (f"vpnd_runtime/{p.relative_to(package).as_posix()}", p.read_bytes()) for p in sources
    ]
    requires = "".join(f"Requires-Dist: {dep}\n" for dep in RUNTIME_DEPS)
    files += [
        (
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: vpnd-runtime\nVersion: {version}\n{requires}".encode(),
        ),
        (
            f"{dist}.dist-info/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: vpnctl\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (
            f"{dist}.dist-info/entry_points.txt",
            b"[console_scripts]\nvpnd = vpnd_runtime.cli:main\n",
        ),
        (f"{dist}.dist-info/top_level.txt", b"vpnd_runtime\n"),
    ]
    record = []
    for name, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files.append((f"{dist}.dist-info/RECORD", ("\n".join(record) + "\n").encode()))
    path = out_dir / f"{dist}-py3-none-any.whl"
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    tmp.replace(path)
    return path


MIN_PYTHON = (3, 11)
MIN_GLIBC = (2, 17)  # manylinux2014: the oldest baseline the runtime's binary wheels ship for
# Machines whose manylinux history starts before 2014 (manylinux1 = glibc 2.5, 2010 = 2.12).
_OLD_MANYLINUX = {"x86_64": (2, 5), "i686": (2, 5)}
_LEGACY_ALIASES = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}


@dataclass(frozen=True, order=True)
class Target:
    """What a binary wheel must match on a host: CPython ``python`` (major, minor), the
    machine (``uname -m``) and the glibc version (None: no glibc, e.g. musl)."""

    python: tuple[int, int]
    machine: str
    glibc: tuple[int, int] | None
    implementation: str = "cpython"

    @property
    def key(self) -> str:
        """A file-name-safe name, e.g. ``cp312-x86_64-glibc2.36`` (cache dirs, stamps, errors)."""
        impl = "cp" if self.implementation == "cpython" else self.implementation
        libc = f"glibc{self.glibc[0]}.{self.glibc[1]}" if self.glibc else "noglibc"
        return f"{impl}{self.python[0]}{self.python[1]}-{self.machine}-{libc}"

    def platform_tags(self) -> list[str]:
        """Every manylinux platform tag this host accepts, best (newest glibc) first: what
        ``pip download --platform`` is given. DeployError when there is none."""
        if self.implementation != "cpython":
            raise DeployError(f"target {self.key}: the runtime needs CPython, not "
                              f"{self.implementation}")  # fmt: skip
        if self.glibc is None:
            raise DeployError(f"target {self.key}: no glibc on the host (musl?); the runtime's "
                              "binary wheels are built for glibc (manylinux)")  # fmt: skip
        if not re.fullmatch(r"[a-z0-9_]+", self.machine):
            raise DeployError(f"target {self.key}: machine {self.machine!r} is not a plain name")
        major, minor = self.glibc
        oldest = _OLD_MANYLINUX.get(self.machine, MIN_GLIBC)
        if major != 2 or (major, minor) < oldest:
            raise DeployError(
                f"target {self.key}: glibc {major}.{minor} is older than any manylinux wheel "
                f"for {self.machine} (needs {oldest[0]}.{oldest[1]}+)"
            )
        tags = []
        for m in range(minor, oldest[1] - 1, -1):
            tags.append(f"manylinux_2_{m}_{self.machine}")
            alias = _LEGACY_ALIASES.get((2, m))
            if alias:
                tags.append(f"{alias}_{self.machine}")
        return tags


def parse_target(text: str) -> Target | None:
    """The probe's ``target`` line (``cpython 3.12 aarch64 glibc 2.31``; no libc words on a
    host without glibc) as a Target; None when it is not in that form."""
    words = text.split()
    if len(words) not in (3, 5):
        return None
    impl, version, machine = words[:3]
    match = re.fullmatch(r"(\d+)\.(\d+)", version)
    if not match or not re.fullmatch(r"[A-Za-z0-9_]+", machine) or not impl.isalnum():
        return None
    glibc: tuple[int, int] | None = None
    if len(words) == 5:
        libc = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", words[4])
        if words[3] == "glibc" and libc:
            glibc = (int(libc[1]), int(libc[2]))
        elif words[3] == "glibc":
            return None
    return Target((int(match[1]), int(match[2])), machine, glibc, impl)


def local_target() -> Target:
    """The operator machine's own target (its wheels are what ``pip wheel`` builds here)."""
    name, version = platform.libc_ver()
    glibc = None
    if name == "glibc" and (m := re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", version)):
        glibc = (int(m[1]), int(m[2]))
    return Target(
        (sys.version_info.major, sys.version_info.minor),
        platform.machine(),
        glibc,
        sys.implementation.name,
    )


# Printed by the probe: `target <implementation> <major.minor> <machine> [glibc <version>]`.
TARGET_PY = (
    "import platform, sys; print(sys.implementation.name, '%d.%d' % sys.version_info[:2], "
    "platform.machine(), *platform.libc_ver())"
)


def _dependency_pins() -> list[str]:
    """``name==version`` for each runtime dependency as installed here (what the tests ran on)."""
    pins = []
    for dep in RUNTIME_DEPS:
        try:
            pins.append(f"{dep}=={metadata.version(dep)}")
        except metadata.PackageNotFoundError as exc:
            raise DeployError(f"runtime dependency {dep} is not installed here") from exc
    return pins


_PY_IMPL = {"cpython": "CPython"}


def _marker_env(target: Target) -> dict[str, str]:
    """PEP 508 marker values of a Linux CPython host of `target`."""
    major, minor = target.python
    return {
        "implementation_name": target.implementation,
        "platform_python_implementation": _PY_IMPL.get(
            target.implementation, target.implementation
        ),
        "python_version": f"{major}.{minor}",
        "python_full_version": f"{major}.{minor}.0",
        "implementation_version": f"{major}.{minor}.0",
        "platform_machine": target.machine,
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "extra": "",
    }


def dependency_closure(target: Target) -> list[str]:
    """``name==version`` of every distribution the runtime needs on `target`, at the versions
    installed here: the runtime dependencies and what they require (markers evaluated for
    the target, extras skipped), sorted. The foreign-target wheelhouse downloads exactly these."""
    env = _marker_env(target)
    seen: dict[str, str] = {}
    todo = list(RUNTIME_DEPS)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            seen[name] = metadata.version(name)
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError as exc:
            raise DeployError(f"runtime dependency {name} (needed on {target.key}) is not "
                              "installed here, so its version is unknown") from exc  # fmt: skip
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return sorted(f"{name}=={version}" for name, version in seen.items())


def wheel_cache() -> Path:
    """Where dependency wheels are kept between deploys: ``$VPNCTL_WHEELS`` or the user cache."""
    explicit = os.environ.get("VPNCTL_WHEELS")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vpnctl" / "wheels"


def target_cache(deps: Path, target: Target, pins: Iterable[str]) -> Path:
    """The cache dir of a foreign target's wheels: next to `deps`, named by the target and a
    hash of the pins (new pins -> new dir, so an old wheelhouse is never mixed in)."""
    digest = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:12]
    return deps.with_name(f"{deps.name}-{target.key}-{digest}")


def runtime_stamp(wheels: Iterable[Path], target: Target) -> str:
    """The stamp of a wheelhouse for `target`: a hash over the wheels' names and bytes and the
    target's key (a host whose Python or glibc changed gets a fresh venv)."""
    digest = hashlib.sha256(f"target {target.key}\0".encode())
    for wheel in sorted(wheels, key=lambda p: p.name):
        digest.update(wheel.name.encode() + b"\0" + hashlib.sha256(wheel.read_bytes()).digest())
    return digest.hexdigest()[:STAMP_LEN]


def _pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def _fill_cache(deps: Path, marker: list[str], fetch: Callable[[Path], str | None]) -> None:
    """Fill `deps` unless its PINS file says `marker`: `fetch(tmp)` fills a fresh dir (returns an
    error text or None), which then replaces `deps` atomically."""
    pins_file = deps / "PINS"
    if pins_file.exists() and pins_file.read_text().split() == marker:
        return
    deps.parent.mkdir(parents=True, exist_ok=True)
    tmp = deps.with_name(f"{deps.name}.tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tools").mkdir(parents=True)
    try:
        error = fetch(tmp)
        if error is not None:
            raise DeployError(error)
        (tmp / "PINS").write_text("\n".join(marker) + "\n")
        shutil.rmtree(deps, ignore_errors=True)
        with contextlib.suppress(OSError):  # a concurrent deploy filled it first: use theirs
            tmp.rename(deps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"pip exited {proc.returncode}"


def build_runtime(
    cache: Path,
    echo: Echo | None = None,
    deps_cache: Path | None = None,
    target: Target | None = None,
) -> Runtime:
    """Make the wheelhouse for `target` (default: this machine's): the runtime wheel in
    `cache`, dependency wheels in `deps_cache` (default :func:`wheel_cache`), fetched only when
    the pinned versions change. This machine's target uses ``pip wheel`` into `deps_cache` as
    always; another target ``pip download``s binary wheels for it into :func:`target_cache`
    (DeployError naming the target and the pin when none exists)."""
    cache.mkdir(parents=True, exist_ok=True)
    deps = deps_cache or wheel_cache()
    here = local_target()
    target = target or here
    pip_pin = f"pip=={metadata.version('pip')}"
    if target == here:
        pins = _dependency_pins()

        def fetch_local(tmp: Path) -> str | None:
            if echo:
                echo(f"runtime: fetching wheels for {' '.join(pins)}")
            proc = _pip(["wheel", "--quiet", "--wheel-dir", str(tmp), *pins])
            if proc.returncode == 0:
                proc = _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp / "tools"),
                             pip_pin])  # fmt: skip
            if proc.returncode != 0:
                return (f"cannot build the runtime wheelhouse (pip wheel {' '.join(pins)}): "
                        f"{_last_line(proc)}")  # fmt: skip
            return None

        _fill_cache(deps, [*pins, pip_pin], fetch_local)
    else:
        tags = target.platform_tags()
        pins = dependency_closure(target)
        deps = target_cache(deps, target, [*pins, pip_pin])
        platform_args = [arg for tag in tags for arg in ("--platform", tag)]
        major, minor = target.python

        def fetch_foreign(tmp: Path) -> str | None:
            if echo:
                echo(f"runtime: fetching {target.key} wheels for {' '.join(pins)}")
            for dest, wanted in ((tmp, pins), (tmp / "tools", [pip_pin])):
                proc = _pip(["download", "--quiet", "--only-binary=:all:", "--no-deps",
                             "--implementation", "cp", "--python-version", f"{major}.{minor}",
                             *platform_args, "--dest", str(dest), *wanted])  # fmt: skip
                if proc.returncode != 0:
                    return (f"no binary wheel set for target {target.key} (CPython "
                            f"{major}.{minor}, {target.machine}, manylinux up to glibc "
                            f"{target.glibc[0]}.{target.glibc[1]}) among "  # type: ignore[index]
                            f"{' '.join(wanted)}: {_last_line(proc)}")  # fmt: skip
            return None

        _fill_cache(deps, [*pins, pip_pin], fetch_foreign)
    wheels = [*sorted(deps.glob("*.whl")), _runtime_wheel(cache)]
    pip = sorted((deps / "tools").glob("pip-*.whl"))
    if not pip:
        raise DeployError(f"{deps / 'tools'}: no pip wheel; delete {deps} and retry")
    return Runtime(stamp=runtime_stamp(wheels, target), wheels=tuple(wheels), pip=pip[-1])


# --------------------------------------------------------------------------------------------
# 2. Planning (pure)


@dataclass(frozen=True)
class DesiredFile:
    """A file deploy installs on a host. ``secret`` files never appear in any output."""

    path: str
    data: bytes = field(repr=False)
    mode: int
    link: str
    kind: str  # "config" | "key" | "unit"; on a hub also "peer" (peer file), "peerkey"
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
    files: Mapping[str, tuple[str, int] | None]  # path -> (sha256, mode) or None when absent
    running: Mapping[str, bool]  # link -> daemon alive
    deployed: Mapping[str, Any] | None  # manifest recorded by the last successful deploy
    pending: bool = False  # an earlier deploy applied changes here and never committed them
    uid: int | None = None  # the ssh user's uid (deploy needs root)
    target: Target | None = None  # the host's python/machine/glibc (None: not reported)
    target_text: str | None = None  # the probe's raw target line (None: no such line)


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


def load_manifest(build: Path, host: str) -> dict[str, Any]:
    """``build/<host>/manifest.json``; DeployError names the file when missing or damaged."""
    path = build / host / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DeployError(f"{path}: not rendered; run `vpnctl render` first") from exc
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("links"), dict):
        raise DeployError(f"{path}: not a vpnctl manifest (no 'links')")
    _check_manifest(path, manifest)
    return manifest


_MANIFEST_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_MANIFEST_PATH = re.compile(r"/[A-Za-z0-9_./-]*")
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _run_as(manifest: Mapping[str, Any]) -> tuple[str, str] | None:
    """(user, group) the host's daemons run as (the rendered ``user``/``group``), or None."""
    run_as = manifest.get("run_as")
    return (run_as[0], run_as[1]) if run_as else None


def _account_sh(run_as: tuple[str, str] | None) -> str:
    """Create the system account vpnd runs as, unless it exists (idempotent; no home, no
    shell). Before the files are unpacked, so they can be handed to it."""
    if run_as is None:
        return ""
    user, group = quote(run_as[0]), quote(run_as[1])
    fail = quote(f"apply-failed: cannot create the account {run_as[0]}:{run_as[1]}")
    return (
        f"{{ getent group {group} >/dev/null || groupadd --system {group}; }} && "
        f"{{ id -u {user} >/dev/null 2>&1 || useradd --system --gid {group} --no-create-home "
        f"--home-dir /nonexistent --shell /usr/sbin/nologin {user}; }} || "
        f"{{ echo {fail} >&2; exit 3; }}"
    )


def _check_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Names and paths from a manifest go into remote shell lines and systemd units: refuse
    anything but the plain names and paths `vpnctl render` writes (DeployError names the field)."""
    prefix = manifest.get("prefix")
    if not isinstance(prefix, str) or not _MANIFEST_PATH.fullmatch(prefix):
        raise DeployError(f"{path}: prefix {prefix!r} is not a plain absolute path")
    run_as = manifest.get("run_as")
    if run_as is not None and not (
        isinstance(run_as, list)
        and len(run_as) == 2
        and all(isinstance(n, str) and _ACCOUNT.fullmatch(n) for n in run_as)
    ):
        raise DeployError(f"{path}: run_as {run_as!r} is not [user, group] of plain names")
    for link, entry in manifest["links"].items():
        if not _MANIFEST_NAME.fullmatch(str(link)) or not isinstance(entry, dict):
            raise DeployError(f"{path}: link name {link!r} is not a valid link name")
        peer = entry.get("peer")
        if peer is not None and not _MANIFEST_NAME.fullmatch(str(peer)):
            raise DeployError(f"{path}: links.{link}.peer {peer!r} is not a valid host name")
        hub = entry.get("role") == "hub"
        key_name = entry.get("key")
        if key_name is not None and not _MANIFEST_KEY.fullmatch(str(key_name)):
            raise DeployError(f"{path}: links.{link}.key {key_name!r} is not a key name")
        if hub:
            _check_hub_entry(path, link, entry)
        for key in ("config", "pidfile", "statusfile", *(() if hub else ("keyfile",))):
            value = entry.get(key)
            if not isinstance(value, str) or not _MANIFEST_PATH.fullmatch(value):
                raise DeployError(f"{path}: links.{link}.{key} {value!r} is not a plain "
                                  "absolute path")  # fmt: skip


_MANIFEST_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}(?:\.[a-z0-9][a-z0-9_-]{0,62})?")


def _check_hub_entry(path: Path, link: str, entry: Mapping[str, Any]) -> None:
    """A hub's entry: its peers directory and each client's name, key name and paths."""
    peers = entry.get("peers")
    if not isinstance(peers, str) or not _MANIFEST_PATH.fullmatch(peers):
        raise DeployError(f"{path}: links.{link}.peers {peers!r} is not a plain absolute path")
    clients = entry.get("clients")
    if not isinstance(clients, dict):
        raise DeployError(f"{path}: links.{link}.clients is not a mapping")
    for name, client in clients.items():
        if not _MANIFEST_NAME.fullmatch(str(name)) or not isinstance(client, dict):
            raise DeployError(f"{path}: links.{link}.clients: {name!r} is not a client name")
        if not _MANIFEST_KEY.fullmatch(str(client.get("key"))):
            raise DeployError(f"{path}: links.{link}.clients.{name}.key is not a key name")
        for key in ("peerfile", "keyfile"):
            value = client.get(key)
            if not isinstance(value, str) or not _MANIFEST_PATH.fullmatch(value):
                raise DeployError(f"{path}: links.{link}.clients.{name}.{key} {value!r} is not a "
                                  "plain absolute path")  # fmt: skip


def _key_file(
    keystore: Keystore,
    name: str,
    fingerprint: object,
    where: str,
    passphrase: bytes | None,
) -> tuple[bytes, float]:
    """The runtime key file of keystore key `name` (and its creation time), refused when the
    build was rendered for another key."""
    info = keystore.info(name)
    if info is None:
        raise DeployError(f"{keystore.root}: no key for link {name!r}; run `vpnctl keygen`")
    if info.fingerprint != fingerprint:
        raise DeployError(
            f"{where}: link {name!r} was rendered for key {fingerprint} but the keystore holds "
            f"{info.fingerprint}; re-run `vpnctl render`"
        )
    return keystore.key_file_bytes(name, passphrase=passphrase), info.created


def desired_files(
    build: Path,
    manifest: Mapping[str, Any],
    keystore: Keystore,
    *,
    use_systemd: bool,
    passphrase: bytes | None = None,
) -> list[DesiredFile]:
    """Every file a host should have: config, key and (under systemd) unit of each link.

    Rendered files are read from ``build/<host>/`` and checked against the manifest's sha256, so
    a build edited by hand after render is refused with the file's name.
    """
    host = manifest["host"]
    out: list[DesiredFile] = []
    for link, entry in sorted(manifest["links"].items()):
        for rel, digest in sorted(entry.get("files", {}).items()):
            local = build / host / rel
            try:
                data = local.read_bytes()
            except OSError as exc:
                raise DeployError(f"{local}: listed in the manifest but unreadable: {exc}") from exc
            if hashlib.sha256(data).hexdigest() != digest:
                raise DeployError(
                    f"{local}: does not match its sha256 in {build / host / 'manifest.json'}; "
                    "re-run `vpnctl render` (do not edit build/ by hand)"
                )
            if entry.get("role") == "hub" and rel.endswith(".peer"):
                client = entry["clients"].get(Path(rel).stem)
                if client is None:
                    raise DeployError(f"{local}: not a client of hub {link!r} in the manifest")
                out.append(DesiredFile(client["peerfile"], data, 0o644, link, "peer"))
            elif rel.startswith("etc/vpnd/"):
                out.append(DesiredFile(entry["config"], data, 0o644, link, "config"))
            elif rel.startswith("systemd/") and use_systemd:
                out.append(DesiredFile(posixpath.join(UNIT_DIR, Path(rel).name), data, 0o644,
                                       link, "unit"))  # fmt: skip
        where = str(build / host / "manifest.json")
        if entry.get("role") == "hub":  # one key per client, in the peers directory
            for _name, client in sorted(entry["clients"].items()):
                key, created = _key_file(keystore, client["key"], client.get("key_fingerprint"),
                                         where, passphrase)  # fmt: skip
                out.append(DesiredFile(client["keyfile"], key, 0o600, link, "peerkey",
                                       mtime=created))  # fmt: skip
            continue
        key, created = _key_file(keystore, entry.get("key", link), entry.get("key_fingerprint"),
                                 where, passphrase)  # fmt: skip
        out.append(DesiredFile(entry["keyfile"], key, 0o600, link, "key", mtime=created))
    return out


def plan_host(
    host: str,
    manifest: Mapping[str, Any],
    desired: Iterable[DesiredFile],
    remote: RemoteState,
    *,
    runtime_stamp: str,
    use_systemd: bool,
) -> HostPlan:
    """Decide what to do on one host from what should be there and what is there."""
    runtime = remote.stamp != runtime_stamp
    changed: dict[str, list[str]] = {}
    files: list[DesiredFile] = []
    by_link: dict[str, list[DesiredFile]] = {}
    for item in desired:
        by_link.setdefault(item.link, []).append(item)
    for link, items in sorted(by_link.items()):
        reasons = []
        for item in items:
            have = remote.files.get(item.path)
            if have is None:
                reasons.append(f"new {item.kind}")
            elif have[0] != item.sha256:
                reasons.append(f"{item.kind} changed")
            elif have[1] != item.mode:
                reasons.append(f"{item.kind} mode {have[1]:o}")
            else:
                continue
            files.append(item)
        if runtime:
            reasons.append("runtime")
        if reasons:
            changed[link] = reasons
    if remote.pending:
        # an interrupted deploy left uncommitted changes: restart and confirm every link (a
        # failure rolls back to the backups that deploy kept), so it is never taken as current
        for link in by_link:
            changed.setdefault(link, []).append("interrupted deploy not committed")
    start = sorted(
        link for link in by_link if link not in changed and not remote.running.get(link, False)
    )
    deployed_links = set((remote.deployed or {}).get("links", {}))
    removed = sorted(deployed_links - set(manifest["links"]))
    paths = {link: [item.path for item in items] for link, items in by_link.items()}
    reload, prune, touched = _plan_hubs(
        manifest, by_link, remote, changed, start=start, files=files
    )
    for hub, gone in prune.items():
        paths[hub] = paths.get(hub, []) + gone
    unchanged = sorted(
        link for link in by_link if link not in changed and link not in start and link not in reload
    )
    return HostPlan(host, use_systemd, runtime, changed, start, removed, unchanged, files, paths,
                    reload, prune, touched)  # fmt: skip


def _plan_hubs(
    manifest: Mapping[str, Any],
    by_link: Mapping[str, list[DesiredFile]],
    remote: RemoteState,
    changed: dict[str, list[str]],
    *,
    start: list[str],
    files: list[DesiredFile],
) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
    """Hubs whose change is only in their peers directory are *reloaded* (SIGHUP), not
    restarted: the daemon applies the new client set and keeps every unchanged client's session.
    Peer files and keys of clients removed since the last deploy are pruned (and the hub
    reloaded, so the daemon cuts and revokes them). Returns (reload, prune, touched clients)."""
    reload: dict[str, list[str]] = {}
    prune: dict[str, list[str]] = {}
    touched: dict[str, list[str]] = {}
    deployed = (remote.deployed or {}).get("links", {})
    for link, entry in sorted(manifest["links"].items()):
        if entry.get("role") != "hub":
            continue
        clients = entry.get("clients", {})
        old_entry = deployed.get(link)
        before = old_entry.get("clients", {}) if isinstance(old_entry, dict) else {}
        gone = sorted(set(before) - set(clients))
        for name in gone:
            old = before[name] if isinstance(before[name], dict) else {}
            for path in (old.get("peerfile"), old.get("keyfile")):
                # only plain paths inside this hub's peers directory are ever deleted
                if (
                    isinstance(path, str)
                    and _MANIFEST_PATH.fullmatch(path)
                    and ".." not in path.split("/")
                    and path.startswith(entry["peers"] + "/")
                ):
                    prune.setdefault(link, []).append(path)
        written = {item.path for item in files}
        by_path = {c["peerfile"]: n for n, c in clients.items()}
        by_path |= {c["keyfile"]: n for n, c in clients.items()}
        touched[link] = sorted({by_path[p] for p in written if p in by_path})
        reasons = [f"client {name} removed" for name in gone]
        own = [item for item in by_link.get(link, []) if item.path in written]
        peers_only = all(item.kind in ("peer", "peerkey") for item in own) and all(
            why.startswith(("new peer", "peer")) for why in changed.get(link, [])
        )
        if link in changed:
            if peers_only and remote.running.get(link, False):
                changed.pop(link)
                added = {
                    by_path[item.path]
                    for item in own
                    if item.kind == "peer" and remote.files.get(item.path) is None
                }
                reload[link] = [
                    f"client {name} {'added' if name in added else 'changed'}"
                    for name in touched[link]
                ] + reasons
            else:
                changed[link] += reasons
                touched[link] = sorted(clients)
        elif reasons and link not in start:
            reload[link] = reasons
        if link in start:
            touched[link] = sorted(clients)
    return reload, prune, touched


def redacted_diff(
    host: str, plan: HostPlan, current: Mapping[str, bytes | None], present: Iterable[str] = ()
) -> str:
    """A unified diff of every file the plan writes; key contents are replaced by a note.

    `current` maps remote paths to their present bytes (None or missing: absent). Keys are never
    read back from hosts: `present` names the secret files that exist there.
    """
    present = set(present)
    chunks: list[str] = []
    for item in plan.files:
        old_name = f"{host}:{item.path} (deployed)"
        new_name = f"{host}:{item.path} (new)"
        if item.secret:
            absent = item.path not in present
            chunks.append(
                f"--- {'/dev/null' if absent else old_name}\n+++ {new_name}\n"
                f"@@ key file, contents redacted @@\n"
                f"-[redacted]\n+[redacted key, mode {item.mode:04o}]\n"
            )
            continue
        old = current.get(item.path)
        old_lines = [] if old is None else old.decode(errors="replace").splitlines(keepends=True)
        new_lines = item.data.decode(errors="replace").splitlines(keepends=True)
        diff = "".join(
            difflib.unified_diff(
                old_lines,
                new_lines,
                "/dev/null" if old is None else old_name,
                new_name,
            )
        )
        chunks.append(diff or f"# {host}:{item.path}: mode change only\n")
    return "".join(chunks)


# --------------------------------------------------------------------------------------------
# Remote shell snippets (POSIX sh; every path quoted; no secret ever in a command line)


def _rt(prefix: str, *parts: str) -> str:
    return posixpath.join(prefix, RUNTIME_DIR, *parts)


def _runtime_bin(prefix: str) -> str:
    return posixpath.join(prefix, RUNTIME_LINK)


_SH_FUNCS = r"""
alive() {
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] && ! sed 's/.*) //' "/proc/$1/stat" | grep -q '^Z'
}
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null; }
"""
#: `locked FILE`: true while a process holds a flock on FILE (vpnd holds its pidfile's).
_SH_LOCKED = r"""
locked() {
  [ -f "$1" ] || return 1
  if command -v flock >/dev/null 2>&1; then flock -n -s "$1" true; [ $? -eq 1 ]; return; fi
  python3 -c 'import fcntl, sys
f = open(sys.argv[1])
try: fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
except BlockingIOError: sys.exit(0)
sys.exit(1)' "$1"
}
"""


def probe_script(manifest: Mapping[str, Any], paths: Iterable[str]) -> str:
    """One shell script reporting stamp, systemd, python, target, file hashes/modes, running
    links."""
    prefix = manifest["prefix"]
    lines = [_SH_FUNCS, _SH_LOCKED]
    lines.append(f'echo "stamp $(cat {quote(_rt(prefix, "STAMP"))} 2>/dev/null || echo -)"')
    lines.append(
        'if [ -d /run/systemd/system ]; then echo "systemd yes"; else echo "systemd no"; fi'
    )
    lines.append('echo "python $(command -v python3 || echo -)"')
    lines.append(f'echo "target $(python3 -c {quote(TARGET_PY)} 2>/dev/null || echo -)"')
    lines.append('echo "uid $(id -u)"')
    pending = posixpath.join(prefix, STATE_DIR, "pending")
    lines.append(f'if [ -e {quote(pending)} ]; then echo "pending yes"; else echo "pending no"; fi')
    for idx, path in enumerate(paths):
        q = quote(path)
        lines.append(
            f'if [ -f {q} ]; then echo "file {idx} $(sha256sum < {q} | cut -d" " -f1) '
            f'$(stat -c %a {q})"; else echo "file {idx} - -"; fi'
        )
    links = dict(manifest["links"])
    deployed = posixpath.join(prefix, STATE_DIR, "manifest.json")
    lines.append(f'echo "deployed $(base64 -w0 {quote(deployed)} 2>/dev/null || echo -)"')
    for link, entry in sorted(links.items()):
        pf = quote(entry["pidfile"])
        lines.append(
            f'if {{ locked {pf} && alive "$(pid_of {pf})"; }} || '
            f"{{ [ -d /run/systemd/system ] && systemctl is-active --quiet "
            f'{quote(f"vpnd-{link}")} 2>/dev/null; }}; then echo "running {link} yes"; '
            f'else echo "running {link} no"; fi'
        )
    return "\n".join(lines) + "\n"


def parse_probe(text: str, paths: list[str]) -> RemoteState:
    """The probe's output as a RemoteState (unknown lines are ignored)."""
    stamp: str | None = None
    systemd = False
    python: str | None = None
    files: dict[str, tuple[str, int] | None] = dict.fromkeys(paths)
    running: dict[str, bool] = {}
    deployed: dict[str, Any] | None = None
    pending = False
    uid: int | None = None
    target_text: str | None = None
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "stamp":
            stamp = None if rest.strip() in {"", "-"} else rest.strip()
        elif word == "systemd":
            systemd = rest.strip() == "yes"
        elif word == "python":
            python = None if rest.strip() == "-" else rest.strip()
        elif word == "pending":
            pending = rest.strip() == "yes"
        elif word == "target":
            target_text = rest.strip()
        elif word == "uid":
            with contextlib.suppress(ValueError):
                uid = int(rest.strip())
        elif word == "file":
            parts = rest.split()
            if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) >= len(paths):
                continue  # not ours (a login banner, a shell warning): ignore like other noise
            idx, digest, mode = parts
            if digest != "-":
                with contextlib.suppress(ValueError):
                    files[paths[int(idx)]] = (digest, int(mode, 8))
        elif word == "running":
            parts = rest.split()
            if len(parts) == 2:
                running[parts[0]] = parts[1] == "yes"
        elif word == "deployed" and rest.strip() not in {"", "-"}:
            with contextlib.suppress(ValueError):
                deployed = json.loads(base64.b64decode(rest.strip()))
            if not isinstance(deployed, dict) or not isinstance(deployed.get("links"), dict):
                raise DeployError(f"malformed probe answer: {STATE_DIR}/manifest.json on the "
                                  "host is not a vpnctl manifest")  # fmt: skip
    target = parse_target(target_text) if target_text is not None else None
    return RemoteState(stamp, systemd, python, files, running, deployed, pending, uid, target,
                       target_text)  # fmt: skip


LOCK_WAIT = 60  # seconds a deploy step waits for another deploy's lock on the same host


def _lock_sh(prefix: str) -> str:
    """Take the host's deploy lock (``flock`` on fd 9) for the rest of the script, so two
    deploys (two operators, or one host named twice) never interleave apply/rollback/commit.
    Daemons started under it close fd 9 (``9>&-``) so they do not hold it."""
    state = quote(posixpath.join(prefix, STATE_DIR))
    return (
        f"mkdir -p {state} && exec 9>{state}/lock || exit 5\n"
        f"if command -v flock >/dev/null 2>&1; then flock -w {LOCK_WAIT} 9 || "
        "{ echo 'locked: another deploy is running on this host' >&2; exit 5; }; fi\n"
    )


def _stop_sh(link: str, entry: Mapping[str, Any], use_systemd: bool) -> str:
    """Stop one link's daemon and wait (bounded) until it is gone.

    Without systemd the PID comes from the pidfile, and it is signalled only while the pidfile
    is still flock-locked (vpnd holds that lock for its whole life): a stale pidfile whose PID
    the kernel has since given to another process never gets that process killed."""
    if use_systemd:
        return f"systemctl stop {quote(f'vpnd-{link}')} 2>/dev/null || true\n"
    pf = quote(entry["pidfile"])
    return (
        f'pid=$(pid_of {pf}); if locked {pf} && alive "$pid"; then kill -TERM "$pid"; i=0; '
        f'while alive "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
        f'alive "$pid" && locked {pf} && kill -KILL "$pid"; fi; rm -f {pf}\n'
    )


def _start_sh(
    link: str,
    entry: Mapping[str, Any],
    prefix: str,
    use_systemd: bool,
    run_as: tuple[str, str] | None = None,
) -> str:
    """Start one link's daemon; a failure prints `start-failed <link>: <message>`. Without
    systemd the daemon starts as root and drops to `run_as`, whose run directories these are."""
    if use_systemd:
        unit = quote(f"vpnd-{link}")
        return (
            f"systemctl daemon-reload && systemctl enable --quiet {unit} && "
            f"systemctl restart {unit} || "
            f"echo {quote(f'start-failed {link}: systemctl restart failed')}\n"
        )
    rundir = quote(posixpath.dirname(entry["pidfile"]))
    statusdir = quote(posixpath.dirname(entry["statusfile"]))
    own = f"chown {quote(run_as[0])}:{quote(run_as[1])} {rundir} {statusdir}; " if run_as else ""
    return (
        f"mkdir -p {rundir} {statusdir}; {own}out=$({quote(_runtime_bin(prefix))} -f "
        f"{quote(entry['config'])} --daemon </dev/null 9>&- 2>&1) || "
        f'echo {quote(f"start-failed {link}:")} "$(echo "$out" | tail -n 1)"\n'
    )


def _reload_sh(link: str, entry: Mapping[str, Any], use_systemd: bool) -> str:
    """SIGHUP a hub so it re-reads its peers directory (HUB-SPEC.md: unchanged clients keep
    their sessions); a failure prints `start-failed <link>: ...` like a failed start."""
    if use_systemd:
        unit = quote(f"vpnd-{link}")
        return (f"systemctl reload {unit} || "
                f"echo {quote(f'start-failed {link}: systemctl reload failed')}\n")  # fmt: skip
    pf = quote(entry["pidfile"])
    return (
        f'pid=$(pid_of {pf}); if alive "$pid"; then kill -HUP "$pid"; else '
        f"echo {quote(f'start-failed {link}: not running, cannot reload')}; fi\n"
    )


def install_runtime_script(prefix: str, stamp: str) -> str:
    """Unpack the wheelhouse (tar on stdin) into a new venv and switch `current` to it."""
    rt = quote(_rt(prefix))
    venv = f"venv-{stamp}"
    return f"""set -e
umask 022
mkdir -p {rt} {quote(posixpath.dirname(_runtime_bin(prefix)))}
wh=$(mktemp -d {rt}/wheels.XXXXXX)
trap 'rm -rf "$wh"' EXIT
tar -x -f - -C "$wh"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {{
  echo "python3 on this host is older than 3.11; the runtime needs 3.11+" >&2; exit 4; }}
rm -rf {rt}/{venv}
python3 -m venv --without-pip {rt}/{venv}
{rt}/{venv}/bin/python "$(ls "$wh"/tools/pip-*.whl)/pip" install --quiet --no-index --no-deps \
    --disable-pip-version-check --no-compile "$wh"/*.whl
old=$(readlink {rt}/current 2>/dev/null || true)
if [ -n "$old" ] && [ "$old" != {venv} ]; then ln -sfn "$old" {rt}/previous; fi
ln -sfn {venv} {rt}/current.new && mv -T {rt}/current.new {rt}/current
ln -sfn {rt}/current/bin/vpnd {quote(_runtime_bin(prefix))}
echo {stamp} > {rt}/STAMP
for d in {rt}/venv-*; do
  b=$(basename "$d"); [ "$b" = {venv} ] || [ "$b" = "$old" ] || rm -rf "$d"
done
"""


def _tar_files(files: Iterable[DesiredFile]) -> bytes:
    """The files as a tar stream rooted at / (modes and key mtimes set; owner root)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in files:
            info = tarfile.TarInfo(item.path.lstrip("/"))
            info.size = len(item.data)
            info.mode = item.mode
            info.mtime = int(item.mtime if item.mtime is not None else time.time())
            tar.addfile(info, io.BytesIO(item.data))
    return buf.getvalue()


def apply_script(plan: HostPlan, manifest: Mapping[str, Any], deployed: Mapping[str, Any]) -> str:
    """Back up the changed links' files, unpack the new ones (stdin), stop removed links,
    (re)start changed and stopped links."""
    prefix = manifest["prefix"]
    state = posixpath.join(prefix, STATE_DIR)
    backup, pending = quote(f"{state}/prev"), quote(f"{state}/pending")
    out = [_SH_FUNCS, _SH_LOCKED, _lock_sh(prefix), 'echo "applied-at $(date +%s.%N)"', "umask 077"]
    # The backup holds the last *committed* version of each file. A pending marker means an
    # earlier deploy was interrupted after it started changing files: its backup is kept and
    # files it already backed up are not backed up again (they may be uncommitted now).
    out.append(f"[ -e {pending} ] || rm -rf {backup}")
    out.append(f"mkdir -p {backup}/files {backup}/absent && : > {pending} || "
               "{ echo 'apply-failed: cannot write the backup' >&2; exit 3; }")  # fmt: skip
    out.append(f"sync -f {pending} 2>/dev/null || true")
    pruned = [path for _, paths in sorted(plan.prune.items()) for path in paths]
    for path in [item.path for item in plan.files] + pruned:
        src = quote(path)
        saved, absent = _backup_paths(prefix, path)
        out.append(
            f"if [ ! -e {saved} ] && [ ! -e {absent} ]; then "
            f'if [ -f {src} ]; then mkdir -p "$(dirname {saved})" && cp -p {src} {saved}; '
            f'else mkdir -p "$(dirname {absent})" && : > {absent}; fi || '
            f"{{ rm -f {saved}; echo {quote(f'apply-failed: cannot back up {path}')} >&2; "
            "exit 3; }; fi"
        )
    run_as = _run_as(manifest)
    if run_as:
        out.append(_account_sh(run_as))
    out.append("tar -x -p --no-same-owner -f - -C / || { echo 'apply-failed: tar'; exit 3; }")
    if run_as:  # the user reads its configs (SIGHUP; systemd's User=) and, under systemd, its key
        owner = f"{quote(run_as[0])}:{quote(run_as[1])}"
        for item in plan.files:
            if item.kind == "config":
                out.append(f"chmod 0755 {quote(posixpath.dirname(item.path))}")
            elif item.kind == "key" and plan.use_systemd:
                out.append(f"chown {owner} {quote(item.path)}")
    for path in pruned:  # peer files and keys of clients removed from a hub
        out.append(f"rm -f {quote(path)}")
    for link in plan.removed:
        entry = deployed.get("links", {}).get(link, {})
        if entry.get("pidfile"):
            out.append(_stop_sh(link, entry, plan.use_systemd))
        for key in ("config", "keyfile", "statusfile"):
            if entry.get(key):
                out.append(f"rm -f {quote(entry[key])}")
        if plan.use_systemd:
            out.append(f"systemctl disable --quiet {quote(f'vpnd-{link}')} 2>/dev/null || true")
            out.append(f"rm -f {quote(posixpath.join(UNIT_DIR, f'vpnd-{link}.service'))}")
    for link in plan.restarts:
        entry = manifest["links"][link]
        out.append(_stop_sh(link, entry, plan.use_systemd))
        out.append(_start_sh(link, entry, prefix, plan.use_systemd, run_as))
    for link in sorted(plan.reload):  # hubs whose peers directory changed: SIGHUP only
        out.append(_reload_sh(link, manifest["links"][link], plan.use_systemd))
    return "\n".join(out) + "\n"


def _backup_paths(prefix: str, path: str) -> tuple[str, str]:
    """Where the committed copy of `path` is kept during a deploy, and its "was absent" marker
    (both quoted for the shell)."""
    backup = posixpath.join(prefix, STATE_DIR, "prev")
    rel = path.lstrip("/")
    return quote(f"{backup}/files/{rel}"), quote(f"{backup}/absent/{rel}")


def rollback_script(
    plan: HostPlan,
    manifest: Mapping[str, Any],
    links: Iterable[str],
    runtime_back: bool,
    *,
    finish: bool = False,
) -> str:
    """Restore the backed-up files of `links`, switch the runtime back, restart the old daemons.

    With `finish` (the whole host went back: nothing of this deploy stays), the backups and the
    pending marker are dropped too; otherwise the commit that follows drops them."""
    prefix = manifest["prefix"]
    state = posixpath.join(prefix, STATE_DIR)
    links = set(links)
    out = [_SH_FUNCS, _SH_LOCKED, _lock_sh(prefix)]
    if runtime_back:
        rt = quote(_rt(prefix))
        out.append(
            f'if [ -L {rt}/previous ]; then ln -sfn "$(readlink {rt}/previous)" {rt}/current.new'
            f" && mv -T {rt}/current.new {rt}/current && "
            f"basename \"$(readlink {rt}/current)\" | sed 's/^venv-//' > {rt}/STAMP; fi"
        )
    restart = sorted(links | (set(plan.restarts) if runtime_back else set()))
    reload = sorted(link for link in restart if link in plan.reload and link not in plan.restarts)
    restart = [link for link in restart if link not in reload]
    for link in restart:
        out.append(_stop_sh(link, manifest["links"][link], plan.use_systemd))
    paths = {path for link in links for path in plan.paths.get(link, [])}
    paths |= {item.path for item in plan.files if item.link in links}
    for path in sorted(paths):
        saved, absent = _backup_paths(prefix, path)
        dst = quote(path)
        out.append(f"if [ -e {absent} ]; then rm -f {dst}; elif [ -f {saved} ]; then "
                   f"cp -p {saved} {dst}; fi")  # fmt: skip
    for link in restart:
        entry = manifest["links"][link]
        conf = quote(entry["config"])
        out.append(f"if [ -f {conf} ]; then")
        start = _start_sh(link, entry, prefix, plan.use_systemd, _run_as(manifest))
        out.append("  " + start.strip())
        out.append("fi")
    for link in reload:  # a hub reloaded by this deploy: back to its previous peers directory
        out.append(_reload_sh(link, manifest["links"][link], plan.use_systemd))
    if finish:
        out.append(f"rm -rf {quote(state)}/prev {quote(state)}/pending")
    return "\n".join(out) + "\n"


def commit_script(manifest: Mapping[str, Any]) -> str:
    """Record the deployed manifest (stdin), then drop the commit-confirm backups and the
    pending marker -- in that order, so an interruption never loses the committed state."""
    state = posixpath.join(manifest["prefix"], STATE_DIR)
    return (
        _lock_sh(manifest["prefix"]) + f"umask 077; cat > {quote(state)}/manifest.json.new && "
        f"mv {quote(state)}/manifest.json.new {quote(state)}/manifest.json && "
        f"rm -rf {quote(state)}/prev {quote(state)}/pending\n"
    )


def status_command(manifest: Mapping[str, Any], link: str) -> str:
    """The remote command printing one link's status record as JSON (``vpnd status``)."""
    entry = manifest["links"][link]
    return quote(_runtime_bin(manifest["prefix"]), "status", "-f", entry["config"], "--json")


_MARK = "@@vpnctl"


def status_script(manifest: Mapping[str, Any], links: Iterable[str]) -> str:
    """One shell script reading the status records of `links` on a host, no Python started.

    It does what ``vpnd status`` does -- read the record the daemon publishes atomically and
    check that its process is alive (via the pidfile) -- for every link in one go, plus the host
    clock and each key file's mtime. Output per link: a marker line, ``config yes|no``,
    ``alive yes|no``, the record on one line (or ``-``), ``keymtime <s>|-``, ``pidfile <pid>|-``.
    """
    lines = [_SH_FUNCS, "date +%s.%N"]
    for link in links:
        entry = manifest["links"][link]
        sf, pf = quote(entry["statusfile"]), quote(entry["pidfile"])
        lines += [
            f"echo {quote(f'{_MARK} {link}')}",
            f'if [ -f {quote(entry["config"])} ]; then echo "config yes"; '
            'else echo "config no"; fi',
            f'if alive "$(pid_of {pf})"; then echo "alive yes"; else echo "alive no"; fi',
            f"if [ -f {sf} ]; then tr -d '\\n' < {sf}; echo; else echo -; fi",
            f'echo "keymtime $(stat -c %Y {quote(entry["keyfile"])} 2>/dev/null || echo -)"'
            if entry.get("keyfile")
            else 'echo "keymtime -"',  # a hub: one key per client, none of its own
            f'p=$(pid_of {pf}); echo "pidfile ${{p:--}}"',
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LinkRecord:
    """One link's status as read on its host: the daemon's record, judged for liveness."""

    record: dict[str, Any] | None  # None: the link is not deployed on this host
    key_mtime: float | None
    now: float  # the host's clock when it was read


BAD_ANSWER = "bad answer"  # the state of an end whose host answered with a malformed record
STALE_AFTER = 5.0  # a running daemon rewrites its record every second (docs/architecture.md)


def finite_number(value: object) -> float | None:
    """`value` as a finite float when it is a number or a number's text; None otherwise.

    What a host prints is not trusted to be well formed: "nan", "inf", a bool or a stray line
    becomes None (unknown) instead of an exception or a NaN that poisons every comparison.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        value = float(value) if abs(value) < 2**1000 else None
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def parse_status_output(text: str) -> dict[str, LinkRecord]:
    """The output of :func:`status_script` as link -> LinkRecord.

    A record whose daemon is gone, or a deployed link with no record, is ``not running`` --
    the same rule ``vpnd status`` applies. A record is only trusted when it was written by the
    process the pidfile names (else ``not running``: a leftover of an earlier daemon) and
    rewritten within :data:`STALE_AFTER` seconds of the host's clock (else ``stale``: the
    daemon is hung or its record is not its own).
    """
    lines = text.splitlines()
    now = (_finite(lines[0]) if lines else None) or time.time()
    out: dict[str, LinkRecord] = {}
    i = 1
    while i < len(lines):
        if not lines[i].startswith(f"{_MARK} "):
            i += 1
            continue
        link = lines[i].split(" ", 1)[1].strip()
        block = [*lines[i + 1 : i + 6], "", "", "", "", ""][:5]
        i += 6
        configured = block[0] == "config yes"
        alive = block[1] == "alive yes"
        record: dict[str, Any] | None = None
        bad: str | None = None
        if block[2] not in {"", "-"}:  # a host's answer is data: parsed, type-checked, cleaned
            try:
                loaded = json.loads(block[2])
            except (ValueError, RecursionError):  # RecursionError: nested too deep for json
                loaded, bad = None, "the status record is not JSON (cut short?)"
            bad = bad or check_record(loaded)
            record = clean_json(loaded) if bad is None else None
        if bad is not None:
            record = {"state": BAD_ANSWER, "reason": f"malformed answer: {bad}"}
        elif record is not None and not alive:
            record["reason"] = f"daemon (pid {record.get('pid')}) is gone; last state " + str(
                record.get("state")
            )
            record["state"] = "not running"
        elif record is None and configured:
            record = {"state": "not running", "reason": "no status record (never started?)"}
        elif record is not None:
            _judge_freshness(record, block[4].removeprefix("pidfile ").strip(), now)
        out[link] = LinkRecord(record if configured or bad else None,
                               _finite(block[3].removeprefix("keymtime ")), now)  # fmt: skip
    return out


def _finite(text: str) -> float | None:
    """A host's number (a clock, an mtime), or None when it is absent or not a finite number:
    a bad value from a host must never abort a deploy half way."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _judge_freshness(record: dict[str, Any], pidfile_pid: str, now: float) -> None:
    """Mark `record` (of a live pidfile process) not running/stale unless it is that process's
    and recent (see :func:`parse_status_output`)."""
    pid = record.get("pid")
    updated = finite_number(record.get("updated"))
    if str(pid) != pidfile_pid:
        record["reason"] = (
            f"status record is from pid {pid}, the pidfile names {pidfile_pid}; last state "
            f"{record.get('state')}"
        )
        record["state"] = "not running"
    elif updated is None or now - updated > STALE_AFTER:
        age = f"{now - updated:.0f}s" if updated is not None else "never"
        record["reason"] = (
            f"status record not rewritten for {age} (daemon pid {pid} hung?); last state "
            f"{record.get('state')}"
        )
        record["state"] = "stale"


def read_statuses(
    ssh: SshHost, manifest: Mapping[str, Any], links: Iterable[str], timeout: float = 10.0
) -> dict[str, LinkRecord]:
    """The status of `links` on one host in one ssh call (SshError when it does not answer)."""
    result = ssh.run(status_script(manifest, list(links)), timeout=timeout)
    return parse_status_output(result.text)


# --------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class HostOutcome:
    """What happened on one host."""

    host: str
    plan: HostPlan | None = None
    error: str | None = None
    confirmed: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # link -> why not confirmable
    rolled_back: dict[str, str] = field(default_factory=dict)  # link -> why
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


def _poll_round(
    wanted: Mapping[str, set[str]],
    ssh: Mapping[str, SshHost],
    manifests: Mapping[str, Mapping[str, Any]],
    jobs: int,
) -> dict[tuple[str, str], dict[str, Any] | None]:
    """One status read per host, in parallel: (host, link) -> record (None: not deployed)."""

    def one(host: str) -> dict[tuple[str, str], dict[str, Any] | None]:
        links = manifests[host]["links"]
        try:
            found = read_statuses(ssh[host], manifests[host],
                                  sorted({_unit_link(u) for u in wanted[host]}))  # fmt: skip
        except SshError as exc:
            return {(host, link): {"state": "unreachable", "reason": str(exc)}
                    for link in wanted[host]}  # fmt: skip
        out: dict[tuple[str, str], dict[str, Any] | None] = {}
        for unit in wanted[host]:
            link = _unit_link(unit)
            record = found[link].record if link in found else None
            if "/" in unit and links.get(link, {}).get("role") == "hub":
                record = _peer_record(record, unit.split("/", 1)[1])
            out[(host, unit)] = record
        return out

    out: dict[tuple[str, str], dict[str, Any] | None] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(wanted)))) as pool:
        for part in pool.map(one, sorted(wanted)):
            out.update(part)
    return out


def _describe_ends(ends: list[str], records: Mapping[tuple[str, str], Any], link: str) -> str:
    parts = []
    for host in ends:
        record = records.get((host, link))
        if record is None:
            parts.append(f"{host}: not deployed")
        else:
            why = f" ({record['reason']})" if record.get("reason") else ""
            parts.append(f"{host}: {record.get('state')}{why}")
    return "; ".join(parts)


def confirm_links(
    links: Mapping[str, list[str]],
    fingerprints: Mapping[str, str],
    ssh: Mapping[str, SshHost],
    manifests: Mapping[str, Mapping[str, Any]],
    *,
    wait: float,
    jobs: int,
    on_result: Callable[[str, str, str], None] | None = None,
    restarted: Mapping[str, Iterable[str]] | None = None,
    not_before: Mapping[str, float] | None = None,
) -> dict[str, tuple[str, str]]:
    """Poll every link's two ends (``links``: link -> [changed end, other end]) until both are
    up with the expected key fingerprint, or `wait` runs out.

    `restarted` names, per link, the ends this deploy (re)started (default: the first end).
    Returns link -> ("up" | "waiting" | "failed", explanation). An end restarted by this deploy
    that is not running is a failure (its start failed or it died): the link is rolled back.
    "waiting" only when the other end was *not* touched by this deploy and is not deployed, not
    running or unreachable, so the link cannot be confirmed either way. `not_before` gives, per
    host, the host's clock when its daemons were restarted: a record there whose ``since`` is
    older belongs to a daemon from before the restart and counts as ``stale``.
    """
    ours = {link: set(restarted.get(link, ())) if restarted else set() for link in links}
    for link, ends in links.items():
        ours[link].add(ends[0])
    results: dict[str, tuple[str, str]] = {}
    pending = dict(links)
    deadline = time.monotonic() + wait
    records: dict[tuple[str, str], dict[str, Any] | None] = {}
    while pending:
        wanted: dict[str, set[str]] = {}
        for link, ends in pending.items():
            for host in ends:
                wanted.setdefault(host, set()).add(link)
        records = _poll_round(wanted, ssh, manifests, jobs)
        for (host, link), record in records.items():
            floor = (not_before or {}).get(host)
            since = record.get("since") if record is not None else None
            if (
                record is not None
                and floor is not None
                and host in ours.get(link, ())
                and record.get("state") not in {"not running", "unreachable", "stale"}
                and (not isinstance(since, int | float) or since < floor)
            ):
                record["reason"] = (
                    f"record predates the restart (since {since}); last state "
                    + str(record.get("state"))
                )
                record["state"] = "stale"
        expired = time.monotonic() >= deadline
        for link, ends in list(pending.items()):
            ends_records = [records.get((host, link)) for host in ends]
            verdict: tuple[str, str] | None = None
            if all(r is not None and r.get("state") == "up" for r in ends_records):
                fps = {r.get("key_fingerprint") for r in ends_records if r is not None}
                if fps == {fingerprints[link]}:
                    verdict = ("up", f"up at both ends, key {fingerprints[link]}")
                elif expired:
                    verdict = ("failed", f"key fingerprints differ: {sorted(map(str, fps))}")
            elif expired:
                last = _describe_ends(ends, records, link)
                other = ends_records[-1]
                dead_here = [
                    host
                    for host, r in zip(ends, ends_records, strict=True)
                    if host in ours[link]
                    and (r is None or r.get("state") in {"not running", "stale"})
                ]
                if dead_here:
                    verdict = ("failed", f"not running after the restart: {last}")
                elif other is None or other.get("state") in {"not running", "unreachable"}:
                    verdict = ("waiting", f"the other end is not up to confirm ({last})")
                else:
                    verdict = ("failed", f"not up within {wait:g}s: {last}")
            if verdict is not None:
                results[link] = verdict
                del pending[link]
                if on_result is not None:
                    on_result(link, *verdict)
        if pending:
            time.sleep(POLL_INTERVAL)
    return results


class _RuntimeBuilder:
    """One wheelhouse per distinct target, built on first demand by whichever probe thread
    asks first (others with that target wait for it); a failure is remembered and reported for
    every host of that target, naming the host."""

    def __init__(self, cache: Path, echo: Echo) -> None:
        self.cache = cache
        self.echo = echo
        self.lock = threading.Lock()
        self.locks: dict[Target, threading.Lock] = {}
        self.built: dict[Target, Runtime | DeployError] = {}

    def get(self, host: str, target: Target) -> Runtime:
        """The runtime for `target`; DeployError ``<host>: target <key>: ...`` if none."""
        with self.lock:
            lock = self.locks.setdefault(target, threading.Lock())
        with lock:
            if target not in self.built:
                try:
                    self.built[target] = build_runtime(self.cache, self.echo, target=target)
                except DeployError as exc:
                    self.built[target] = exc
        found = self.built[target]
        if isinstance(found, DeployError):
            raise DeployError(f"{host}: no runtime for its target {target.key}: {found}")
        return found


def deploy(
    inventory: Inventory,
    hosts: list[str],
    build: Path,
    keystore: Keystore,
    *,
    dry_run: bool = False,
    wait: float = DEFAULT_WAIT,
    jobs: int = DEFAULT_JOBS,
    passphrase: bytes | None = None,
    echo: Echo = print,
    connect_timeout: float = 5.0,
) -> DeployReport:
    """Deploy the rendered build to `hosts` (names from the inventory); see the module doc."""
    known = {h.name: h for h in inventory.hosts}
    hosts = list(dict.fromkeys(hosts))  # a host named twice is deployed once, not in parallel
    unknown = [h for h in hosts if h not in known]
    if unknown:
        raise DeployError(f"{inventory.file}: no host named {', '.join(unknown)}")
    if not hosts:
        raise DeployError("name at least one host, or give --all")
    build = Path(build)
    manifests = {h.name: load_manifest(build, h.name) for h in inventory.hosts}
    ssh = {h.name: SshHost(h.name, h.ssh, connect_timeout=connect_timeout) for h in inventory.hosts}
    here = local_target()
    runtimes = _RuntimeBuilder(build / ".runtime", echo)
    printer = _Printer(echo, len(hosts))
    outcomes = {name: HostOutcome(name) for name in hosts}
    states: dict[str, RemoteState] = {}
    host_runtime: dict[str, Runtime] = {}

    def probe(name: str) -> None:
        host: Host = known[name]
        manifest = manifests[name]
        outcome = outcomes[name]
        flag = manifest.get("systemd", "auto")
        try:
            all_files = desired_files(build, manifest, keystore, use_systemd=flag is not False,
                                      passphrase=passphrase)  # fmt: skip
            paths = [f.path for f in all_files]
            result = ssh[name].run(probe_script(manifest, paths), timeout=30, check=True)
            remote = parse_probe(result.text, paths)
            check_remote(name, host.ssh.user, remote)
            # a probe without a target line (none of ours) is taken as the operator's target
            runtime = runtimes.get(name, remote.target or here)
            use_systemd = flag is True or (flag == "auto" and remote.systemd_running)
            if flag is True and not remote.systemd_running:
                raise DeployError(f"{name}: manifest says systemd but the host does not run it")
            wanted = [f for f in all_files if use_systemd or f.kind != "unit"]
            plan = plan_host(
                host.name,
                manifest,
                wanted,
                remote,
                runtime_stamp=runtime.stamp,
                use_systemd=use_systemd,
            )
        except (SshError, DeployError, UserError) as exc:
            outcome.error = str(exc)
            outcome.unreachable = isinstance(exc, SshUnreachable | SshTimeout)
            printer.line(name, f"FAILED probe: {str(exc).removeprefix(f'{name}: ')}",
                         finished=True)  # fmt: skip
            return
        states[name] = remote
        host_runtime[name] = runtime
        outcome.plan = plan
        printer.line(name, _describe(plan), finished=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(probe, hosts))

    stamps = sorted({runtime.stamp for runtime in host_runtime.values()})
    report = DeployReport(outcomes, runtime_stamp=", ".join(stamps))
    if dry_run:
        report.diff = _dry_run_diff(outcomes, states, ssh,
                                    {n: r.stamp for n, r in host_runtime.items()})  # fmt: skip
        return report

    work = [n for n in hosts if outcomes[n].plan is not None and not outcomes[n].plan.noop]
    if not work:
        if report.ok:  # never "no changes" after a failure: the recap says what failed
            echo("no changes: every host is up to date, nothing restarted")
        return report

    tarballs: dict[str, bytes] = {}  # stamp -> tar, made once per target that is installed
    for name in work:
        runtime = host_runtime[name]
        if outcomes[name].plan.runtime and runtime.stamp not in tarballs:  # type: ignore[union-attr]
            tarballs[runtime.stamp] = runtime.tarball()
    host_runtimes = {name: (host_runtime[name], tarballs.get(host_runtime[name].stamp, b""))
                     for name in work}  # fmt: skip
    printer = _Printer(echo, len(work))
    applied: set[str] = set()  # hosts where the apply script was started (may have changes)
    try:
        _apply_confirm_commit(
            work, outcomes, manifests, states, ssh, host_runtimes=host_runtimes,
            printer=printer, applied=applied, wait=wait, jobs=jobs, echo=echo,
        )  # fmt: skip
    except KeyboardInterrupt:
        echo("interrupted: rolling back the hosts already changed")
        for name in sorted(applied):
            _rollback_host(name, outcomes[name], manifests[name], ssh[name], echo=echo,
                           why="interrupted (Ctrl-C)")  # fmt: skip
        raise
    return report


def apply_timeout(plan: HostPlan) -> float:
    """The time bound of one host's apply: each stop may wait 10 s for a daemon to exit, so the
    bound grows with the number of links the apply stops and starts."""
    return 60.0 + 15.0 * (len(plan.restarts) + len(plan.removed) + len(plan.reload))


def _rollback_host(
    name: str,
    outcome: HostOutcome,
    manifest: Mapping[str, Any],
    ssh: SshHost,
    *,
    echo: Echo,
    why: str,
) -> None:
    """Put every link this deploy touched on `name` back (best effort) and say so."""
    plan = outcome.plan
    if plan is None:
        return
    links = sorted(set(plan.restarts) | set(plan.reload))
    echo(f"{name}: rolling back {', '.join(links) or 'runtime'} ({why})")
    for link in links:
        outcome.rolled_back.setdefault(link, why)
    try:
        ssh.run(rollback_script(plan, manifest, links, outcome.runtime_switched, finish=True),
                timeout=apply_timeout(plan), check=True)  # fmt: skip
    except SshError as exc:
        note = f"rollback failed too ({exc}); the next deploy finds it pending and retries"
        outcome.error = f"{outcome.error}; {note}" if outcome.error else note
        echo(f"{name}: {note}")
    else:
        for link in links:
            outcome.rolled_back[link] += " -- previous files and daemons restored"


def _apply_confirm_commit(
    work: list[str],
    outcomes: dict[str, HostOutcome],
    manifests: Mapping[str, Mapping[str, Any]],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    *,
    runtime: Runtime | None = None,
    tarball: bytes = b"",
    host_runtimes: Mapping[str, tuple[Runtime, bytes]] | None = None,
    printer: _Printer,
    applied: set[str],
    wait: float,
    jobs: int,
    echo: Echo,
) -> None:
    """Phases 3-6 of the module doc for the hosts in `work` (their plans are not no-ops).

    `host_runtimes` gives each host's wheelhouse and its tar (for its target); a host not in it
    gets `runtime` and `tarball`."""

    applied_at: dict[str, float] = {}  # host -> its clock when apply began (before restarts)

    def apply(name: str) -> None:
        outcome = outcomes[name]
        plan = outcome.plan
        assert plan is not None  # noqa: S101 - filtered above
        manifest = manifests[name]
        try:
            applied.add(name)
            if plan.runtime:
                rt, tar = (host_runtimes or {}).get(name) or (runtime, tarball)
                assert rt is not None  # noqa: S101 - a plan installs a runtime only if built
                printer.line(name, f"installing runtime {rt.stamp}")
                ssh[name].run(install_runtime_script(manifest["prefix"], rt.stamp),
                              stdin=tar, timeout=300, check=True)  # fmt: skip
                outcome.runtime_switched = True
            deployed = states[name].deployed or {}
            result = ssh[name].run(apply_script(plan, manifest, deployed),
                                   stdin=_tar_files(plan.files),
                                   timeout=apply_timeout(plan))  # fmt: skip
            for line in result.text.splitlines():
                if line.startswith("applied-at "):
                    with contextlib.suppress(ValueError):
                        applied_at[name] = float(line.split()[1])
                if "start-failed" in line:  # the confirm phase will roll this link back
                    printer.line(name, line)
            if result.returncode != 0:
                detail = result.error_text[-300:] or result.text.strip()[-300:]
                raise SshError(name, f"apply exited {result.returncode}: {detail}")
            what = ", ".join(plan.restarts) or "none"
            reloaded = f"; reloaded: {', '.join(sorted(plan.reload))}" if plan.reload else ""
            printer.line(name, f"applied; (re)started: {what}{reloaded}", finished=True)
        except SshError as exc:
            outcome.error = str(exc)
            printer.line(name, f"FAILED apply: {exc}", finished=True)
            _rollback_host(name, outcome, manifest, ssh[name], echo=printer.echo,
                           why="apply failed")  # fmt: skip
            if "rollback failed" not in (outcome.error or ""):
                applied.discard(name)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(apply, work))

    # 4. confirm every (re)started link from both ends; a hub's unit is each hub-client pair
    # (`hub/client`) it (re)started or reloaded, seen in the hub's peers[] and at the client
    to_confirm: dict[str, list[str]] = {}  # unit -> hosts where it was (re)started/reloaded
    broken_elsewhere: dict[str, str] = {}  # unit -> host whose apply of it failed
    unit_ends: dict[str, list[str]] = {}  # unit -> [hub or server host, client host]
    fingerprints: dict[str, str] = {}
    for name in work:
        plan = outcomes[name].plan
        if plan is None:
            continue
        for link in sorted(set(plan.restarts) | set(plan.reload)):
            for unit, ends, fp in _confirm_units(name, manifests[name], link, plan):
                unit_ends.setdefault(unit, ends)
                fingerprints.setdefault(unit, fp)
                if outcomes[name].error is None:
                    to_confirm.setdefault(unit, []).append(name)
                else:
                    broken_elsewhere[unit] = name

    def ends_of(unit: str) -> list[str]:
        first = to_confirm[unit][0]
        return [first, *(h for h in unit_ends[unit] if h != first)][:2]

    def said(link: str, state: str, why: str) -> None:
        echo(f"link {link:<10} {state.upper() if state == 'failed' else state}: {why}")

    results: dict[str, tuple[str, str]] = {}
    for link in sorted(set(to_confirm) & set(broken_elsewhere)):
        # the other end went back to its old version: this end must follow it
        results[link] = ("failed", f"the apply on {broken_elsewhere[link]} failed and was "
                                   "rolled back there")  # fmt: skip
        said(link, *results[link])
    checked = {link: ends_of(link) for link in sorted(to_confirm) if link not in results}
    results.update(confirm_links(checked, fingerprints, ssh, manifests, wait=wait, jobs=jobs,
                                 on_result=said, restarted=to_confirm,
                                 not_before=applied_at))  # fmt: skip

    # 5. roll back what did not come up
    failed = {link for link, (state, _) in results.items() if state == "failed"}
    for link, (state, why) in results.items():
        for name in to_confirm[link]:
            if state == "up":
                outcomes[name].confirmed.append(link)
            elif state == "waiting":
                outcomes[name].waiting[link] = why
            else:
                outcomes[name].rolled_back[link] = why

    def rollback(name: str) -> None:
        outcome = outcomes[name]
        plan = outcome.plan
        assert plan is not None  # noqa: S101
        links = sorted({_unit_link(unit) for unit in outcome.rolled_back})
        echo(f"{name}: rolling back {', '.join(links)} (restoring previous files and daemons)")
        try:
            ssh[name].run(rollback_script(plan, manifests[name], links, outcome.runtime_switched),
                          timeout=apply_timeout(plan), check=True)  # fmt: skip
        except SshError as exc:
            outcome.error = f"rollback failed: {exc}"

    rollback_hosts = sorted({n for unit in failed for n in to_confirm[unit]})
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(rollback, rollback_hosts))

    restored: dict[str, str] = {}
    if failed:
        wanted: dict[str, set[str]] = {}
        for link in failed:
            for host in ends_of(link):
                wanted.setdefault(host, set()).add(link)
        deadline = time.monotonic() + wait
        while True:
            records = _poll_round(wanted, ssh, manifests, jobs)
            back = all(
                (r := records.get((h, link))) is not None and r.get("state") == "up"
                for link in failed
                for h in ends_of(link)
            )
            if back or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        for link in sorted(failed):
            restored[link] = ", ".join(
                f"{h}: {'absent' if (r := records.get((h, link))) is None else r.get('state')}"
                for h in ends_of(link)
            )
            echo(f"link {link:<10} after rollback: {restored[link]}")
    for link, link_states in restored.items():
        for name in to_confirm[link]:
            outcomes[name].rolled_back[link] += f" -- previous version restored ({link_states})"

    # 6. commit every host whose steps all ran: it records what it now runs -- the new entry of
    # each link that stayed, the previously deployed entry of each link rolled back
    def commit(name: str) -> None:
        record = _committed_manifest(manifests[name], states[name].deployed,
                                     outcomes[name].rolled_back)  # fmt: skip
        body = json.dumps(record, indent=2, sort_keys=True).encode()
        try:
            ssh[name].run(commit_script(manifests[name]), stdin=body, timeout=30, check=True)
            applied.discard(name)
        except SshError as exc:
            outcomes[name].error = f"commit failed ({exc}); the next deploy will confirm it again"

    committable = [n for n in work if outcomes[n].error is None]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(commit, committable))


def _unit_link(unit: str) -> str:
    """The link (or hub) a confirm unit belongs to: ``hub/client`` -> ``hub``."""
    return unit.split("/", 1)[0]


def _confirm_units(
    host: str, manifest: Mapping[str, Any], link: str, plan: HostPlan
) -> list[tuple[str, list[str], str]]:
    """What confirming `link` on `host` means: (unit, [its two end hosts], key fingerprint).

    A point-to-point link is one unit. A hub is one unit per client pair ``hub/client`` --
    every client when the hub (re)started, only the added or changed clients when it was
    reloaded (the others keep their sessions). A hub's client is the unit of its own pair."""
    entry = manifest["links"][link]
    if entry.get("role") == "hub":
        clients = entry.get("clients", {})
        names = plan.touched_clients.get(link, sorted(clients)) if link in plan.reload else clients
        return [
            (f"{link}/{c}", [host, str(clients[c]["host"])], str(clients[c]["key_fingerprint"]))
            for c in sorted(names)
            if c in clients
        ]
    unit = f"{entry['hub']}/{host}" if entry.get("hub") else link
    return [(unit, [host, str(entry["peer"])], str(entry["key_fingerprint"]))]


def _peer_record(record: dict[str, Any] | None, client: str) -> dict[str, Any] | None:
    """A hub's view of one client, from its status record's ``peers[]`` (HUB-SPEC.md), shaped
    like a link's record (state, reason, key_fingerprint, since) so confirm can judge it."""
    if record is None or record.get("state") in {"not running", "stale", "unreachable"}:
        return record
    for peer in record.get("peers") or []:
        if isinstance(peer, dict) and peer.get("name") == client:
            state = str(peer.get("state"))
            started = peer.get("session_started")
            return {
                "state": state,
                "reason": peer.get("reason"),
                "key_fingerprint": peer.get("key_fingerprint"),
                "since": started if state == "up" and started is not None else peer.get("since"),
                "peer": peer.get("peer"),
                "session_age": peer.get("session_age"),
                "last_rtt": peer.get("last_rtt"),
                "bytes_in": peer.get("bytes_in"),
                "bytes_out": peer.get("bytes_out"),
                "pid": record.get("pid"),
            }
    return {"state": "down", "reason": f"the hub lists no client {client!r} in peers[]"}


def _committed_manifest(
    manifest: Mapping[str, Any], previous: Mapping[str, Any] | None, rolled_back: Iterable[str]
) -> dict[str, Any]:
    """The manifest a host records at commit: rolled-back links keep their previous entry (or
    are left out when they had none), so "removed" planning stays right next time."""
    record = json.loads(json.dumps(manifest))
    old_links = (previous or {}).get("links", {})
    for link in sorted({_unit_link(unit) for unit in rolled_back}):
        if link in old_links:
            record["links"][link] = old_links[link]
        else:
            record["links"].pop(link, None)
    return record


def check_remote(name: str, user: str, remote: RemoteState) -> None:
    """Refuse a host deploy cannot work on, naming it: a non-root ssh user, no python3, a
    python3 too old or whose target cannot be read."""
    if remote.uid != 0:
        found = "unknown" if remote.uid is None else str(remote.uid)
        raise DeployError(
            f"{name}: ssh user {user!r} is not root (uid {found}); deploy installs files and "
            "manages daemons on the host: set ssh.user: root for it in the inventory"
        )
    if remote.python is None:
        raise DeployError(f"{name}: python3 not found on the host (the runtime needs it)")
    if remote.target_text is not None and remote.target is None:
        raise DeployError(f"{name}: cannot tell the host's Python target: python3 -c printed "
                          f"{remote.target_text!r}")  # fmt: skip
    if remote.target is not None and remote.target.python < MIN_PYTHON:
        have, need, key = remote.target.python, MIN_PYTHON, remote.target.key
        raise DeployError(f"{name}: python3 on the host is {have[0]}.{have[1]} (target {key}); "
                          f"the runtime needs {need[0]}.{need[1]}+")  # fmt: skip


def _describe(plan: HostPlan) -> str:
    if plan.noop:
        return f"up to date ({len(plan.unchanged)} link(s) running, nothing to do)"
    parts = []
    if plan.runtime:
        parts.append("runtime: install")
    for link, why in sorted(plan.changed.items()):
        parts.append(f"{link}: {', '.join(why)}")
    parts += [f"{link}: not running, start" for link in plan.start]
    parts += [f"{link}: {', '.join(why)}, reload (no restart)" for link, why in
              sorted(plan.reload.items())]  # fmt: skip
    parts += [f"{link}: removed from inventory, stop" for link in plan.removed]
    if plan.unchanged:
        parts.append(f"unchanged: {', '.join(plan.unchanged)}")
    return "; ".join(parts)


def _dry_run_diff(
    outcomes: Mapping[str, HostOutcome],
    states: Mapping[str, RemoteState],
    ssh: Mapping[str, SshHost],
    stamps: Mapping[str, str] | str,
) -> str:
    """Fetch the deployed copies of the non-secret files that would change; diff them.
    `stamps` is each host's new runtime stamp (or one stamp for all)."""
    chunks = []
    for name, outcome in outcomes.items():
        plan = outcome.plan
        if plan is None or plan.noop:
            continue
        if plan.runtime:
            target = states[name].target
            what = f" (target {target.key})" if target else ""
            new = stamps if isinstance(stamps, str) else stamps[name]
            chunks.append(f"# {name}: runtime {states[name].stamp or 'none'} -> {new}{what}\n")
        for link in plan.start:
            chunks.append(f"# {name}: {link} is not running: would start it\n")
        for link in plan.removed:
            chunks.append(f"# {name}: {link} is no longer rendered: would stop and remove it\n")
        for link, why in sorted(plan.reload.items()):
            chunks.append(f"# {name}: hub {link}: {', '.join(why)}: would reload it (SIGHUP), "
                          "not restart it\n")  # fmt: skip
        for link, paths in sorted(plan.prune.items()):
            chunks += [f"# {name}: hub {link}: would delete {path}\n" for path in paths]
        current: dict[str, bytes | None] = {}
        readable = [f.path for f in plan.files if not f.secret and states[name].files.get(f.path)]
        if readable:
            result = ssh[name].run(
                f"tar -c -f - -C / {quote(*[p.lstrip('/') for p in readable])}", timeout=30
            )
            if result.returncode != 0:
                raise DeployError(
                    f"{name}: cannot read the deployed files for the diff (tar exited "
                    f"{result.returncode}: {result.error_text[-200:] or 'no message'})"
                )
            try:
                with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
                    for member in tar.getmembers():
                        handle = tar.extractfile(member)
                        if handle is not None:
                            current["/" + member.name] = handle.read()
            except tarfile.TarError as exc:
                raise DeployError(f"{name}: unreadable tar of the deployed files: {exc}") from exc
        present = [path for path, have in states[name].files.items() if have is not None]
        chunks.append(redacted_diff(name, plan, current, present))
    return "".join(chunks)
