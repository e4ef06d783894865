"""Deploy's runtime targets: what the probe reports about a host's Python, machine and glibc,
which wheel platform tags that accepts, and how the runtime stamp and cache depend on it.

Only the last tests touch the network (PyPI, via pip download); they skip when PyPI cannot be
reached, except under CI=true, where PyPI is available and a skip would hide a regression."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import pypi_reachable
from vpnctl.deploy import (
    TARGET_PY,
    DeployError,
    RemoteState,
    Target,
    build_runtime,
    check_remote,
    dependency_closure,
    install_runtime_script,
    local_target,
    parse_probe,
    parse_target,
    probe_script,
    runtime_stamp,
    target_cache,
)

CP312 = Target((3, 12), "x86_64", (2, 36))


def test_a_glibc_hosts_target_line_parses_to_python_machine_and_glibc() -> None:
    target = parse_target("cpython 3.12 aarch64 glibc 2.31")
    assert target == Target((3, 12), "aarch64", (2, 31), "cpython")
    assert target is not None and target.key == "cp312-aarch64-glibc2.31"


def test_the_probes_patch_level_is_kept_but_is_not_part_of_the_target() -> None:
    target = parse_target("cpython 3.9.2 x86_64 glibc 2.31")
    assert target == Target((3, 9), "x86_64", (2, 31)) and target.key == "cp39-x86_64-glibc2.31"
    assert (target.micro, target.full_version) == (2, "3.9.2")
    assert parse_target("cpython 3.9.x x86_64 glibc 2.31") is None


def test_a_host_without_glibc_parses_with_no_glibc_and_garbage_does_not_parse() -> None:
    assert parse_target("cpython 3.13 x86_64") == Target((3, 13), "x86_64", None)
    assert parse_target("cpython 3.13 x86_64  ") == Target((3, 13), "x86_64", None)
    for bad in ("-", "", "cpython three x86_64", "cpython 3.12 x86_64 glibc two", "a b c d e f"):
        assert parse_target(bad) is None, bad


def test_the_probe_asks_python3_for_the_target_and_parse_probe_keeps_it() -> None:
    manifest = {"prefix": "/", "links": {}}
    assert "t=$(python3 -S -c " in probe_script(manifest, [])
    state = parse_probe("uid 0\npython /usr/bin/python3\ntarget cpython 3.13 x86_64 glibc 2.39\n",
                        [])  # fmt: skip
    assert state.target == Target((3, 13), "x86_64", (2, 39))


def test_the_probes_target_line_run_here_is_the_local_target() -> None:
    """The probe's own snippet (os.confstr, no platform module) agrees with local_target()."""
    out = subprocess.run([sys.executable, "-S", "-c", TARGET_PY], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    target, _, exe = out.strip().partition("|")
    assert parse_target(target) == local_target()
    assert exe == sys.executable


def test_the_local_target_is_this_interpreter() -> None:
    here = local_target()
    assert here.python == (sys.version_info.major, sys.version_info.minor)
    assert here.key.startswith(f"cp{here.python[0]}{here.python[1]}-")


def test_platform_tags_run_from_the_hosts_glibc_down_to_manylinux2014_newest_first() -> None:
    tags = Target((3, 12), "aarch64", (2, 28)).platform_tags()
    assert tags[0] == "manylinux_2_28_aarch64"
    assert tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert len(tags) == 28 - 17 + 1 + 1


def test_x86_64_also_accepts_the_older_manylinux2010_and_manylinux1_wheels() -> None:
    tags = Target((3, 12), "x86_64", (2, 17)).platform_tags()
    assert tags[:2] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert {"manylinux2010_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"} <= set(tags)


def test_a_target_no_manylinux_wheel_can_fit_is_refused_naming_the_target() -> None:
    with pytest.raises(DeployError, match=r"cp312-aarch64-glibc2.12: glibc 2.12 is older"):
        Target((3, 12), "aarch64", (2, 12)).platform_tags()
    with pytest.raises(DeployError, match=r"cp312-x86_64-noglibc: no glibc"):
        Target((3, 12), "x86_64", None).platform_tags()
    with pytest.raises(DeployError, match=r"needs CPython, not pypy"):
        Target((3, 11), "x86_64", (2, 36), "pypy").platform_tags()


def test_a_host_whose_python3_is_too_old_is_refused_at_the_probe_naming_host_and_target() -> None:
    probe = "uid 0\npython /usr/bin/python3\ntarget cpython 3.8.10 x86_64 glibc 2.31\n"
    remote = parse_probe(probe, [])
    with pytest.raises(DeployError, match=r"^h1: python3 on the host is 3.8 \(target cp38-.*3.9\+"):
        check_remote("h1", "root", remote)


def test_a_python_3_9_host_debian_11_or_rhel_9_passes_the_probe_with_its_patch_level() -> None:
    remote = parse_probe("uid 0\npython /usr/bin/python3\ntarget cpython 3.9.2 x86_64 glibc 2.31\n",
                         [])  # fmt: skip
    check_remote("h1", "root", remote)
    assert remote.target == Target((3, 9), "x86_64", (2, 31))
    assert remote.target is not None and remote.target.full_version == "3.9.2"


def test_an_older_hosts_dependencies_not_supporting_its_python_are_left_to_pip() -> None:
    """cffi and pycparser installed here may have dropped 3.9: a 3.9 host gets what its
    dependents ask for (pip picks the newest release for 3.9); the runtime's own dependencies
    stay pinned, and markers for old Pythons (typing-extensions below 3.11) count."""
    from importlib import metadata

    pins = dependency_closure(Target((3, 9), "x86_64", (2, 31), micro=2))
    assert f"cryptography=={metadata.version('cryptography')}" in pins
    assert "pyserial==3.5" in pins
    for pin in pins:
        name = pin.split("=")[0].split(">")[0].split("<")[0]
        requires_python = metadata.metadata(name).get("Requires-Python") or ""
        if "==" in pin:
            assert ">=3.1" not in requires_python.replace(" ", ""), pin


def test_a_host_whose_target_cannot_be_read_is_refused_at_the_probe() -> None:
    remote = parse_probe("uid 0\npython /usr/bin/python3\ntarget -\n", [])
    with pytest.raises(DeployError, match=r"^h1: cannot tell the host's Python target"):
        check_remote("h1", "root", remote)


def test_the_stamp_differs_per_target_for_the_same_wheels(tmp_path: Path) -> None:
    wheel = tmp_path / "x-1-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    s311 = runtime_stamp([wheel], Target((3, 11), "x86_64", (2, 36)))
    assert s311 == runtime_stamp([wheel], Target((3, 11), "x86_64", (2, 36)))
    assert s311 != runtime_stamp([wheel], CP312), "a Python upgrade gets a fresh runtime"
    assert s311 != runtime_stamp([wheel], Target((3, 11), "aarch64", (2, 36)))


def test_each_target_and_pin_set_has_its_own_cache_dir(tmp_path: Path) -> None:
    deps = tmp_path / "wheels"
    a = target_cache(deps, CP312, ["cffi==2.1.1"])
    assert a.parent == tmp_path and a.name.startswith("wheels-cp312-x86_64-glibc2.36-")
    assert a != target_cache(deps, CP312, ["cffi==2.1.2"])
    assert a != target_cache(deps, Target((3, 13), "x86_64", (2, 36)), ["cffi==2.1.1"])


def test_the_dependency_closure_pins_the_installed_versions_with_markers_for_the_target() -> None:
    from importlib import metadata

    pins = dependency_closure(CP312)
    names = {pin.split("==")[0] for pin in pins}
    assert {"cryptography", "pyserial"} <= names
    assert "pyroute2" not in names, "the runtime speaks rtnetlink itself (io/netlink.py)"
    assert f"cryptography=={metadata.version('cryptography')}" in pins
    assert "bcrypt" not in names, "extras are not part of the runtime"
    assert "win-inet-pton" not in names, "Windows-only requirements are not for a Linux host"


@pytest.fixture
def pypi() -> None:
    if not pypi_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("PyPI is unreachable under CI=true: the foreign-target build is untested")
        pytest.skip("PyPI is unreachable")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "target",
    [CP312, Target((3, 13), "aarch64", (2, 28)), Target((3, 9), "x86_64", (2, 31), micro=2)],
    ids=lambda t: t.key,
)
def test_a_foreign_wheelhouse_holds_only_wheels_a_host_of_that_target_can_install(
    tmp_path: Path, pypi: None, target: Target
) -> None:
    runtime = build_runtime(tmp_path / "rt", None, tmp_path / "wheels", target=target)
    names = [w.name for w in runtime.wheels]
    cp = f"cp{target.python[0]}{target.python[1]}"
    for name in names:
        python_tag, abi_tag, platform_tag = name[:-4].split("-")[-3:]
        assert python_tag in {"py3", "py2.py3"} or python_tag.startswith("cp3"), name
        assert abi_tag in {"none", "abi3", cp}, name
        if abi_tag == "abi3":  # cp311-abi3 needs 3.11+: never for an older host
            assert int(python_tag[3:]) <= target.python[1], name
        for tag in platform_tag.split("."):
            assert tag == "any" or tag in target.platform_tags(), name
    assert any(f"-{cp}-{cp}-" in n for n in names), "cffi is built per Python version"
    assert any(n.startswith("cryptography-") for n in names)
    assert runtime.pip.name.startswith("pip-")
    with zipfile.ZipFile(runtime.pip) as zf:
        assert any(n.endswith("pip/__main__.py") for n in zf.namelist())
    # a second build finds the cache warm: same wheels, same stamp, nothing fetched
    said: list[str] = []
    again = build_runtime(tmp_path / "rt", said.append, tmp_path / "wheels", target=target)
    assert (again.stamp, said) == (runtime.stamp, [])


