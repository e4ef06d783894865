"""The runtime shipped to hosts runs on Python 3.9+ (Debian 11 and RHEL 9 hosts), while vpnctl
itself needs 3.11: checked here twice.

* Statically, on every run: no construct in ``vpnd_runtime`` that a 3.9 interpreter accepts at
  parse time but fails on at run time (``X | Y`` of types outside annotations, dataclass
  ``slots=``/``kw_only=``, ``zip(strict=)``, ``int.bit_count``, 3.10+ names from ``typing``).
  Syntax newer than 3.9 (``match``, parenthesised context managers...) is ruff's part:
  pyproject.toml checks ``vpnd_runtime`` with ``per-file-target-version = py39``.
* For real, under a Python 3.9: deploy's own wheelhouse for that interpreter's target (cp39
  wheels fetched for it, no cp311-only wheel) is unpacked into a fresh ``venv --without-pip`` by
  the no-pip installer ``tools/wheel_install.py`` exactly as on a host; then every runtime module
  is imported, a protocol session runs (tests/helpers/runtime_smoke.py), ``vpnd --check``
  reads the example configs, and the runtime's own unit tests (the tests/unit files that import
  nothing of vpnctl: :func:`runtime_unit_tests`) pass with pytest and hypothesis fetched for that
  interpreter the same way. The interpreter is ``$VPNCTL_PYTHON39``, a ``python3.9`` on PATH
  or under ~/.pyenv, or else Debian bullseye's own ``/usr/bin/python3`` in the lab's cached
  bullseye rootfs (vpnctl/nspawn.py; built once per machine), run by ``chroot`` in a private
  mount namespace. ``VPNCTL_PYTHON39=bullseye`` picks the rootfs even when a local one exists.
  Under CI=true, a missing interpreter fails.
"""

from __future__ import annotations

import ast
import glob
import io
import os
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

import vpnd_runtime
from tests.conftest import pypi_reachable, require
from vpnctl import nspawn
from vpnctl.deploy.runtime import (
    TARGET_PY,
    Target,
    build_runtime,
    download_wheels,
    parse_target,
)

REPO = Path(__file__).resolve().parents[2]
RUNTIME = Path(vpnd_runtime.__file__).parent
EXAMPLES = ("server.conf", "client.conf")
BUILTIN_TYPES = {"int", "str", "bytes", "float", "bool", "bytearray", "memoryview", "list",
                 "dict", "tuple", "set", "frozenset", "type", "object"}  # fmt: skip
TYPING_310 = {"TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "is_typeddict", "Self",
              "Never", "LiteralString", "assert_never", "assert_type", "reveal_type",
              "Required", "NotRequired", "Unpack", "TypeVarTuple", "dataclass_transform",
              "get_overloads", "clear_overloads", "override", "TypeIs", "ReadOnly"}  # fmt: skip


def _is_type(node: ast.expr) -> bool:
    """Whether `node` looks like a type (a class name, a builtin type, None, or X | Y of them):
    ``IPv4Address | IPv6Address`` does, ``os.O_RDONLY | os.O_CLOEXEC`` does not."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _is_type(node.left) and _is_type(node.right)
    if isinstance(node, ast.Subscript):
        return _is_type(node.value)
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    camel = name[:1].isupper() and any(c.islower() for c in name)  # a class, not a constant
    return camel or name in BUILTIN_TYPES


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (strings under ``from __future__ import
    annotations``, never evaluated)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        annotations = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        for ann in annotations:
            if isinstance(ann, ast.AST):
                found.update(id(sub) for sub in ast.walk(ann))
    return found


def py310_uses(path: Path) -> list[str]:
    """``file:line: what`` for every run-time use of a Python 3.10+ feature in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    in_annotation = _annotation_nodes(tree)
    rel = path.relative_to(REPO)
    found = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            if id(node) not in in_annotation and _is_type(node):
                found.append(f"{where}: `{ast.unparse(node)}` at run time (3.10+): use "
                             "typing.Union for an alias, a tuple for isinstance")  # fmt: skip
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg for k in node.keywords}
            if func.split(".")[-1] == "dataclass" and keywords & {"slots", "kw_only"}:
                found.append(f"{where}: dataclass(slots=/kw_only=) is 3.10+: use "
                             "vpnd_runtime.compat SLOTS/KW_ONLY or __slots__")  # fmt: skip
            if func == "zip" and "strict" in keywords:
                found.append(f"{where}: zip(strict=) is 3.10+")
            if func.endswith(".bit_count"):
                found.append(f"{where}: int.bit_count() is 3.10+: bin(n).count('1')")
        elif isinstance(node, ast.ImportFrom) and node.module == "typing":
            newer = sorted({a.name for a in node.names} & TYPING_310)
            if newer:
                found.append(f"{where}: typing.{', '.join(newer)} is 3.10+")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]  # fmt: skip
            if any(m.split(".")[0] == "tomllib" for m in modules):
                found.append(f"{where}: tomllib is 3.11+")
        elif type(node).__name__ in ("Match", "TryStar"):  # ruff reports these too
            found.append(f"{where}: {type(node).__name__.lower()} statement is 3.10+")
    return found


