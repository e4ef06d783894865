"""The tunnel over a serial line: two vpnd in two namespaces joined by socat PTY pairs.

The 'cable' is   server vpnd <-> PTY pair 1 <-> relay (this test) <-> PTY pair 2 <-> client vpnd.
The relay copies bytes both ways, records everything that crossed the line, and can inject
line noise between frames — the test reads the line itself rather than trusting either end.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_root_netns, require_tools
from tests.helpers.netns import Pair, VpndProcess, namespace_pair, new_tag, poll_until, vpnd
from tests.helpers.pty import PtyPair, pty_pair
from vpnd_runtime.keyfile import generate_key

pytestmark = pytest.mark.root

SERVER_TUN, CLIENT_TUN = "198.19.1.1", "198.19.1.2"
SLIP_END = 0xC0


@dataclass
class Relay:
    """Copies bytes between two PTY ends; optionally injects noise right after a frame's END."""

    left: str
    right: str
    noise: bytes = b""
    #: Act as the client's modem first: answer AT commands with OK, a dial with this result;
    #: bytes pass through only after a CONNECT.
    dial_result: str | None = None
    dialled: list[str] = field(default_factory=list)
    seen: bytearray = field(default_factory=bytearray)
    injected: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        a = os.open(self.left, os.O_RDWR | os.O_NOCTTY)
        b = os.open(self.right, os.O_RDWR | os.O_NOCTTY)
        peer = {a: b, b: a}
        frames = 0
        connected = self.dial_result is None
        command = b""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for fd in ready:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if not connected:  # the modem's command mode, on the client's side only
                        if fd == b:
                            command += data
                            while b"\r" in command:
                                line, _, command = command.partition(b"\r")
                                connected = self._modem(b, line.strip().decode(errors="replace"))
                        continue
                    self.seen += data
                    out = data
                    if self.noise and fd == a and SLIP_END in data:
                        frames += data.count(SLIP_END)
                        if frames >= 6:  # every few frames, garbage between two frames
                            frames = 0
                            cut = data.index(SLIP_END) + 1
                            out = data[:cut] + self.noise + data[cut:]
                            self.injected += 1
                    os.write(peer[fd], out)
        finally:
            os.close(a)
            os.close(b)

    def _modem(self, fd: int, line: str) -> bool:
        """Answer one AT command; True once the call is connected."""
        if not line.upper().startswith("AT"):
            return False
        if line.upper().startswith("ATD"):
            self.dialled.append(line)
            assert self.dial_result is not None
            os.write(fd, f"\r\n{self.dial_result}\r\n".encode())
            return self.dial_result.startswith("CONNECT")
        os.write(fd, b"\r\nOK\r\n")
        return False


@dataclass
class SerialLab:
    pair: Pair
    dir: Path
    tag: str
    line1: PtyPair
    line2: PtyPair

    def conf(self, role: str, extra: str = "") -> Path:
        device = self.line1.a if role == "server" else self.line2.b
        local, remote = (SERVER_TUN, CLIENT_TUN) if role == "server" else (CLIENT_TUN, SERVER_TUN)
        path = self.dir / f"{role}.conf"
        path.write_text(
            f"mode {role}\nserver {device}\nspeed 2000000\nlocalline\nnortscts\n"
            f"local {local}\nremote {remote}\nkeyfile {self.dir / 'k'}\n"
            f"randomdev /dev/urandom\ninterface {self.tag}l\nmtu 1400\n"
            f"statusfile {self.dir / role}.status.json\nkeepalive 1\nnoanswer 3\n"
            f"slipup {self.dir / 'hook.sh'}\nslipdown {self.dir / 'hook.sh'}\n" + extra
        )
        return path

    def hook_calls(self) -> list[str]:
        path = self.dir / "hooks.txt"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def slab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SerialLab]:
    require_root_netns()
    require_tools("socat", "ping")
    tag = new_tag("vs")
    d = tmp_path_factory.mktemp(f"{tag}-serial")
    generate_key(d / "k", randomdev="/dev/urandom")
    hook = d / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$VPND_MODE $VPND_EVENT $*" >> {d}/hooks.txt\n')
    hook.chmod(0o755)
    with namespace_pair(tag) as pair, pty_pair(f"{tag}1") as l1, pty_pair(f"{tag}2") as l2:
        yield SerialLab(pair, d, tag, l1, l2)


def _up(p: VpndProcess) -> bool:
    return p.state() == "up"


def test_serial_tunnel_passes_ping_and_a_checked_transfer(slab: SerialLab) -> None:
    relay = Relay(slab.line1.b, slab.line2.a).start()
    try:
        with (
            vpnd(slab.pair.server, slab.conf("server"), slab.dir, "server") as s,
            vpnd(slab.pair.client, slab.conf("client"), slab.dir, "client") as c,
        ):
            poll_until(lambda: _up(s) and _up(c), 30, what="serial link up")
            assert slab.pair.client.ping(SERVER_TUN, count=3)
            blob = os.urandom(200_000)
            want = hashlib.sha256(blob).hexdigest()
            got = _transfer(slab.pair, blob)
            assert got == want
            assert {"server slipup", "client slipup"} <= {
                " ".join(x.split()[:2]) for x in slab.hook_calls()
            }
    finally:
        relay.stop()


