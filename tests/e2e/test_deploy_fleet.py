"""Fleet operations on the real lab (issue 13): deploy as a non-root ssh user through
``become: sudo``, and the clear error when sudo wants a password; the pip-less runtime install
(the runtime imports and ``vpnd --check`` works on the host) and the reuse of an identical one;
a host that fails at probe leaves the other end of its links untouched and waited for by
nobody.

One lab (server, client1, client2) for the module; the tests run in file order. Two tagged
accounts are created with ``useradd`` (one with a tagged sudoers drop-in, one without) and
removed at the end however the tests end. The lab lives in a directory the accounts can
traverse: the lab's sshd reads ``operator_key.pub`` as the user logging in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_root_netns, require_tools
from tests.helpers.lab import lab_exec, rendered_lab, unique_tag, vpnctl
from vpnctl.lab import LabState

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    require_root_netns()
    require_tools("sshd", "ssh", "ssh-keygen", "sudo", "visudo", "useradd", "userdel")
    top = Path(tempfile.mkdtemp(prefix="vfleet-"))
    try:
        top.chmod(0o711)  # traversable (not listable) by the test accounts' sshd sessions
        with rendered_lab(top / "lab", clients=2, base="fl") as state:
            Path(state.directory).chmod(0o711)
            (Path(state.directory) / "operator_key.pub").chmod(0o644)
            yield state
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def accounts(lab: LabState) -> Iterator[tuple[str, str]]:
    """(an account with passwordless sudo, an account without sudo rights), both tagged."""
    tag = unique_tag("vf")  # letters and hex only: a valid user name and sudoers.d file name
    sudoer, plain = f"{tag}s", f"{tag}n"
    dropin = Path("/etc/sudoers.d") / tag
    staged = Path("/etc/sudoers.d") / f".{tag}.new"  # sudo ignores names with a dot
    created: list[str] = []
    try:
        for name in (sudoer, plain):
            # '*' (not '!'): sshd without PAM refuses a locked account even with a key
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", "--password",
                            "*", "--comment", "vpnctl test account", name], check=True)  # fmt: skip
            created.append(name)
        staged.write_text(f"{sudoer} ALL=(root) NOPASSWD: ALL\n")
        staged.chmod(0o440)
        subprocess.run(["visudo", "-c", "-q", "-f", str(staged)], check=True)
        staged.rename(dropin)
        yield sudoer, plain
    finally:
        staged.unlink(missing_ok=True)
        dropin.unlink(missing_ok=True)
        for name in created:
            subprocess.run(["userdel", "--force", name], check=False, capture_output=True)


def _set_hosts(state: LabState, **ssh: dict[str, object]) -> None:
    """Give lab hosts their own ssh user / become (``None`` drops a host's own settings)."""
    path = Path(state.directory) / "inventory.yaml"
    inventory = yaml.safe_load(path.read_text())
    for host in inventory["hosts"]:
        if host["name"] in ssh:
            host.pop("become", None)
            host["ssh"] = {"host": host["ssh"]["host"]}
            settings = dict(ssh[host["name"]] or {})
            if "become" in settings:
                host["become"] = settings.pop("become")
            host["ssh"].update(settings)  # the lab's ControlPath (cm-%r@%h) is per user
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))


def _host(state: LabState, name: str):
    return next(h for h in state.hosts if h.name == name)


def _venv(state: LabState, name: str) -> Path:
    return (Path(_host(state, name).prefix) / "opt" / "vpnd" / "current").resolve()


def _pidfile(state: LabState, host: str, link: str) -> int:
    return int((Path(_host(state, host).prefix) / "run" / "vpnd" / f"{link}.pid").read_text())


def test_a_sudo_user_deploys_everything_and_the_pip_less_runtime_works_on_the_host(
    lab: LabState, accounts: tuple[str, str]
) -> None:
    sudoer, _ = accounts
    _set_hosts(lab, client1={"user": sudoer, "become": "sudo"})
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l1, l2" in proc.stdout, proc.stdout
    conf = Path(_host(lab, "client1").prefix) / "etc" / "vpnd" / "l1.conf"
    assert conf.stat().st_uid == 0, "files written through sudo belong to root"
    # the runtime unpacked without pip imports and checks its config on the host itself
    venv = _venv(lab, "client1")
    out = lab_exec(lab, "client1", str(venv / "bin" / "vpnd"), "--check", "-f", str(conf))
    assert "key " in out, out
    lab_exec(lab, "client1", str(venv / "bin" / "python"), "-c",
             "import vpnd_runtime.daemon, cryptography, serial")  # fmt: skip
    site = next(venv.glob("lib/python3*/site-packages"))
    assert not (site / "pip").exists()
    assert (venv / ".vpnctl-complete").exists()
    cached = (venv / ".vpnctl-target").read_text().splitlines()  # later probes run no python3
    assert cached[1].startswith("cpython 3.") and "|/" in cached[1], cached
    # status reads through sudo too
    status = vpnctl(lab, "status", "--json")
    assert json.loads(status.stdout)["links"], status.stdout


