"""Phase 1, the runtime: the wheelhouse for a host *target* (built once per target, cached)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import vpnd_runtime

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
except ImportError:  # pip (which deploy runs anyway) vendors the same library
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import (  # type: ignore[no-redef]
        InvalidSpecifier,
        SpecifierSet,
    )

from vpnctl.deploy.common import RUNTIME_DEPS, STAMP_LEN, DeployError, Echo

# A fixed timestamp for the files inside the runtime wheel: same sources -> same bytes -> same
# stamp, so an unchanged runtime is never reinstalled.
_ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)

# The pip-less installer run on each host (shipped in the tarball; part of the stamp, so a host
# whose runtime was laid out by another installer version gets a fresh venv).
INSTALLER_SOURCE = (Path(__file__).parent / "wheel_install.py").read_bytes()


@dataclass(frozen=True)
class Runtime:
    """The wheelhouse shipped to hosts: its files and the stamp that names this version."""

    stamp: str
    wheels: tuple[Path, ...]  # installed into the host's venv
    pip: Path  # pip's own wheel (cached with the others; no longer shipped: see INSTALLER)

    def tarball(self) -> bytes:
        """The wheels and the installer (tools/wheel_install.py) as an uncompressed tar
        (wheels are already compressed)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for wheel in self.wheels:
                tar.add(wheel, arcname=wheel.name)
            info = tarfile.TarInfo("tools/wheel_install.py")
            info.size, info.mode, info.mtime = len(INSTALLER_SOURCE), 0o644, 0
            tar.addfile(info, io.BytesIO(INSTALLER_SOURCE))
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


MIN_PYTHON = (3, 9)  # the runtime (vpnd_runtime, see its compat.py); vpnctl needs 3.11


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
    #: The patch level (``3.9.2``: 2), None when the probe did not say. Not part of the target
    #: (hosts of one minor version share a wheelhouse) but given to pip, whose Requires-Python
    #: checks may need it (cryptography excludes 3.9.0 and 3.9.1).
    micro: int | None = field(default=None, compare=False)

    @property
    def full_version(self) -> str:
        """``major.minor.micro`` for Requires-Python checks (micro 0 when not known)."""
        return f"{self.python[0]}.{self.python[1]}.{self.micro or 0}"

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
    """The probe's ``target`` line (``cpython 3.12.1 aarch64 glibc 2.31``, or ``3.12`` from an
    older probe's cached answer; no libc words on a host without glibc) as a Target; None when
    it is not in that form."""
    words = text.split()
    if len(words) not in (3, 5):
        return None
    impl, version, machine = words[:3]
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match or not re.fullmatch(r"[A-Za-z0-9_]+", machine) or not impl.isalnum():
        return None
    glibc: tuple[int, int] | None = None
    if len(words) == 5:
        libc = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)*", words[4])
        if words[3] == "glibc" and libc:
            glibc = (int(libc[1]), int(libc[2]))
        elif words[3] == "glibc":
            return None
    micro = int(match[3]) if match[3] is not None else None
    return Target((int(match[1]), int(match[2])), machine, glibc, impl, micro)


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
        sys.version_info.micro,
    )


# Printed by the probe: `target <implementation> <major.minor.micro> <machine> [glibc <version>]`.
TARGET_PY = (  # run with -S; the libc from confstr, not platform.libc_ver() (that reads the binary)
    "import os, sys\n"
    "try: libc = os.confstr('CS_GNU_LIBC_VERSION') or ''\n"
    "except (ValueError, OSError): libc = ''\n"
    "print(sys.implementation.name, '%d.%d.%d' % sys.version_info[:3], os.uname().machine, "
    "*libc.split(), end='|')\n"
    "print(sys.executable)"  # the interpreter itself: the install runs it without PATH lookups
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
        "python_full_version": target.full_version,
        "implementation_version": target.full_version,
        "platform_machine": target.machine,
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "extra": "",
    }


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _python_admits(requires_python: str | None, target: Target) -> bool:
    """Whether a distribution's ``Requires-Python`` admits the target's interpreter."""
    if not requires_python:
        return True
    try:
        return SpecifierSet(requires_python).contains(target.full_version, prereleases=True)
    except InvalidSpecifier:
        return True  # as pip does: an unreadable Requires-Python does not exclude


