"""The SSH layer's command lines: batch mode, bounded connects, multiplexing, inventory options."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpnctl.inventory import Ssh
from vpnctl.ssh import SshError, SshHost, SshTimeout, SshUnreachable


def test_every_call_is_batch_mode_bounded_and_multiplexed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = SshHost("h1", Ssh(host="198.18.0.9"), connect_timeout=3).base_argv()
    joined = " ".join(argv)
    assert "BatchMode=yes" in joined
    assert "ConnectTimeout=3" in joined
    assert "ControlMaster=auto" in joined
    assert f"ControlPath={tmp_path}/vpnctl/cm/%C" in joined
    assert argv[-6:] == ["-p", "22", "-l", "root", "--", "198.18.0.9"]


def test_inventory_options_identity_and_jump_host_are_passed_through() -> None:
    ssh = Ssh(
        host="198.18.0.9",
        port=2222,
        user="ops",
        identity="/keys/id",
        options=("ControlPath=/tmp/x-%h", "StrictHostKeyChecking=yes"),
        proxyjump="admin@198.18.0.254",
    )
    argv = SshHost("h1", ssh).base_argv()
    assert "ControlMaster=auto" not in argv, "the operator's own multiplexing is kept"
    assert argv[argv.index("ControlPath=/tmp/x-%h") - 1 :][:2] == ["-o", "ControlPath=/tmp/x-%h"]
    assert argv[argv.index("-i") : argv.index("-i") + 2] == ["-i", "/keys/id"]
    assert argv[argv.index("-J") : argv.index("-J") + 2] == ["-J", "admin@198.18.0.254"]
    assert argv[-6:] == ["-p", "2222", "-l", "ops", "--", "198.18.0.9"]


def _fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_an_ssh_failure_is_unreachable_and_a_remote_255_is_not(tmp_path: Path) -> None:
    failing = _fake_ssh(tmp_path, 'echo "ssh: connect to host x port 22: No route to host" >&2\n'
                                  "exit 255")  # fmt: skip
    with pytest.raises(SshUnreachable, match="No route to host"):
        SshHost("h1", Ssh(host="x"), ssh_binary=failing).run("true")
    remote = _fake_ssh(tmp_path, 'echo "tar: short read" >&2; exit 255')
    result = SshHost("h1", Ssh(host="x"), ssh_binary=remote).run("tar -x")
    assert result.returncode == 255
    assert result.error_text == "tar: short read"


def test_a_command_that_outlives_its_bound_is_cut_off(tmp_path: Path) -> None:
    slow = _fake_ssh(tmp_path, "exec sleep 30")
    with pytest.raises(SshTimeout, match=r"no answer within 0\.3s"):
        SshHost("h1", Ssh(host="x"), ssh_binary=slow).run("true", timeout=0.3)


def test_stdin_carries_the_payload_never_the_command_line(tmp_path: Path) -> None:
    echo = _fake_ssh(tmp_path, 'printf "%s\\n" "$@" > "$0.argv"; cat')
    result = SshHost("h1", Ssh(host="x"), ssh_binary=echo).run("cat", stdin=b"secret-bytes")
    assert result.stdout == b"secret-bytes"
    assert "secret-bytes" not in (tmp_path / "fake-ssh.argv").read_text()


def test_the_destination_follows_a_double_dash_in_every_ssh_call(tmp_path: Path) -> None:
    record = _fake_ssh(tmp_path, 'printf "%s\\n" "$@" >> "$0.argv"')
    host = SshHost("h1", Ssh(host="x"), ssh_binary=record)
    host.run("true")
    host.close()
    calls = (tmp_path / "fake-ssh.argv").read_text().split("-l\nroot\n")[1:]
    assert [call.splitlines()[:2] for call in calls] == [["--", "x"], ["-O", "exit"]]
    assert (tmp_path / "fake-ssh.argv").read_text().splitlines()[-2:] == ["--", "x"]


def test_a_destination_that_looks_like_an_option_is_refused_before_ssh_runs(tmp_path: Path) -> None:
    record = _fake_ssh(tmp_path, 'printf "%s\\n" "$@" >> "$0.argv"')
    with pytest.raises(SshError, match="unsafe ssh host"):
        SshHost("h1", Ssh(host="-oProxyCommand=touch /tmp/x"), ssh_binary=record).run("true")
    assert not (tmp_path / "fake-ssh.argv").exists()