def test_a_user_without_sudo_rights_fails_at_probe_naming_the_host_and_the_user(
    lab: LabState, accounts: tuple[str, str]
) -> None:
    _, plain = accounts
    _set_hosts(lab, client2={"user": plain, "become": "sudo"})
    proc = vpnctl(lab, "deploy", "--all", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    want = f"become: sudo failed for ssh user '{plain}' (sudo: a password is required)"
    assert re.search(rf"client2 +FAILED probe: {re.escape(want)}", proc.stdout), proc.stdout
    assert re.search(rf"client2 +failed +{re.escape(want)}", proc.stdout), "the recap says why"
    _set_hosts(lab, client2={"user": plain})  # no become: refused as not root, with the fix
    proc = vpnctl(lab, "deploy", "client2", check=False)
    assert proc.returncode == 1
    assert re.search(rf"client2 +FAILED probe: ssh user '{plain}' is not root", proc.stdout)
    assert "become: sudo" in proc.stdout


def test_a_link_whose_other_end_failed_at_probe_is_not_applied_nor_waited_for(
    lab: LabState, accounts: tuple[str, str]
) -> None:
    _, plain = accounts
    _set_hosts(lab, client2={"user": plain, "become": "sudo"})  # client2 fails at probe
    path = Path(lab.directory) / "inventory.yaml"
    inventory = yaml.safe_load(path.read_text())
    for link in inventory["links"]:
        link["keepalive"] = 7  # both links change at both ends
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    vpnctl(lab, "render")
    server_l2 = Path(_host(lab, "server").prefix) / "etc" / "vpnd" / "l2.conf"
    before, pid_before = server_l2.read_bytes(), _pidfile(lab, "server", "l2")
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30", "--json", check=False)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert hosts["client2"]["result"] == "failed"
    server = hosts["server"]
    assert server["skipped"] == {
        "l2": "not applied: its other end client2 failed before apply (become: sudo failed "
        f"for ssh user '{plain}' (sudo: a password is required); give that user passwordless "
        "sudo (NOPASSWD in sudoers) or connect as root)"
    }
    assert "l2" not in server["waiting"] and "l2" not in server["rolled_back"]
    assert server["confirmed"] == ["l1"], server
    assert "l2 not applied: its other end client2 failed" in server["detail"]
    assert server_l2.read_bytes() == before, "the server's l2 config was not touched"
    assert _pidfile(lab, "server", "l2") == pid_before, "the server's l2 daemon was not restarted"
    # client2 back: the next deploy applies l2 at both ends
    _set_hosts(lab, client2=None)
    proc = vpnctl(lab, "deploy", "--all", "--wait", "30")
    assert "confirmed up at both ends: l2" in proc.stdout, proc.stdout
    assert server_l2.read_bytes() != before


def test_an_identical_runtime_already_on_the_host_is_reused_not_shipped_again(
    lab: LabState,
) -> None:
    venv = _venv(lab, "client1")
    marker = (venv / ".vpnctl-complete").stat()
    stamp_file = Path(_host(lab, "client1").prefix) / "opt" / "vpnd" / "STAMP"
    stamp = stamp_file.read_text().strip()
    stamp_file.write_text("0000000000000000\n")  # the host now claims another runtime
    proc = vpnctl(lab, "deploy", "client1", "--wait", "30")
    assert f"reusing runtime {stamp} (already on the host)" in proc.stdout, proc.stdout
    assert "confirmed up at both ends: l1" in proc.stdout
    assert stamp_file.read_text().strip() == stamp
    assert _venv(lab, "client1") == venv
    assert (venv / ".vpnctl-complete").stat().st_mtime_ns == marker.st_mtime_ns
    assert "no changes" in vpnctl(lab, "deploy", "--all").stdout
