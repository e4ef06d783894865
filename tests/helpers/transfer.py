"""A checked TCP transfer through a test tunnel (tests/e2e/test_tunnel_tcp.py, _udp, _ipv6).

A receiver in the server's namespace counts and hashes what arrives on port 5001; a sender in
the client's namespace sends a file in two halves and, between them, waits for the test to say
go (after a rekey, an address change... or at once).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.helpers.netns import Netns

RECEIVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while chunk := c.recv(1 << 20):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

SENDER = """
import socket, sys
data = open(sys.argv[2], "rb").read()
half = len(data) // 2
c = socket.create_connection((sys.argv[1], 5001), timeout=60)
try:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")  # loss is not congestion here
except OSError:
    pass
c.sendall(data[:half]); print("half", flush=True)
sys.stdin.readline()  # the test says when to go on
c.sendall(data[half:]); c.close()
"""


def transfer(
    server_ns: Netns,
    client_ns: Netns,
    to: str,
    blob: Path,
    *,
    at_half: Callable[[], None] = lambda: None,
    timeout: float = 120,
) -> tuple[int, str]:
    """Send `blob` through the tunnel from `client_ns` to a receiver at `to` (an address of
    `server_ns`, IPv4 or IPv6); call `at_half()` halfway; return the (bytes, sha256) that the
    receiver got. Both processes are ended (by their handles) whatever happens."""
    receiver = subprocess.Popen(
        server_ns.cmd(sys.executable, "-c", RECEIVER, to), stdout=subprocess.PIPE, text=True
    )
    sender = None
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        sender = subprocess.Popen(
            client_ns.cmd(sys.executable, "-c", SENDER, to, str(blob)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sender.stdout is not None and sender.stdin is not None
        assert sender.stdout.readline().strip() == "half"
        at_half()
        sender.stdin.write("go\n")
        sender.stdin.flush()
        out, _ = receiver.communicate(timeout=timeout)
        assert sender.wait(60) == 0
        n, digest = out.split()
        return int(n), digest
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