@pytest.mark.timeout(120)
def test_a_target_no_wheel_exists_for_fails_with_a_deploy_error_naming_the_target(
    tmp_path: Path, pypi: None
) -> None:
    future = Target((3, 99), "x86_64", (2, 36))
    with pytest.raises(DeployError, match=r"no binary wheel set for target cp399-x86_64-glibc2.36"):
        build_runtime(tmp_path / "rt", None, tmp_path / "wheels", target=future)
    assert not list(tmp_path.glob("wheels-*")), "a failed fetch leaves no cache behind"


def test_the_probe_reads_the_target_cached_by_the_install_while_python3_is_unchanged(
    tmp_path: Path,
) -> None:
    """No python3 run per probe once the install cached its answer; a changed python3 (another
    file on PATH) or a venv whose interpreter is gone asks python3 again."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "python3"
    fake.write_text(
        f"#!/bin/sh\necho run >> {calls}\necho 'cpython 3.11 x86_64 glibc 2.36|/x/py'\n"
    )
    fake.chmod(0o755)
    prefix = tmp_path / "host"
    venv = prefix / "opt" / "vpnd" / "venv-s1"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (prefix / "opt" / "vpnd" / "current").symlink_to("venv-s1")
    install = install_runtime_script(
        str(prefix), "s1", "/x/py", "cpython 3.12 x86_64 glibc 2.39|/x/py"
    )
    cache_lines = [line for line in install.splitlines() if "k=$(" in line]
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    # the install's cache-writing lines, run here as on the host
    subprocess.run(["sh", "-c", "\n".join(cache_lines)], env=env, check=True)

    def probe() -> RemoteState:
        script = probe_script({"prefix": str(prefix), "links": {}}, [])
        out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                             check=False).stdout  # fmt: skip
        return parse_probe(out, [])

    state = probe()
    assert state.target == Target((3, 12), "x86_64", (2, 39)), "from the cache"
    assert state.python_exe == "/x/py" and not calls.exists()
    fake.write_text(fake.read_text() + "\n")  # python3 changed (size, mtime): ask it again
    assert probe().target == Target((3, 11), "x86_64", (2, 36))
    assert calls.read_text() == "run\n"
