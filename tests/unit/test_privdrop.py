"""Least privilege: the `user`/`group` directives and the drop itself (vpnd_runtime/privdrop.py).

The drop is exercised for real, in a child process started as root: its /proc/self/status shows
the ids, the capability sets and no_new_privs afterwards. The whole daemon under a drop (TUN,
routes, ping) is tests/e2e/test_least_privilege.py.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_tools
from tests.helpers.tundev import with_tun_mode
from vpnd_runtime import privdrop
from vpnd_runtime.cli import main
from vpnd_runtime.config import ConfigError, parse_config
from vpnd_runtime.keyfile import generate_key

BASE = "mode server\nserver 0 24741\nlocal 198.19.0.1\nremote 198.19.0.2\n"
NOBODY = 65534
KEEP_MASK = (1 << 12) | (1 << 10)  # CAP_NET_ADMIN, CAP_NET_BIND_SERVICE


def _errors(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.conf")
    return str(info.value)


# ---- directives -------------------------------------------------------------------------------


def test_user_and_group_directives_set_their_fields_and_round_trip():
    config = parse_config(BASE + "user vpnd\ngroup vpnd\n", "t.conf")
    assert (config.user, config.group) == ("vpnd", "vpnd")
    assert parse_config(config.to_text(), "t.conf") == config
    numeric = parse_config(BASE + "user 998\ngroup 997\n", "t.conf")
    assert (numeric.user, numeric.group) == ("998", "997")


def test_user_and_group_default_to_none_meaning_no_drop():
    config = parse_config(BASE, "t.conf")
    assert (config.user, config.group) == (None, None)


@pytest.mark.parametrize("name", ["root", "0"])
def test_user_root_is_refused_with_a_hint(name: str):
    assert f"t.conf:5: user: {name!r} is root" in _errors(BASE + f"user {name}\n")


def test_group_root_is_refused():
    assert "t.conf:6: group: 'root' is root's group" in _errors(BASE + "user vpnd\ngroup root\n")


def test_group_without_user_is_refused_on_its_line():
    assert "t.conf:5: group: needs a 'user'" in _errors(BASE + "group vpnd\n")


@pytest.mark.parametrize("name", ["-x", "a b", "x:y", "a/b", "é", "a" * 33])
def test_a_malformed_account_name_is_refused(name: str):
    if " " in name:
        assert "wrong number of arguments" in _errors(BASE + f"user {name}\n")
    else:
        assert "t.conf:5: user: must be an account name or a numeric id" in _errors(
            BASE + f"user {name}\n"
        )


# ---- the drop, in a child process -------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    from vpnd_runtime.config import parse_config
    from vpnd_runtime import privdrop
    config = parse_config(sys.argv[1], "t.conf")
    if len(sys.argv) > 2 and sys.argv[2] == "thread":
        import threading, time
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    try:
        ident = privdrop.prepare(config)
        privdrop.drop(config, ident)
    except privdrop.PrivDropError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(json.dumps({k: v.strip() for k, v in status.items()}))
    """
)


