"""Files that run with the daemon's rights (config, hooks, modemchat) must be writable only by
their owner, and owned by root or the user vpnd runs as: otherwise refused, naming path and mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.conftest import require
from vpnd_runtime.config import ConfigError, load_config
from vpnd_runtime.io.chat import ChatScriptError, load_chat_script
from vpnd_runtime.io.hooks import HookRun, run_hook
from vpnd_runtime.trusted import UntrustedFileError, check_trusted

BASE = "mode server\nserver 0 24741\nlocal 198.19.0.1\nremote 198.19.0.2\n"
SERIAL = "mode client\nserver /dev/ttyS0\nlocal 198.19.0.1\nremote 198.19.0.2\n"
NOBODY = 65534


def _file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("mode", "who"), [(0o664, "group"), (0o646, "others")])
def test_a_group_or_other_writable_config_is_refused_naming_path_and_mode(
    tmp_path: Path, mode: int, who: str
):
    conf = _file(tmp_path / "l.conf", BASE, mode)
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert str(info.value) == (
        f"{conf}: config file is writable by {who} (mode {mode:04o}); run chmod go-w {conf}"
    )


def test_a_config_owned_by_another_user_is_refused_naming_the_owner(tmp_path: Path):
    require(os.geteuid() == 0, "needs root to chown")
    conf = _file(tmp_path / "l.conf", BASE, 0o644)
    os.chown(conf, NOBODY, -1)
    with pytest.raises(ConfigError, match=f"{conf}: config file is owned by uid {NOBODY}"):
        load_config(conf)


def test_a_0644_config_owned_by_root_or_this_user_is_accepted(tmp_path: Path):
    conf = _file(tmp_path / "l.conf", BASE, 0o644)
    assert load_config(conf).mode == "server"


def test_a_group_writable_hook_is_refused_by_load_config_at_its_line(tmp_path: Path):
    hook = _file(tmp_path / "up.sh", "#!/bin/sh\n", 0o775)
    conf = _file(tmp_path / "l.conf", BASE + f"linkup {hook}\n", 0o600)
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert (info.value.line, info.value.directive) == (5, "linkup")
    assert f"linkup script is writable by group (mode 0775); run chmod go-w {hook}" in str(
        info.value
    )


def test_a_group_writable_modemchat_is_refused_by_load_config_at_its_line(tmp_path: Path):
    chat = _file(tmp_path / "m.chat", "", 0o666)
    conf = _file(tmp_path / "l.conf", SERIAL + f"modemchat {chat}\n", 0o600)
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert (info.value.line, info.value.directive) == (5, "modemchat")
    assert "modemchat file is writable by group and others (mode 0666)" in str(info.value)


def test_a_hook_made_writable_after_start_is_not_run(tmp_path: Path, caplog):
    marker = tmp_path / "ran"
    hook = _file(tmp_path / "up.sh", f"#!/bin/sh\ntouch {marker}\n", 0o777)
    with caplog.at_level(logging.ERROR, logger="vpnd.hooks"):
        assert run_hook(HookRun("linkup", str(hook), (), ()), timeout=10) is None
    assert not marker.exists()
    assert "linkup script is writable by group and others (mode 0777)" in caplog.text
    assert str(hook) in caplog.text


def test_a_hook_owned_by_another_user_is_not_run(tmp_path: Path, caplog):
    require(os.geteuid() == 0, "needs root to chown")
    marker = tmp_path / "ran"
    hook = _file(tmp_path / "up.sh", f"#!/bin/sh\ntouch {marker}\n", 0o755)
    os.chown(hook, NOBODY, -1)
    with caplog.at_level(logging.ERROR, logger="vpnd.hooks"):
        assert run_hook(HookRun("linkdown", str(hook), (), ()), timeout=10) is None
    assert not marker.exists()
    assert f"owned by uid {NOBODY}" in caplog.text


def test_a_trusted_hook_still_runs(tmp_path: Path):
    hook = _file(tmp_path / "up.sh", "#!/bin/sh\nexit 0\n", 0o755)
    assert run_hook(HookRun("linkup", str(hook), (), ()), timeout=10) == 0


def test_a_writable_modemchat_is_refused_when_loaded_for_the_line(tmp_path: Path):
    chat = _file(tmp_path / "m.chat", "", 0o620)
    with pytest.raises(ChatScriptError, match=r"modemchat file is writable by group \(mode 0620\)"):
        load_chat_script(str(chat))


def test_check_trusted_names_the_path(tmp_path: Path):
    path = _file(tmp_path / "x", "", 0o602)
    with pytest.raises(UntrustedFileError) as info:
        check_trusted(str(path), "thing")
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: thing is writable by others (mode 0602)")
