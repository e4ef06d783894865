"""Real test hosts: network namespaces joined by veth, and vpnd processes running inside them.

Every name carries the test's own tag, every object is removed on exit even when the test
fails, and processes are ended by their PID only. Addresses come from 198.18.0.0/15.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.wait import poll_until

__all__ = ["poll_until"]  # re-exported: tests import it from here

_counter = itertools.count()


def new_tag(prefix: str = "vt") -> str:
    """A short tag unique to this process and call (interface names must stay ≤ 15 chars)."""
    return f"{prefix}{os.getpid() % 10000}x{next(_counter)}"


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr when it fails and `check`."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    """One namespace (a test host)."""

    name: str

    def cmd(self, *argv: str) -> list[str]:
        """argv that runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30):
        """Run a command inside the namespace."""
        return run(*self.cmd(*argv), check=check, timeout=timeout)

    def ping(self, address: str, count: int = 1, timeout: float = 2) -> bool:
        """True when `count` pings to `address` from here are all answered."""
        proc = self.run(
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-i",
            "0.2",
            "-W",
            str(int(timeout)),
            address,
            check=False,
            timeout=timeout * count + 5,
        )
        return proc.returncode == 0

    def link_exists(self, ifname: str) -> bool:
        """True when the interface exists in this namespace."""
        return self.run("ip", "link", "show", ifname, check=False).returncode == 0

    def routes(self) -> str:
        """The IPv4 routing table as `ip route` prints it."""
        return self.run("ip", "-4", "route").stdout


@dataclass
class Pair:
    """Two hosts on a veth 'WAN': server 198.18.1.1/24, client 198.18.1.2/24."""

    tag: str
    server: Netns
    client: Netns
    server_if: str
    client_if: str
    server_ip: str = "198.18.1.1"
    client_ip: str = "198.18.1.2"
    extra: list[str] = field(default_factory=list)

    def cut(self) -> None:
        """Cut the underlay silently: both veth ends down (no RST, no FIN gets through)."""
        self.server.run("ip", "link", "set", self.server_if, "down")
        self.client.run("ip", "link", "set", self.client_if, "down")

    def restore(self) -> None:
        """Bring the underlay back."""
        self.server.run("ip", "link", "set", self.server_if, "up")
        self.client.run("ip", "link", "set", self.client_if, "up")


@contextmanager
def namespace_pair(tag: str | None = None) -> Iterator[Pair]:
    """Create two namespaces joined by veth; remove both (and so their links) on exit."""
    tag = tag or new_tag()
    server, client = Netns(f"{tag}-s"), Netns(f"{tag}-c")
    sif, cif = f"{tag}s", f"{tag}c"
    created: list[Netns] = []
    try:
        for ns in (server, client):
            run("ip", "netns", "add", ns.name)
            created.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
        run(
            "ip",
            "link",
            "add",
            sif,
            "netns",
            server.name,
            "type",
            "veth",
            "peer",
            "name",
            cif,
            "netns",
            client.name,
        )
        server.run("ip", "addr", "add", "198.18.1.1/24", "dev", sif)
        client.run("ip", "addr", "add", "198.18.1.2/24", "dev", cif)
        server.run("ip", "link", "set", sif, "up")
        client.run("ip", "link", "set", cif, "up")
        yield Pair(tag, server, client, sif, cif)
    finally:
        for ns in created:
            run("ip", "netns", "del", ns.name, check=False)


@dataclass
class VpndProcess:
    """A vpnd started by a test inside a namespace; ended by PID only."""

    ns: Netns
    conf: Path
    logfile: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def status(self) -> dict:
        """The daemon's status record, through `vpnd status --json`."""
        proc = self.ns.run(
            sys.executable,
            "-m",
            "vpnd_runtime",
            "status",
            "-f",
            str(self.conf),
            "--json",
            check=False,
        )
        return json.loads(proc.stdout)

    def state(self) -> str:
        """The link state from the status record."""
        return str(self.status().get("state"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the daemon and wait for it to exit; SIGKILL if it does not in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def vpnd(ns: Netns, conf: Path, logdir: Path, name: str, *args: str) -> Iterator[VpndProcess]:
    """Start `vpnd -f conf` in `ns` (foreground, logging to a file); stop it on exit."""
    logfile = logdir / f"{name}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            ns.cmd(sys.executable, "-m", "vpnd_runtime", "-f", str(conf), *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    p = VpndProcess(ns, conf, logfile, proc)
    try:
        yield p
    finally:
        p.stop()


@dataclass
class Star:
    """A hub host and client hosts, each client on its own veth to the hub.

    Client i (from 0) is 198.18.(20+i).2/24 and reaches the hub at 198.18.(20+i).1.
    """

    tag: str
    hub: Netns
    clients: list[Netns]

    @staticmethod
    def hub_ip(i: int) -> str:
        return f"198.18.{20 + i}.1"

    @staticmethod
    def client_ip(i: int) -> str:
        return f"198.18.{20 + i}.2"


@contextmanager
def namespace_star(n: int, tag: str | None = None) -> Iterator[Star]:
    """A hub namespace and `n` client namespaces (each on a veth of its own); all removed on
    exit. The hub forwards IPv4 (so clients can reach each other through it)."""
    tag = tag or new_tag()
    hub = Netns(f"{tag}-h")
    clients = [Netns(f"{tag}-c{i}") for i in range(n)]
    created: list[Netns] = []
    try:
        for ns in (hub, *clients):
            run("ip", "netns", "add", ns.name)
            created.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
        hub.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for i, ns in enumerate(clients):
            hif, cif = f"{tag}h{i}", f"{tag}c{i}"
            run("ip", "link", "add", hif, "netns", hub.name, "type", "veth",
                "peer", "name", cif, "netns", ns.name)  # fmt: skip
            hub.run("ip", "addr", "add", f"{Star.hub_ip(i)}/24", "dev", hif)
            ns.run("ip", "addr", "add", f"{Star.client_ip(i)}/24", "dev", cif)
            hub.run("ip", "link", "set", hif, "up")
            ns.run("ip", "link", "set", cif, "up")
        yield Star(tag, hub, clients)
    finally:
        for ns in created:
            run("ip", "netns", "del", ns.name, check=False)
