"""Two namespaces with the WAN emulator (vpnctl.wan) between them, for tests and benchmarks.

    A (198.18.1.2/24, wan0) --veth-- R [a0 ==emulator== b0] --veth-- B (198.18.1.1/24, wan0)

``up`` is A -> B, ``down`` is B -> A. R is a router namespace holding only the emulator's legs,
so the two hosts see one another on one L2 segment, exactly as without it (ARP included). Every
name carries the test's tag; the emulator is stopped by PID and the namespaces removed on exit.
A :class:`WanPair` is a :class:`tests.helpers.netns.Pair` (B the server, A the client, both ends
``wan0``), so a test written for ``namespace_pair()`` runs over the emulated WAN unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netns import Netns, Pair, new_tag, poll_until, run
from vpnctl.wan import WanProcess, WanSpec, running_wan

PROBE = str(Path(__file__).with_name("udp_probe.py"))


@dataclass
class WanPair(Pair):
    """Two hosts joined through the emulator; `a` (the client) sends up, `b` (the server) down."""

    router: Netns | None = None
    wan: WanProcess | None = None

    @property
    def a(self) -> Netns:
        return self.client

    @property
    def b(self) -> Netns:
        return self.server

    @property
    def a_ip(self) -> str:
        return self.client_ip

    @property
    def b_ip(self) -> str:
        return self.server_ip

    def stats(self) -> dict:
        """The emulator's live counters (see vpnctl.wan.Forwarder.stats)."""
        assert self.wan is not None
        return self.wan.stats()

    def resolve(self) -> None:
        """Have A know B's MAC address (a ping answered), so no datagram waits for ARP."""
        poll_until(
            lambda: (
                self.a.run("ping", "-n", "-c", "1", "-W", "1", self.b_ip, check=False).returncode
                == 0
            ),
            20,
            f"a ping from A to {self.b_ip} through the emulator",
        )

    def udp(
        self,
        count: int,
        *,
        size: int = 200,
        interval: float = 0.0,
        idle: float = 1.0,
        gso: int = 1,
    ) -> dict:
        """Send `count` numbered UDP datagrams A -> B through the emulator (up), `gso` per
        UDP GSO super-packet; return what B's receiver saw: ``seqs`` in arrival order, ``times``
        (kernel stamps) since the first, ``bytes``."""
        self.resolve()
        total = count * interval + 30
        recv = subprocess.Popen(
            self.b.cmd(sys.executable, PROBE, "recv", self.b_ip, "9000", str(idle), str(total)),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert recv.stdout is not None
            assert recv.stdout.readline().strip() == "ready"
            self.a.run(sys.executable, PROBE, "send", self.b_ip, "9000", str(count), str(size),
                       str(interval), str(gso), timeout=total)  # fmt: skip
            out, _ = recv.communicate(timeout=total + idle + 10)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait(5)
        return json.loads(out)

    def ping_times(self, count: int, interval: float = 0.05) -> list[float]:
        """RTTs in ms of `count` pings A -> B (after one unmeasured ping that resolves ARP)."""
        self.a.run("ping", "-n", "-c", "1", "-W", "2", self.b_ip, check=False)
        out = self.a.run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2",
                         self.b_ip, check=False, timeout=count * interval + 10).stdout  # fmt: skip
        return [float(w.split("=", 1)[1]) for w in out.split() if w.startswith("time=")]


@contextmanager
def wan_pair(spec: WanSpec | str, tag: str | None = None) -> Iterator[WanPair]:
    """Build A - emulator - B with `spec`; tear everything down however the block ends."""
    tag = tag or new_tag("wn")
    a, b, router = Netns(f"{tag}-a"), Netns(f"{tag}-b"), Netns(f"{tag}-r")
    created: list[Netns] = []
    workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    try:
        for ns in (a, b, router):
            run("ip", "netns", "add", ns.name)
            created.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
        for host, leg in ((a, "a0"), (b, "b0")):
            run("ip", "link", "add", "wan0", "netns", host.name, "type", "veth",
                "peer", "name", leg, "netns", router.name)  # fmt: skip
        a.run("ip", "addr", "add", "198.18.1.2/24", "dev", "wan0")
        b.run("ip", "addr", "add", "198.18.1.1/24", "dev", "wan0")
        for host in (a, b):
            host.run("ip", "link", "set", "wan0", "up")
        with running_wan(
            router.name, "a0", "b0", spec, workdir / "wan.json", log_path=workdir / "wan.log"
        ) as wan:
            yield WanPair(tag, b, a, "wan0", "wan0", router=router, wan=wan)
    finally:
        for ns in created:
            run("ip", "netns", "del", ns.name, check=False)
        run("rm", "-rf", str(workdir), check=False)