def dependency_closure(target: Target) -> list[str]:
    """A requirement for every distribution the runtime needs on `target`: the runtime
    dependencies and what they require (markers evaluated for the target, extras skipped),
    sorted. Each is pinned ``name==version`` to the version installed here (what the tests ran
    on) when that version supports the target's Python; an older host (3.9, 3.10) whose
    Python a dependency installed here has dropped gets ``name<specifier>`` instead (what its
    dependents ask for), so pip picks the newest release for that Python. A runtime dependency
    itself is always pinned: DeployError when the version here does not support the target."""
    env = _marker_env(target)
    seen: dict[str, str] = {}
    todo: list[tuple[str, str]] = [(dep, "") for dep in RUNTIME_DEPS]
    while todo:
        raw, spec = todo.pop()
        name = _normal(raw)
        if name in seen:
            continue
        try:
            version = metadata.version(name)
            requires = metadata.requires(name) or []
            requires_python = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError as exc:
            if name in RUNTIME_DEPS:
                raise DeployError(f"runtime dependency {name} (needed on {target.key}) is not "
                                  "installed here, so its version is unknown") from exc  # fmt: skip
            seen[name] = f"{name}{spec}"  # needed only on older Pythons: pip picks it
            continue
        if not _python_admits(requires_python, target):
            if name in RUNTIME_DEPS:
                raise DeployError(
                    f"runtime dependency {name} {version} (installed here) does not support "
                    f"Python {target.full_version} on {target.key} (Requires-Python "
                    f"{requires_python}): install a {name} release that does here"
                )
            seen[name] = f"{name}{spec}"  # the host's Python is older than this release's
            continue
        seen[name] = f"{name}=={version}"
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append((req.name, str(req.specifier)))
    return sorted(seen.values())


def wheel_requirements(wheel: Path, target: Target) -> list[Requirement]:
    """The ``Requires-Dist`` of a wheel whose markers hold on `target` (extras skipped)."""
    env = _marker_env(target)
    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist() if n.count("/") == 1
                     and n.endswith(".dist-info/METADATA")), None)  # fmt: skip
        text = zf.read(meta).decode("utf-8", "replace") if meta else ""
    found = []
    for line in text.split("\n\n", 1)[0].splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is None or req.marker.evaluate(env):
                found.append(req)
    return found


def _wheel_name(wheel: Path) -> str:
    return _normal(wheel.name.split("-")[0])


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
    digest.update(b"installer\0" + hashlib.sha256(INSTALLER_SOURCE).digest())
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


def download_wheels(
    dest: Path, wanted: list[str], target: Target, *, closure: bool = False
) -> str | None:
    """``pip download`` binary wheels of `wanted` (no dependencies) for `target` into `dest`;
    an error text naming the target, or None. With `closure`, what the downloaded wheels
    require on `target` (their ``Requires-Dist``, markers evaluated for the target, which pip
    would evaluate for this interpreter instead) is downloaded too, until nothing is missing:
    a dependency pip picked for an older Python may require what nothing here does."""
    platform_args = [arg for tag in target.platform_tags() for arg in ("--platform", tag)]
    for _round in range(10):
        proc = _pip(["download", "--quiet", "--only-binary=:all:", "--no-deps",
                     "--implementation", "cp", "--python-version", target.full_version,
                     *platform_args, "--dest", str(dest), *wanted])  # fmt: skip
        if proc.returncode != 0:
            return (f"no binary wheel set for target {target.key} (CPython "
                    f"{target.full_version}, {target.machine}, manylinux up to glibc "
                    f"{target.glibc[0]}.{target.glibc[1]}) among "  # type: ignore[index]
                    f"{' '.join(wanted)}: {_last_line(proc)}")  # fmt: skip
        if not closure:
            return None
        have = {_wheel_name(w) for w in dest.glob("*.whl")}
        wanted = sorted({f"{req.name}{req.specifier}" for w in dest.glob("*.whl")
                         for req in wheel_requirements(w, target)
                         if _normal(req.name) not in have})  # fmt: skip
        if not wanted:
            return None
    return f"target {target.key}: the dependencies do not close after 10 rounds"


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
        target.platform_tags()  # refuses a target no manylinux wheel can fit, first
        pins = dependency_closure(target)
        if not _python_admits(metadata.metadata("pip").get("Requires-Python"), target):
            pip_pin = "pip"  # the newest pip for the host's older Python
        deps = target_cache(deps, target, [*pins, pip_pin])

        def fetch_foreign(tmp: Path) -> str | None:
            if echo:
                echo(f"runtime: fetching {target.key} wheels for {' '.join(pins)}")
            return download_wheels(tmp / "tools", [pip_pin], target) or download_wheels(
                tmp, pins, target, closure=True
            )

        _fill_cache(deps, [*pins, pip_pin], fetch_foreign)
    wheels = [*sorted(deps.glob("*.whl")), _runtime_wheel(cache)]
    pip = sorted((deps / "tools").glob("pip-*.whl"))
    if not pip:
        raise DeployError(f"{deps / 'tools'}: no pip wheel; delete {deps} and retry")
    return Runtime(stamp=runtime_stamp(wheels, target), wheels=tuple(wheels), pip=pip[-1])


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