def test_noise_between_frames_is_survived_and_counted(slab: SerialLab) -> None:
    relay = Relay(slab.line1.b, slab.line2.a, noise=os.urandom(40) + b"\xdb\x01garbage").start()
    try:
        with (
            vpnd(slab.pair.server, slab.conf("server"), slab.dir, "server") as s,
            vpnd(slab.pair.client, slab.conf("client"), slab.dir, "client") as c,
        ):
            poll_until(lambda: _up(s) and _up(c), 30, what="serial link up through noise")
            for _ in range(5):
                slab.pair.server.ping(CLIENT_TUN, count=2)
            poll_until(lambda: relay.injected >= 3, 20, what="noise injected")
            assert slab.pair.server.ping(CLIENT_TUN, count=3)
            drops = c.status()["drops"]
            assert sum(drops.values()) >= 1, drops
            assert _up(s) and _up(c)
    finally:
        relay.stop()


def test_xfilter_keeps_xon_xoff_off_the_raw_line(slab: SerialLab) -> None:
    relay = Relay(slab.line1.b, slab.line2.a).start()
    try:
        with (
            vpnd(slab.pair.server, slab.conf("server", "xfilter\n"), slab.dir, "server") as s,
            vpnd(slab.pair.client, slab.conf("client", "xfilter\n"), slab.dir, "client") as c,
        ):
            poll_until(lambda: _up(s) and _up(c), 30, what="serial link up")
            # Ciphertext is uniformly random: ~20 KB on the line would hold ~160 raw XON/XOFF
            # bytes without the filter, so finding none is not luck.
            slab.pair.client.run("ping", "-c", "10", "-i", "0.2", "-s", "1000", SERVER_TUN)
            assert len(relay.seen) > 20_000
            assert 0x11 not in relay.seen
            assert 0x13 not in relay.seen
    finally:
        relay.stop()


def test_cut_line_takes_link_down_runs_slipdown_and_restore_brings_it_back(
    slab: SerialLab,
) -> None:
    relay = Relay(slab.line1.b, slab.line2.a).start()
    with (
        vpnd(slab.pair.server, slab.conf("server"), slab.dir, "server") as s,
        vpnd(slab.pair.client, slab.conf("client"), slab.dir, "client") as c,
    ):
        poll_until(lambda: _up(s) and _up(c), 30, what="serial link up")
        # When the cable is pulled (socat of the client's side ends)
        relay.stop()
        slab.line2.cut()
        poll_until(lambda: c.state() != "up", 10, what="client sees the line down")
        poll_until(
            lambda: "client slipdown" in " ".join(slab.hook_calls()),
            10,
            what="slipdown on the client",
        )
        poll_until(lambda: s.state() != "up", 10, what="server declares the peer dead")
        # When it is plugged back in, the link comes back by itself
        slab.line2.start()
        relay = Relay(slab.line1.b, slab.line2.a).start()
        try:
            poll_until(lambda: _up(s) and _up(c), 60, what="serial link back up")
            assert slab.pair.client.ping(SERVER_TUN, count=2)
        finally:
            relay.stop()


CHAT = """\
ABORT 'BUSY'
ABORT 'NO CARRIER'
TIMEOUT 3
'' AT
OK ATDT5551234
CONNECT ''
"""


@pytest.mark.parametrize("answer", ["CONNECT 115200", "BUSY"])
def test_modemchat_dials_before_the_link_starts_and_a_busy_line_is_retried(
    slab: SerialLab, answer: str
) -> None:
    chat = slab.dir / "modem.chat"
    chat.write_text(CHAT)
    relay = Relay(slab.line1.b, slab.line2.a, dial_result=answer).start()
    try:
        with (
            vpnd(slab.pair.server, slab.conf("server"), slab.dir, "server") as s,
            vpnd(slab.pair.client, slab.conf("client", f"modemchat {chat}\n"), slab.dir, "c") as c,
        ):
            if answer.startswith("CONNECT"):
                poll_until(lambda: _up(s) and _up(c), 30, what="link up after dialling")
                assert relay.dialled == ["ATDT5551234"]
                assert slab.pair.client.ping(SERVER_TUN, count=2)
                assert "modemchat:" in c.log()
            else:
                poll_until(lambda: "modem chat failed" in c.log(), 20, what="the chat to fail")
                assert "BUSY" in c.log()
                poll_until(lambda: len(relay.dialled) >= 2, 20, what="a second dial")
                assert c.state() != "up"
    finally:
        relay.stop()


RECEIVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5002)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256()
while chunk := c.recv(65536):
    h.update(chunk)
print(h.hexdigest(), flush=True)
"""

SENDER = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5002), timeout=60)
c.sendall(sys.stdin.buffer.read()); c.close()
"""


def _transfer(pair: Pair, blob: bytes) -> str:
    receiver = subprocess.Popen(
        pair.server.cmd(sys.executable, "-c", RECEIVER, SERVER_TUN),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(
            pair.client.cmd(sys.executable, "-c", SENDER, SERVER_TUN),
            input=blob,
            check=True,
            timeout=120,
        )
        out, _ = receiver.communicate(timeout=120)
        return out.strip()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
