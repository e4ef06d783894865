"""The pip-less installer (vpnctl/deploy/wheel_install.py) on real venvs: the shipped wheelhouse
installs and imports; a tampered, incomplete or escaping wheel is refused naming the wheel."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vpnctl.deploy import build_runtime
from vpnctl.deploy.runtime import INSTALLER_SOURCE

INSTALLER = Path(__file__).parents[2] / "vpnctl" / "deploy" / "wheel_install.py"


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def _install(venv: Path, *wheels: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(venv / "bin" / "python"), str(INSTALLER), str(venv), *map(str, wheels)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _wheel(path: Path, files: dict[str, bytes], *, record: dict[str, bytes] | None = None) -> Path:
    """A wheel `demo-1.0` with `files`; RECORD hashes `record` (default: the files themselves)."""
    dist = "demo-1.0.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    lines = []
    for name, data in (record if record is not None else files).items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    lines.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(lines) + "\n")
    return path


def test_the_shipped_wheelhouse_installs_without_pip_and_the_runtime_imports(
    tmp_path: Path,
) -> None:
    runtime = build_runtime(tmp_path / "cache")
    with tarfile.open(fileobj=io.BytesIO(runtime.tarball())) as tar:
        names = tar.getnames()
        shipped = tar.extractfile("tools/wheel_install.py").read()  # type: ignore[union-attr]
    assert "tools/wheel_install.py" in names and not any("pip-" in n for n in names)
    assert shipped == INSTALLER_SOURCE
    venv = _venv(tmp_path / "venv")
    proc = _install(venv, *runtime.wheels)
    assert proc.returncode == 0, proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import vpnd_runtime.daemon, cryptography, serial, sys; "
                            "print(sys.prefix)"],
                           capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert check.stdout.strip() == str(venv)
    version = subprocess.run([str(venv / "bin" / "vpnd"), "--version"], capture_output=True,
                             text=True, env=env, check=True)  # fmt: skip
    assert version.stdout.startswith("vpnd ")
    assert (venv / "bin" / "vpnd").read_text().startswith(f"#!{venv}/bin/python\n")
    site = next(venv.glob("lib/python3*/site-packages"))
    assert not (site / "pip").exists(), "pip is neither shipped nor installed"
    installers = {p.read_text() for p in site.glob("*.dist-info/INSTALLER")}
    assert installers == {"vpnctl\n"}


def test_a_member_that_does_not_match_its_record_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b"x = 1\n"},
                   record={"demo/__init__.py": b"x = 2\n"})  # fmt: skip
    proc = _install(_venv(tmp_path / "venv"), wheel)
    assert proc.returncode == 1
    assert "demo-1.0-py3-none-any.whl: member 'demo/__init__.py' does not match its RECORD" in (
        proc.stderr
    )


def test_a_member_missing_from_record_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b""},
                   record={})  # fmt: skip
    proc = _install(_venv(tmp_path / "venv"), wheel)
    assert proc.returncode == 1 and "is not in RECORD with a hash" in proc.stderr


@pytest.mark.parametrize("name", ["../evil.py", "demo/../../evil.py", "/tmp/evil.py"])
def test_a_member_that_would_land_outside_the_venv_is_refused(tmp_path: Path, name: str) -> None:
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {name: b"boom\n"})
    proc = _install(_venv(tmp_path / "venv"), wheel)
    assert proc.returncode == 1 and "unsafe member name" in proc.stderr, proc.stderr
    assert not (tmp_path / "evil.py").exists()
    assert not list(tmp_path.glob("venv/lib/evil.py"))


def test_a_symlink_member_is_refused(tmp_path: Path) -> None:
    path = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": b""})
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("demo/link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/shadow")
    proc = _install(_venv(tmp_path / "venv"), path)
    assert proc.returncode == 1 and "is a symlink" in proc.stderr