def _runtime_files() -> list[Path]:
    files = sorted(p for p in RUNTIME.rglob("*.py") if "__pycache__" not in p.parts)
    return [
        *files,
        REPO / "vpnctl/deploy/wheel_install.py",
        REPO / "tests/helpers/runtime_smoke.py",
    ]


def test_the_runtime_sources_use_nothing_newer_than_python_3_9_at_run_time() -> None:
    found = [line for path in _runtime_files() for line in py310_uses(path)]
    assert not found, "\n".join(found)


def test_the_check_finds_what_3_9_cannot_run(tmp_path: Path) -> None:
    """The static check itself: each 3.10+ construct is reported, flags and annotations not."""
    bad = REPO / "tests" / f".py310-probe-{os.getpid()}.py"
    bad.write_text(
        "from __future__ import annotations\n"
        "import os\nfrom dataclasses import dataclass\nfrom typing import TypeAlias\n"
        "Address = int | str\n"
        "@dataclass(frozen=True, slots=True)\nclass A:\n    x: int | None\n"
        "def f(v: bytes | None) -> int | None:\n"
        "    flags = os.O_RDONLY | os.O_CLOEXEC\n"
        "    ok = isinstance(v, bytes | bytearray)\n"
        "    pairs = list(zip([1], [2], strict=True))\n"
        "    return flags.bit_count() if ok and pairs else None\n"
    )
    try:
        found = py310_uses(bad)
    finally:
        bad.unlink()
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [4, 5, 6, 11, 12, 13], found


# --- the real thing, under a Python 3.9 -------------------------------------------------------


def _local_python39() -> str | None:
    explicit = os.environ.get("VPNCTL_PYTHON39", "")
    if explicit == "bullseye":
        return None
    if explicit:
        return explicit
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    on_path = shutil.which("python3.9")
    if on_path and "/shims/" in on_path:  # a pyenv shim runs whatever version pyenv picks
        on_path = None
    return pyenv[-1] if pyenv else on_path


def _bullseye_runner() -> Callable[[Path, str], subprocess.CompletedProcess[str]]:
    """A runner of shell scripts under bullseye's python3, with `scratch` seen as ``/mnt``:
    chroot into the cached rootfs in a private mount namespace, with this machine's /dev and a
    /proc (the mounts end with it; nothing is written into the cached tree)."""
    require(os.geteuid() == 0, "needs root for the bullseye rootfs (no local python3.9)")
    for tool in ("unshare", "chroot", "mount"):
        require(shutil.which(tool) is not None, f"needs {tool} (util-linux, coreutils)")
    missing = nspawn.tools_missing()
    require(not missing, f"no local python3.9 and the bullseye rootfs needs {', '.join(missing)}")
    rootfs = nspawn.ensure_rootfs(print, "bullseye")

    def run(scratch: Path, script: str) -> subprocess.CompletedProcess[str]:
        inner = ('mount --bind "$1" "$2/mnt" && mount --rbind /dev "$2/dev" && '
                 'mount -t proc proc "$2/proc" && exec chroot "$2" /bin/sh -c "$3"')  # fmt: skip
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh",
                str(scratch), str(rootfs), script]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)

    return run


def _local_runner(python: str) -> Callable[[Path, str], subprocess.CompletedProcess[str]]:
    """A runner of shell scripts with `python` as python3 and `scratch` at ``/mnt``'s place
    (the scripts say ``$M`` for it)."""

    def run(scratch: Path, script: str) -> subprocess.CompletedProcess[str]:
        bindir = scratch / "bin"
        bindir.mkdir(exist_ok=True)
        link = bindir / "python3"
        if not link.exists():
            link.symlink_to(python)
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "M": str(scratch)}
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env,
                              timeout=300, check=False)  # fmt: skip

    return run


