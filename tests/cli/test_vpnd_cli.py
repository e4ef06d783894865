"""The `vpnd` command line: exit codes and messages, called through main([...])."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import require
from vpnd_runtime.cli import main
from vpnd_runtime.config import Config
from vpnd_runtime.keyfile import fingerprint, load_key

KEY = bytes(range(100, 132))


@pytest.fixture
def randomdev(tmp_path: Path) -> Path:
    path = tmp_path / "random"
    path.write_bytes(KEY)
    return path


@pytest.fixture
def conf(tmp_path: Path, randomdev: Path) -> Path:
    """A server config whose key file (relative path) exists with mode 0600."""
    path = tmp_path / "l1.conf"
    path.write_text(
        "mode server\nserver 24741\nlocal 198.19.0.1\nremote 198.19.0.2\n"
        f"keyfile l1.key\nrandomdev {randomdev}\nstatusfile {tmp_path / 'l1.status.json'}\n"
    )
    key = tmp_path / "l1.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    return path


def test_check_of_a_good_config_prints_ok_with_mode_and_fingerprint(conf, capsys):
    assert main(["--check", "-f", str(conf)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{conf}: OK (mode server, ")
    assert f"key fingerprint {fingerprint(KEY)})" in out
    assert KEY.hex() not in out + err


def test_check_of_a_bad_config_lists_every_error_on_stderr_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.conf"
    bad.write_text("mode server\nmtu 10\nkeepaliv 3\nlocal 198.19.0.1\nremote 198.19.0.2\n")
    assert main(["--check", "-f", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{bad}:2: mtu: mtu must be 576..65535, got 10",
        f"{bad}:3: keepaliv: unknown directive; did you mean 'keepalive'?",
    ]
    assert "Traceback" not in err


def test_check_refuses_a_readable_key_file_naming_path_and_mode(conf, tmp_path, capsys):
    (tmp_path / "l1.key").chmod(0o644)
    assert main(["--check", "-f", str(conf)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'l1.key'}: key file mode 0644" in err
    assert KEY.hex() not in err


def test_check_of_a_missing_config_exits_2(tmp_path, capsys):
    assert main(["--check", "-f", str(tmp_path / "none.conf")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_genkey_writes_a_0600_key_and_prints_only_its_fingerprint(tmp_path, randomdev, capsys):
    path = tmp_path / "new.key"
    assert main(["genkey", str(path), "--randomdev", str(randomdev)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path) == KEY
    assert fingerprint(KEY) in out
    assert KEY.hex() not in out


def test_genkey_refuses_to_overwrite_and_exits_2(tmp_path, randomdev, capsys):
    path = tmp_path / "new.key"
    path.write_text("keep me\n")
    assert main(["genkey", str(path), "--randomdev", str(randomdev)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_text() == "keep me\n"


def test_seed_spelling_m_with_a_path_makes_a_key(tmp_path, randomdev, capsys):
    path = tmp_path / "m.key"
    assert main(["-m", str(path), "--randomdev", str(randomdev)]) == 0
    assert load_key(path) == KEY


def test_seed_spelling_m_without_a_path_uses_the_configs_keyfile_and_randomdev(
    conf, tmp_path, capsys
):
    (tmp_path / "l1.key").unlink()
    assert main(["-m", "-f", str(conf)]) == 0
    assert load_key(tmp_path / "l1.key") == KEY
    assert str(tmp_path / "l1.key") in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main(["--bogus"]) == 2
    assert main(["--check", "-t"]) == 2
    assert main(["genkey"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "vpnd" in capsys.readouterr().out


def test_run_hands_the_parsed_config_to_the_daemon(conf, monkeypatch):
    calls: list[tuple[Config, bool, bool]] = []
    fake = types.ModuleType("vpnd_runtime.process")

    def run(config: Config, daemonize: bool = False, verbose: bool = False) -> int:
        calls.append((config, daemonize, verbose))
        return 0

    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vpnd_runtime.process", fake)
    monkeypatch.setattr("vpnd_runtime.process", fake, raising=False)
    assert main(["-f", str(conf), "--daemon", "-v"]) == 0
    [(config, daemonize, verbose)] = calls
    assert (config.mode, config.server_port, daemonize, verbose) == ("server", 24741, True, True)


def test_run_with_a_loose_key_fails_before_starting_the_daemon(conf, tmp_path, capsys):
    (tmp_path / "l1.key").chmod(0o640)
    assert main(["-f", str(conf)]) == 2
    assert "0640" in capsys.readouterr().err


OTHER_UID = 54321  # no such user needed: ownership is just a number to the kernel


@pytest.mark.parametrize("fault", ["mode", "missing", "owner"])
def test_run_daemon_names_a_bad_key_file_before_detaching(
    conf, tmp_path, capsys, monkeypatch, fault
):
    """`vpnd -f CONF --daemon` reads its keys once (process.run), still before it detaches: the
    error names the key file on the terminal and the exit code is 2."""
    from vpnd_runtime import process

    def detach() -> int:
        raise AssertionError("vpnd detached before reading its key file")

    monkeypatch.setattr(process, "_daemonize", detach)
    key = tmp_path / "l1.key"
    if fault == "mode":
        key.chmod(0o640)
        expected = f"{key}: key file mode 0640"
    elif fault == "missing":
        key.unlink()
        expected = f"{key}: cannot open key file"
    else:
        require(os.geteuid() == 0, "needs root to give a file to another uid")
        os.chown(key, OTHER_UID, OTHER_UID)
        expected = f"{key}: key file is owned by uid {OTHER_UID}"
    assert main(["-f", str(conf), "--daemon"]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert KEY.hex() not in err


def test_status_without_a_running_daemon_exits_1(conf, capsys):
    assert main(["status", "-f", str(conf)]) == 1
    assert "not running" in capsys.readouterr().out


def test_status_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.conf"
    bad.write_text("mode server\n")
    assert main(["status", "-f", str(bad)]) == 2
    assert f"{bad}: local: missing required directive" in capsys.readouterr().err


def test_chat_test_on_a_tcp_link_is_a_clear_error(conf, capsys):
    assert main(["-t", "-f", str(conf)]) == 2
    assert "needs a serial link with modemchat" in capsys.readouterr().err


def test_python_dash_m_vpnd_runtime_runs_the_cli(conf):
    result = subprocess.run(
        [sys.executable, "-m", "vpnd_runtime", "--check", "-f", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ": OK (mode server" in result.stdout
