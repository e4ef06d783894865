"""Lab helpers for e2e tests: a unique tag per test, a lab that is always torn down, polling."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers.wait import poll_until
from vpnctl.lab import LabState, lab_down, lab_exec, lab_up

__all__ = [
    "daemon_pids",
    "free_mgmt_net",
    "lab_exec",
    "lab_keys",
    "lab_ping",
    "lab_traces",
    "link_ends",
    "ping_every_tunnel",
    "poll_until",
    "rendered_lab",
    "route_behind_l1_server",
    "running_lab",
    "runtime_snapshot",
    "tunnel_ends",
    "unique_tag",
    "vpnctl",
]

T = TypeVar("T")


def unique_tag(base: str) -> str:
    """A lab tag (<= 8 chars) unique to this test run: `base` plus random hex."""
    return (base[:4] + os.urandom(2).hex())[:8]


def free_mgmt_net() -> str:
    """A management /24 in 198.18.100-249.x not routed in the root namespace yet."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    used = set()
    for line in routes.splitlines():
        dest = line.split()[0]
        if dest != "default":
            used.add(ipaddress.IPv4Network(dest, strict=False))
    for _ in range(200):
        third = 100 + int.from_bytes(os.urandom(1), "big") % 150
        net = ipaddress.IPv4Network(f"198.18.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free management /24 in 198.18.100.0-198.18.249.0")


@contextmanager
def running_lab(
    directory: Path,
    *,
    clients: int = 2,
    base: str = "t",
    wan: str | None = None,
    stack: str = "ipv4",
    hub: bool = False,
    systemd: bool = False,
    release: str | None = None,
    say: Callable[[str], None] | None = None,
) -> Iterator[LabState]:
    """Build a lab in `directory` with a unique tag (and `wan`, a vpnctl.wan spec, on its WAN;
    `stack`: ipv4, dual or ipv6 hosts; `hub`: one hub instead of links; `systemd`: hosts are
    containers booting systemd, of the Debian `release`s; `say`: lab up's progress); tear it
    down however the test ends."""
    tag = unique_tag(base)
    state = lab_up(
        directory,
        clients=clients,
        tag=tag,
        mgmt_net=free_mgmt_net(),
        wan=wan,
        stack=stack,
        hub=hub,
        systemd=systemd,
        release=release,
        say=say,
    )
    try:
        yield state
    finally:
        lab_down(directory)


def lab_traces(tag: str) -> list[str]:
    """Namespaces and root links carrying `tag`: what a torn-down lab must not leave behind."""
    netns = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    links = os.listdir("/sys/class/net")
    found = [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith(tag)]
    found += [f"link {name}" for name in links if name.startswith(tag)]
    return found


VPNCTL = str(Path(sys.executable).with_name("vpnctl"))
_SNAPSHOT: list[str] = []


def runtime_snapshot() -> str:
    """A copy of vpnd_runtime's sources taken once per test session, put first on PYTHONPATH.

    Deploy ships the runtime built from the sources it imports; while others edit the tree,
    two deploys a minute apart would ship different runtimes. With the snapshot every vpnctl
    run of the session ships (and the lab runs) the same runtime. Removed at exit.
    """
    if not _SNAPSHOT:
        import atexit
        import shutil

        import vpnd_runtime

        root = tempfile.mkdtemp(prefix="vpnctl-rt-")
        shutil.copytree(
            Path(vpnd_runtime.__file__).parent,
            Path(root) / "vpnd_runtime",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        atexit.register(shutil.rmtree, root, True)
        _SNAPSHOT.append(root)
    return _SNAPSHOT[0]


def vpnctl(
    state: LabState, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real `vpnctl` CLI in the lab directory (inventory, keystore, build live there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [runtime_snapshot(), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [VPNCTL, *args],
        cwd=state.directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"vpnctl {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@contextmanager
def rendered_lab(directory: Path, **options: Any) -> Iterator[LabState]:
    """A running lab (:func:`running_lab`, which takes the same `options`) whose inventory has
    been through `vpnctl keygen` and `vpnctl render`."""
    with running_lab(directory, **options) as state:
        vpnctl(state, "keygen")
        vpnctl(state, "render")
        yield state


def lab_keys(state: LabState) -> list[str]:
    """The key material of every link (hex, as in the key files): what must never leak."""
    return [
        p.read_text().strip() for p in sorted((Path(state.directory) / "keystore").glob("*.key"))
    ]


def link_ends(state: LabState) -> dict[str, tuple[str, dict, dict]]:
    """link -> (client host, the client's manifest entry of it, the server's) from the build."""
    build = Path(state.directory) / "build"
    out = {}
    for manifest_path in sorted(build.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        for link, entry in manifest["links"].items():
            if entry["role"] == "client":
                peer = json.loads((build / entry["peer"] / "manifest.json").read_text())
                out[link] = (manifest["host"], entry, peer["links"][link])
    return out


def tunnel_ends(state: LabState) -> dict[str, tuple[str, str, str]]:
    """link -> (client host, client tunnel address, server tunnel address) from the build."""
    return {
        link: (client, mine["local"], server["local"])
        for link, (client, mine, server) in link_ends(state).items()
    }


def lab_ping(state: LabState, host: str, address: str, *, count: int = 2, what: str = "") -> None:
    """Ping `address` from lab host `host` (`count` pings, none lost); a failure names both,
    after `what` (say the link)."""
    out = lab_exec(state, host, "ping", "-c", str(count), "-i", "0.2", "-W", "3", address)
    assert " 0% packet loss" in out, f"{what}ping {address} from {host}: {out}"


def ping_every_tunnel(state: LabState) -> None:
    """Ping each link's server end through the tunnel from its client host (two pings, no
    loss), naming the link when one fails."""
    for link, (client, _local, server_tunnel) in tunnel_ends(state).items():
        lab_ping(state, client, server_tunnel, what=f"{link}: ")


def route_behind_l1_server(state: LabState) -> None:
    """Give link l1 a network behind its server (198.18.60.0/24) in the lab's inventory and
    render: only client1's l1 config changes (it gains the route)."""
    inventory = Path(state.directory) / "inventory.yaml"
    original = inventory.read_text()
    changed = original.replace(
        "  server: server\n  client: client1\n",
        "  server: server\n  client: client1\n  routes:\n    server:\n    - 198.18.60.0/24\n",
    )
    assert changed != original
    inventory.write_text(changed)
    vpnctl(state, "render")


def daemon_pids(state: LabState) -> dict[tuple[str, str], int]:
    """(host, link) -> pid from every pidfile under the lab's host prefixes."""
    pids = {}
    for host in state.hosts:
        for pidfile in Path(host.prefix, "run", "vpnd").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids[(host.name, pidfile.stem)] = int(pidfile.read_text().strip())
    return pids