def _child(
    config_text: str, *wrapper: str, tun_mode: int = 0o666, extra: tuple[str, ...] = ()
) -> dict[str, str]:
    """Run CHILD as root (or under `wrapper`), seeing a /dev/net/tun of `tun_mode`."""
    require_tools("unshare", "mknod")
    proc = subprocess.run(
        with_tun_mode(tun_mode, *wrapper, sys.executable, "-c", CHILD, config_text, *extra),
        capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _nogroup() -> str:
    return grp.getgrgid(NOBODY).gr_name


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's open_dir sits below a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="vpnd-privdrop-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _statusdir(directory: Path) -> str:
    return f"statusfile {directory}/run/l.status.json\n"


def test_as_root_the_drop_leaves_the_user_with_net_admin_and_bind_service_only(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    status = _child(BASE + f"user nobody\ngroup {_nogroup()}\n" + _statusdir(open_dir))
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["Groups"].split() == [str(NOBODY)]  # the account's own groups (initgroups)
    for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == KEEP_MASK, field
    assert status["NoNewPrivs"] == "1"
    # the status directory did not exist: it was created for the user
    assert os.stat(open_dir / "run").st_uid == NOBODY


def test_an_unknown_user_is_refused_naming_it(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    result = _child(BASE + "user vpnd-no-such-user\n" + _statusdir(open_dir))
    assert result["error"] == "t.conf: user: no such user 'vpnd-no-such-user'"


def test_a_status_directory_the_user_cannot_write_is_refused_naming_it(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    (open_dir / "run").mkdir(mode=0o755)  # exists, owned by root
    result = _child(BASE + "user nobody\n" + _statusdir(open_dir))
    assert result["error"].startswith(
        f"t.conf: statusfile: user nobody cannot write the status directory {open_dir}/run "
        "(owner uid 0, mode 0755)"
    )


def test_a_user_who_cannot_open_the_tun_device_is_refused_naming_it(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    result = _child(BASE + "user nobody\n" + _statusdir(open_dir), tun_mode=0o600)
    assert result["error"].startswith(
        "t.conf: user: user nobody cannot open /dev/net/tun (Permission denied; owner uid 0, "
        "mode 0600): vpnd creates the TUN at every link up."
    )


def test_started_as_the_user_with_extra_capabilities_vpnd_narrows_them(open_dir: Path):
    # systemd's User= + AmbientCapabilities= start vpnd as the user already; it keeps only its two
    require(os.geteuid() == 0, "needs root")
    require_tools("setpriv")
    caps = "+net_admin,+net_bind_service,+sys_admin,+dac_override"
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               f"--inh-caps={caps}", f"--ambient-caps={caps}"]  # fmt: skip
    (open_dir / "run").mkdir()
    os.chown(open_dir / "run", NOBODY, NOBODY)
    status = _child(BASE + "user nobody\n" + _statusdir(open_dir), *setpriv)
    assert status["Uid"].split() == [str(NOBODY)] * 4
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(status[field], 16) == KEEP_MASK, field
    assert status["NoNewPrivs"] == "1"


def test_started_as_another_non_root_user_the_drop_is_refused(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    require_tools("setpriv")
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = _child(BASE + "user daemon\n" + _statusdir(open_dir), *setpriv)
    assert result["error"].startswith(f"t.conf: user: vpnd runs as uid {NOBODY}")


def test_a_drop_with_a_second_thread_running_is_refused(open_dir: Path):
    # capset and prctl act on the calling thread only: another thread would keep root's rights
    require(os.geteuid() == 0, "needs root")
    result = _child(BASE + "user nobody\n" + _statusdir(open_dir), extra=("thread",))
    assert result["error"] == "t.conf: user: cannot drop privileges once threads run (a bug)"


def test_started_as_the_user_without_net_admin_is_refused_with_the_unit_hint(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    require_tools("setpriv")
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = _child(BASE + "user nobody\n" + _statusdir(open_dir), *setpriv)
    assert result["error"].startswith("t.conf: user: started as this user without CAP_NET_ADMIN")
    assert "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in result["error"]


def test_a_serial_device_the_user_cannot_open_is_refused_naming_it(open_dir: Path):
    require(os.geteuid() == 0, "needs root")
    device = open_dir / "ttyFAKE"
    device.write_text("")
    device.chmod(0o600)  # root's only, like /dev/ttyS0 for a user outside dialout
    serial = f"mode client\nserver {device}\nlocal 198.19.0.1\nremote 198.19.0.2\n"
    result = _child(serial + "user nobody\n" + _statusdir(open_dir))
    assert result["error"].startswith(
        f"t.conf: server: user nobody cannot open the serial device {device} (owner uid 0, "
        "mode 0600): add nobody to the device's group"
    )


def test_verify_refuses_a_process_that_still_holds_root_s_rights():
    # the read-back of /proc/self/status is the last word: here (not dropped) it must object
    require(os.geteuid() == 0, "needs root")
    config = parse_config(BASE + "user nobody\n", "t.conf")
    with pytest.raises(privdrop.PrivDropError) as info:
        privdrop._verify(config, privdrop.Identity("nobody", NOBODY, NOBODY), bounding_reduced=True)
    message = str(info.value)
    assert message.startswith("t.conf: user: privileges not dropped as asked: Uid 0")
    for field in ("Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs"):
        assert field in message


def test_root_reached_by_another_spelling_is_refused_at_resolution():
    # `user 00` passes the parser's `root`/`0` check but is uid 0 all the same
    with pytest.raises(privdrop.PrivDropError, match=r"t.conf: user: '00' is uid 0 \(root\)"):
        privdrop.resolve(parse_config(BASE + "user 00\n", "t.conf"))
    with pytest.raises(privdrop.PrivDropError, match=r"t.conf: group: .* is gid 0"):
        privdrop.resolve(parse_config(BASE + "user nobody\ngroup 00\n", "t.conf"))


def test_check_names_an_unknown_user_before_anything_starts(open_dir: Path, capsys):
    generate_key(open_dir / "k.key", randomdev="/dev/urandom")
    conf = open_dir / "l.conf"
    conf.write_text(BASE + f"keyfile {open_dir}/k.key\nuser vpnd-no-such-user\n")
    assert main(["--check", "-f", str(conf)]) == 2
    assert f"{conf}: user: no such user 'vpnd-no-such-user'" in capsys.readouterr().err