# What the runtime's unit tests need on the 3.9 interpreter (fetched for it, as its wheelhouse).
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")
NOT_RUNTIME = ("vpnctl", "tests.helpers", "bench", "fuzz")


def runtime_unit_tests() -> list[str]:
    """tests/unit files that test only the runtime (they import nothing of vpnctl, the test
    helpers, bench or fuzz): what must pass under Python 3.9, as paths from the repository."""
    found = []
    for path in sorted((REPO / "tests/unit").glob("test_*.py")):
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
        if not any(m == n or m.startswith(f"{n}.") for m in modules for n in NOT_RUNTIME):
            found.append(str(path.relative_to(REPO)))
    return found


@pytest.mark.timeout(nspawn.BUILD_TIMEOUT + 300)
def test_deploys_runtime_for_python_3_9_installs_without_pip_and_runs(tmp_path: Path) -> None:
    require(pypi_reachable(), "PyPI is unreachable: the cp39 wheelhouse cannot be fetched")
    python = _local_python39()
    run = _local_runner(python) if python else _bullseye_runner()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # the interpreter's target, asked as deploy's probe asks a host
    probe = run(scratch, f"M=${{M:-/mnt}}; python3 -S -c {shlex.quote(TARGET_PY)}")
    assert probe.returncode == 0, probe.stderr
    target = parse_target(probe.stdout.partition("|")[0])
    assert isinstance(target, Target) and target.python == (3, 9), probe.stdout
    runtime = build_runtime(tmp_path / "rt", print, target=target)
    names = [w.name for w in runtime.wheels]
    assert not [n for n in names if "-cp31" in n], f"a 3.10+ wheel for a 3.9 host: {names}"
    with tarfile.open(fileobj=io.BytesIO(runtime.tarball())) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # 3.11.4+
        tar.extractall(scratch / "wh", **safe)  # noqa: S202 - our own tarball, filtered
    smoke = scratch / "smoke"
    smoke.mkdir()
    shutil.copy(REPO / "tests/helpers/runtime_smoke.py", smoke)
    shutil.copy(REPO / "tests/unit/test_proto_pair.py", smoke)
    for name in EXAMPLES:
        shutil.copy(REPO / "examples" / name, scratch / name)
    checks = " && ".join(f'"$M"/venv/bin/vpnd --check --no-key -f "$M"/{n}' for n in EXAMPLES)
    script = (
        'M=${M:-/mnt}; set -e; export TMPDIR="$M"/tmp; mkdir "$TMPDIR"\n'
        'python3 -m venv --without-pip "$M"/venv\n'
        '"$M"/venv/bin/python "$M"/wh/tools/wheel_install.py "$M"/venv "$M"/wh/*.whl\n'
        'cd "$M"/smoke && "$M"/venv/bin/python -B runtime_smoke.py\n'
        f"{checks}\n"
    )
    proc = run(scratch, script)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "runtime-smoke ok 3.9." in proc.stdout, proc.stdout
    for name in EXAMPLES:
        assert f"{name}: OK (mode" in proc.stdout, proc.stdout

    # the runtime's own unit tests, with pytest and hypothesis for 3.9 in the same venv
    testwh = scratch / "testwh"
    testwh.mkdir()
    for wheel in runtime.wheels:  # installed already: the closure needs them, not again
        shutil.copy(wheel, testwh)
    error = download_wheels(testwh, [*TEST_TOOLS], target, closure=True)
    assert error is None, error
    for wheel in runtime.wheels:
        (testwh / wheel.name).unlink()
    files = runtime_unit_tests()
    assert len(files) >= 15, files
    repo = scratch / "repo"
    for rel in ["pyproject.toml", "tests/__init__.py", "tests/conftest.py", *files]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    shutil.copytree(REPO / "examples", repo / "examples")  # test_config reads them
    script = (
        'M=${M:-/mnt}; set -e; export TMPDIR="$M"/tmp\n'
        '"$M"/venv/bin/python "$M"/wh/tools/wheel_install.py "$M"/venv "$M"/testwh/*.whl\n'
        'cd "$M"/repo && "$M"/venv/bin/python -B -m pytest -q -p no:cacheprovider --durations=8 '
        + " ".join(files)
        + "\n"
    )
    proc = run(scratch, script)
    summary = proc.stdout.strip().splitlines()[-1:] or [proc.stderr]
    assert proc.returncode == 0, f"under 3.9: {summary}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    assert " passed" in summary[0] and "failed" not in summary[0], proc.stdout[-3000:]
