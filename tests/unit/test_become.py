"""``become: sudo``: read from the inventory (host over defaults), applied to every remote
command by SshHost, and a sudo that wants a password turned into an error naming host and user.
The ssh client is a small script here (it runs the remote command locally with sh)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vpnctl.inventory import InventoryError, parse_inventory
from vpnctl.ssh import SshBecomeError, SshHost

INVENTORY = """\
version: 1
defaults:
  become: sudo
  ssh: {user: ops}
hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
    become: none
    ssh: {user: root}
links:
  - {name: l1, server: alpha, client: beta}
"""


def test_become_is_a_host_setting_with_defaults() -> None:
    inventory = parse_inventory(INVENTORY, "inv.yaml")
    hosts = {h.name: h for h in inventory.hosts}
    assert hosts["alpha"].ssh.become == "sudo" and hosts["alpha"].ssh.user == "ops"
    assert hosts["beta"].ssh.become is None


def test_a_bad_become_names_the_field_and_line() -> None:
    text = INVENTORY.replace("    become: none", "    become: su")
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "inv.yaml")
    assert "inv.yaml:10 hosts[1].become: expected sudo or none, got 'su'" in str(caught.value)


def _fake_ssh(tmp_path: Path, sudo: str) -> str:
    """An `ssh` that runs the remote command (its last argument) with sh, with a `sudo` on
    PATH that does `sudo` (a shell snippet: $@ is sudo's argv)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sudo").write_text(f"#!/bin/sh\n{sudo}\n")
    (bindir / "sudo").chmod(0o755)
    ssh = tmp_path / "ssh"
    ssh.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for last; do :; done
        PATH={bindir}:$PATH exec sh -c "$last"
        """))  # fmt: skip
    ssh.chmod(0o755)
    return str(ssh)


def _host(tmp_path: Path, sudo: str) -> SshHost:
    settings = parse_inventory(INVENTORY, "inv.yaml").hosts[0].ssh
    return SshHost("alpha", settings, ssh_binary=_fake_ssh(tmp_path, sudo))


def test_every_command_runs_through_sudo_n_with_stdin_passed(tmp_path: Path) -> None:
    # this sudo prints its own options, then runs the rest (sh -c SCRIPT) as given
    host = _host(tmp_path, 'echo "sudo $1 $2"; shift 2; exec "$@"')
    result = host.run("cat; echo done", stdin=b"secret on stdin\n", check=True)
    assert result.text == "sudo -n --\nsecret on stdin\ndone\n"


def test_a_sudo_that_wants_a_password_is_an_error_naming_host_and_user(tmp_path: Path) -> None:
    host = _host(tmp_path, 'echo "sudo: a password is required" >&2; exit 1')
    with pytest.raises(SshBecomeError) as caught:
        host.run("echo never")
    assert str(caught.value).startswith(
        "alpha: become: sudo failed for ssh user 'ops' (sudo: a password is required); "
    )


def test_a_failing_command_under_sudo_is_still_the_commands_failure(tmp_path: Path) -> None:
    host = _host(tmp_path, 'shift 2; exec "$@"')
    result = host.run("echo out; echo 'sudo: not the point' >&2; exit 3")
    assert result.returncode == 3 and result.text == "out\n"
