"""vpnd with `user`/`group`: started as root, it serves the link as an unprivileged account.

Two namespaces joined by veth, as in test_tunnel_tcp.py. Both ends run `user nobody` (uid 65534,
an account every system has: no user is created). The server listens on port 379, which needs
CAP_NET_BIND_SERVICE after the drop; the TUN, its addresses and route1 need CAP_NET_ADMIN at every
link up, so the link is brought down and up again. The kernel's own account of each daemon,
/proc/<pid>/status, must show the user's ids, exactly those two capabilities (effective,
permitted, bounding), and no_new_privs; the hooks must run with the same rights.

Containers often have a 0600 /dev/net/tun (no udev); each daemon runs in a private mount
namespace with a 0666 node for the real TUN driver, as udev's default rule gives ordinary hosts
(tests/helpers/tundev.py).
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Netns, VpndProcess, namespace_pair, new_tag, poll_until
from tests.helpers.tundev import with_tun_mode
from vpnctl.inventory import allocate_tunnels, parse_inventory
from vpnctl.rendering import render
from vpnd_runtime.keyfile import fingerprint, generate_key, load_key

pytestmark = pytest.mark.root

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
KEEP_MASK = (1 << 12) | (1 << 10)  # CAP_NET_ADMIN, CAP_NET_BIND_SERVICE
SERVER_TUN, CLIENT_TUN = "198.19.0.1", "198.19.0.2"
BEHIND_SERVER = "198.18.100.1"


@contextmanager
def _vpnd_as_user(
    ns: Netns,
    conf: Path,
    logdir: Path,
    name: str,
    *wrapper: str,
    read_only_except: str | None = None,
    mdwe: bool = False,
) -> Iterator[VpndProcess]:
    """Start `vpnd -f conf` in `ns` as root (it drops itself) or under `wrapper`, seeing a 0666
    /dev/net/tun. ip netns exec, unshare, sh and setpriv all exec: the PID is the daemon's."""
    logfile = logdir / f"{name}.log"
    vpnd = (sys.executable, "-m", "vpnd_runtime", "-f", str(conf))
    if mdwe:
        vpnd = (sys.executable, "-c", MDWE_RUN, "vpnd_runtime", "-f", str(conf))
    argv = with_tun_mode(0o666, *wrapper, *vpnd, read_only_except=read_only_except)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(ns.cmd(*argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
    daemon = VpndProcess(ns, conf, logfile, proc)
    try:
        yield daemon
    finally:
        daemon.stop()


#: Set PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN), then run `python -m <argv[1]> <argv[2:]>` in the
#: same process: what systemd's MemoryDenyWriteExecute=yes asks of the kernel (no mapping may
#: become writable and executable). In-process, since the user may not exec this test's Python
#: (its real path may lie below a 0700 /root).
MDWE_RUN = (
    "import ctypes, os, runpy, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'PR_SET_MDWE: {os.strerror(ctypes.get_errno())}')\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def _rendered_unit() -> bytes:
    """The unit vpnctl renders for a server side on a host with prefix /."""
    text = (
        "version: 1\nhosts:\n  - {name: a, address: 198.18.1.1}\n"
        "  - {name: b, address: 198.18.1.2}\nlinks:\n  - {name: ab, server: a, client: b}\n"
    )
    inventory, _ = allocate_tunnels(parse_inventory(text, "inv.yaml"), {}, "record")
    files = render(inventory, {"ab": "0000:0000:0000:0000"})
    return files["a/systemd/vpnd-ab.service"]


def _mountinfo(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as fh:
        return fh.read().splitlines()


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in fh if ":" in line)}


@pytest.fixture
def site() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path sits below a 0700 one)."""
    require_root_netns()
    require_tools("ping", "unshare", "mknod")
    path = Path(tempfile.mkdtemp(prefix=f"{new_tag('lp')}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _conf(site: Path, tag: str, role: str, server_ip: str) -> Path:
    run = site / f"{role}-run"  # does not exist yet: vpnd creates it for the user
    common = (
        f"interface {tag}t\nkeyfile {site}/shared.key\nrandomdev /dev/urandom\n"
        f"pidfile {run}/vpnd.pid\nstatusfile {run}/vpnd.status.json\n"
        f"user nobody\ngroup {grp.getgrgid(NOBODY).gr_name}\n"
        f"keepalive 1\nnoanswer 3\n"
        + "".join(f"{hook} {site}/hook.sh\n" for hook in ("slipup", "linkup", "linkdown"))
    )
    if role == "server":
        body = f"mode server\nserver 0 379\nlocal {SERVER_TUN}\nremote {CLIENT_TUN}\n"
    else:
        body = (
            f"mode client\nserver {server_ip} 379\nlocal {CLIENT_TUN}\nremote {SERVER_TUN}\n"
            f"route1 198.18.100.0 255.255.255.0 {SERVER_TUN}\n"
        )
    path = site / f"{role}.conf"
    path.write_text(body + common)
    return path


def test_with_user_vpnd_runs_as_it_with_net_admin_and_bind_service_only_and_links_up_twice(
    site: Path,
) -> None:
    tag = new_tag("lp")
    generate_key(site / "shared.key", randomdev="/dev/urandom")  # root's, 0600: read before drop
    hook = site / "hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        'echo "$VPND_MODE $VPND_EVENT uid=$(id -u)'
        " $(grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -s '\\t\\n' '  ')\""
        ' >> "$(dirname "$VPND_CONFIG")/$VPND_MODE-run/hooks.txt"\n'
    )
    hook.chmod(0o755)
    with namespace_pair(tag) as pair:
        pair.server.run("ip", "addr", "add", f"{BEHIND_SERVER}/24", "dev", "lo")
        s_conf = _conf(site, tag, "server", pair.server_ip)
        c_conf = _conf(site, tag, "client", pair.server_ip)
        with ExitStack() as running:
            # Given a server started as root with `user nobody`, listening on port 379
            server = running.enter_context(_vpnd_as_user(pair.server, s_conf, site, "server"))
            poll_until(lambda: server.state() == "listening", 20, what="server listening")
            # When the client (also `user nobody`) connects, the link comes up
            client = running.enter_context(_vpnd_as_user(pair.client, c_conf, site, "client"))
            poll_until(lambda: client.state() == "up", 20, what="link up")
            # Then both daemons run as nobody with exactly the two capabilities, no way back
            for daemon in (server, client):
                status = _proc_status(daemon.pid)
                assert status["Uid"].split() == [str(NOBODY)] * 4, daemon.log()
                assert status["Gid"].split() == [str(NOBODY)] * 4
                for field in ("CapEff", "CapPrm", "CapBnd"):
                    assert int(status[field], 16) == KEEP_MASK, (field, status[field])
                assert status["NoNewPrivs"] == "1"
                assert "running as nobody (uid 65534" in daemon.log()
            # And the TUN, its addresses and route1 were set up by the unprivileged daemon
            assert "198.18.100.0/24 via 198.19.0.1" in pair.client.routes()
            assert pair.client.ping(SERVER_TUN, count=3)
            assert pair.server.ping(CLIENT_TUN)
            assert pair.client.ping(BEHIND_SERVER)
            # And the hooks ran as nobody with the same two capabilities and no_new_privs
            rights = "uid=65534 CapEff: 0000000000001400 CapBnd: 0000000000001400 NoNewPrivs: 1 "
            calls = (site / "client-run" / "hooks.txt").read_text().splitlines()
            assert calls[:2] == [f"client slipup {rights}", f"client linkup {rights}"]

            # When the server restarts, the client's link goes down (its TUN is deleted)...
            assert server.stop() == 0
            poll_until(lambda: client.state() != "up", 20, what="client sees the link down")
            assert not pair.client.link_exists(f"{tag}t")
            server2 = running.enter_context(_vpnd_as_user(pair.server, s_conf, site, "server2"))
            # ... and comes up again: the TUN and route1 are created anew by the same process
            poll_until(lambda: client.state() == "up", 30, what="link up again")
            assert client.status()["links_up"] == 2
            assert pair.client.ping(SERVER_TUN, count=2)
            assert pair.client.ping(BEHIND_SERVER)
            assert _proc_status(server2.pid)["Uid"].split()[0] == str(NOBODY)
            # And on a clean stop the user removes its own pidfile and status file
            assert client.stop() == 0
            assert not (site / "client-run" / "vpnd.pid").exists()
            assert not (site / "client-run" / "vpnd.status.json").exists()


def test_started_as_the_user_like_the_systemd_unit_does_the_link_still_comes_up(site: Path) -> None:
    # The rendered unit starts vpnd as the user already: User=, AmbientCapabilities= and
    # CapabilityBoundingSet= the two, NoNewPrivileges=yes, RuntimeDirectory= owned by the user,
    # and deploy hands the key to the user. There is no systemd here, so: setpriv gives the same
    # start; the rendered unit's own SystemCallFilter=/RestrictAddressFamilies= become a seccomp
    # filter (tests/helpers/unit_seccomp.py); a root file system read-only but for the run
    # directory stands for ProtectSystem=strict; PR_SET_MDWE for MemoryDenyWriteExecute=yes.
    # Not reproduced: DeviceAllow= and the other namespaces (Private*, Protect{Home,Kernel*}).
    require_tools("systemd-analyze")
    unit = site / "vpnd-ab.service"
    unit.write_bytes(_rendered_unit())
    require_tools("setpriv")
    tag = new_tag("lp")
    generate_key(site / "shared.key", randomdev="/dev/urandom")  # the client's: root's
    (site / "server.key").write_bytes((site / "shared.key").read_bytes())
    (site / "server.key").chmod(0o600)
    os.chown(site / "server.key", NOBODY, NOBODY)  # the server's: the user's, as deploy does
    (site / "hook.sh").write_text("#!/bin/sh\n")
    (site / "hook.sh").chmod(0o755)
    for role in ("server", "client"):
        (site / f"{role}-run").mkdir()
        os.chown(site / f"{role}-run", NOBODY, NOBODY)
    caps = "+net_admin,+net_bind_service"
    seccomp = [sys.executable, "-m", "tests.helpers.unit_seccomp", str(unit), "--"]
    as_unit = [*seccomp, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--init-groups",
               f"--inh-caps={caps}", f"--ambient-caps={caps}",
               f"--bounding-set=-all,{caps}", "--no-new-privs"]  # fmt: skip
    with namespace_pair(tag) as pair, ExitStack() as running:
        pair.server.run("ip", "addr", "add", f"{BEHIND_SERVER}/24", "dev", "lo")
        s_conf = _conf(site, tag, "server", pair.server_ip)
        s_conf.write_text(s_conf.read_text().replace("shared.key", "server.key"))
        c_conf = _conf(site, tag, "client", pair.server_ip)
        # Given a server started the unit's way, and a client started as root that drops
        sandboxed = _vpnd_as_user(pair.server, s_conf, site, "server", *as_unit,
                                  read_only_except=str(site / "server-run"), mdwe=True)  # fmt: skip
        server = running.enter_context(sandboxed)
        poll_until(lambda: server.state() == "listening", 20, what="server listening")
        client = running.enter_context(_vpnd_as_user(pair.client, c_conf, site, "client"))
        # When they connect, the link comes up and pings cross
        poll_until(lambda: client.state() == "up" and server.state() == "up", 20, what="link up")
        assert pair.server.ping(CLIENT_TUN, count=2)
        # And the server kept exactly the two capabilities, bounded, with no_new_privs
        status = _proc_status(server.pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(status[field], 16) == KEEP_MASK, (field, status[field])
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # the unit's syscall filter was in force
        # And it ran on a read-only root file system (MDWE: MDWE_RUN exits when refused)
        root = next(line.split() for line in _mountinfo(server.pid) if line.split()[4] == "/")
        assert "ro" in root[5].split(","), root


def test_a_daemon_that_dropped_to_its_user_reads_a_rotated_key_on_sighup(site: Path) -> None:
    # Given both ends started as root with `user nobody`, their keys owned by nobody (as deploy
    # hands them over), the link up
    tag = new_tag("lp")
    old, new = site / "shared.key", site / "next.key"
    for key in (old, new):
        generate_key(key, randomdev="/dev/urandom")
        os.chown(key, NOBODY, NOBODY)
    fp_old, fp_new = fingerprint(load_key(old, NOBODY)), fingerprint(load_key(new, NOBODY))
    (site / "hook.sh").write_text("#!/bin/sh\n")
    (site / "hook.sh").chmod(0o755)
    with namespace_pair(tag) as pair:
        s_conf = _conf(site, tag, "server", pair.server_ip)
        c_conf = _conf(site, tag, "client", pair.server_ip)
        with ExitStack() as running:
            server = running.enter_context(_vpnd_as_user(pair.server, s_conf, site, "server"))
            poll_until(lambda: server.state() == "listening", 20, what="server listening")
            client = running.enter_context(_vpnd_as_user(pair.client, c_conf, site, "client"))
            poll_until(lambda: client.state() == "up", 20, what="link up")
            assert _proc_status(server.pid)["Uid"].split()[0] == str(NOBODY)
            # When the server, now running as nobody, is told by SIGHUP to also accept a next key
            s_conf.write_text(s_conf.read_text() + f"nextkey {new}\n")
            os.kill(server.pid, signal.SIGHUP)
            # Then it reads the key as its user, and the link stays up
            poll_until(
                lambda: server.status().get("next_key_fingerprint") == fp_new,
                20,
                what="server accepts the next key",
            )
            # And when the client switches to the new key, its new session uses it
            text = c_conf.read_text().replace(f"keyfile {old}", f"keyfile {new}")
            c_conf.write_text(text + f"nextkey {old}\n")
            os.kill(client.pid, signal.SIGHUP)
            poll_until(
                lambda: client.status().get("session_key_fingerprint") == fp_new,
                20,
                what="client session on the new key",
            )
            assert client.status()["links_up"] == 1  # make before break: never down
            assert fp_old != fp_new
            assert "not reloaded" not in server.log() + client.log()
            assert pair.client.ping(SERVER_TUN, count=2)
