"""Comparison tunnels for the tunnel benchmark: wireguard-go and OpenVPN between two namespaces.

Theory of operation: each setup is a context manager taking the benchmark's namespace `Pair`
(server 198.18.1.1, client 198.18.1.2 on veth). It starts one daemon per namespace in the
foreground, configures it, waits until a ping crosses the tunnel, and yields a `Tunnel` naming the
server's tunnel address (the iperf3 target) and the daemons' PIDs (for peak RSS). On exit — also
when anything on the way fails — every daemon is stopped by its PID (SIGTERM, then SIGKILL) and its
temp dir removed; the tunnel interfaces die with their daemons, and the caller removes the
namespaces. Secrets (WireGuard private keys, TLS keys) live in a tagged 0700 temp dir as 0600
files and never appear in argv. Traffic stays inside the two namespaces; every address is in
198.18.0.0/15 (tunnels use 198.19.2.0/24 and 198.19.3.0/24).

The setups are the plainest honest ones, with each tool's default tuning:
- wireguard-go: the userspace WireGuard (ChaCha20-Poly1305 over UDP, default MTU 1420), keyed
  with `wg set`. The binary is `$WIREGUARD_GO` when set, else the one
  /work/shared/tools/get-wireguard-go-2023.sh fetches (Debian's 0.0.20231211 build, with the TUN
  and UDP GSO/GRO offloads, unpacked under `${WGGO_DIR:-/tmp/wggo-2023}`; run the script once to
  get it), else `wireguard-go` on PATH (often an older, slower build: the note says which).
- OpenVPN 2.6: TCP, `--dev-type tun`, point-to-point TLS with a throwaway EC CA made by the
  openssl CLI, data channel AES-256-GCM (checked in the log), TCP_NODELAY on the transport socket
  (as vpnd does), DCO off (userspace data path).
  Static-key mode (`--secret`) is not used: it cannot do AES-256-GCM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netns import Netns, Pair, poll_until, run

WG_PORT = 51820
OVPN_PORT = 1194
WG_SERVER, WG_CLIENT = "198.19.2.1", "198.19.2.2"
OVPN_SERVER, OVPN_CLIENT = "198.19.3.1", "198.19.3.2"
LINK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Tunnel:
    """A running comparison tunnel: where iperf3 should connect and which PIDs carry it."""

    server_addr: str
    pids: tuple[int, ...]
    note: str


#: Where get-wireguard-go-2023.sh unpacks Debian's wireguard-go 0.0.20231211 (its default).
WGGO_DIR_DEFAULT = "/tmp/wggo-2023"


def wireguard_go_binary() -> str | None:
    """The wireguard-go to measure: $WIREGUARD_GO, else the 2023 build the fetch script unpacked
    (under $WGGO_DIR or its default), else the one on PATH; None when there is none."""
    explicit = os.environ.get("WIREGUARD_GO")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    fetched = Path(os.environ.get("WGGO_DIR", WGGO_DIR_DEFAULT)) / "root/usr/bin/wireguard-go"
    if os.access(fetched, os.X_OK):
        return str(fetched)
    return shutil.which("wireguard-go")


def find_tool(name: str) -> str | None:
    """The path of tool `name` (wireguard-go resolved as `wireguard_go_binary` says)."""
    return wireguard_go_binary() if name == "wireguard-go" else shutil.which(name)


def _wireguard_go_version(binary: str) -> str:
    """`wireguard-go vX (Debian Y)`: the binary's own version string, and the Debian package's
    when it came from the fetch script (0.0.20231211's binary still reports v0.0.20230223)."""
    version = tool_version([binary, "--version"], r"wireguard-go (v\S+)")
    debs = sorted(Path(binary).parents[3].glob("deb/wireguard-go_*.deb"))
    if debs and shutil.which("dpkg-deb"):
        proc = subprocess.run(
            ["dpkg-deb", "-f", str(debs[-1]), "Version"],
            capture_output=True, text=True, check=False, timeout=10,
        )  # fmt: skip
        if proc.returncode == 0:
            return f"wireguard-go {version} (Debian {proc.stdout.strip()})"
    return f"wireguard-go {version} ({binary})"


@dataclass(frozen=True)
class PeerSetup:
    """One comparison row: its label, the tools it needs and the context manager that builds it."""

    label: str
    tools: tuple[str, ...]
    start: Callable[[Pair], AbstractContextManager[Tunnel]]

    def missing_tools(self) -> list[str]:
        """The needed tools not found on PATH (the row is skipped when any is missing)."""
        return [tool for tool in self.tools if find_tool(tool) is None]


class Daemon:
    """A foreground process started in a namespace, logging to a file, ended by its PID only."""

    def __init__(self, ns: Netns, argv: list[str], logfile: Path) -> None:
        self.logfile = logfile
        with open(logfile, "ab") as out:
            # `ip netns exec` execs the command, so this PID is the daemon's own.
            self.proc = subprocess.Popen(
                ns.cmd(*argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def check_alive(self) -> None:
        """Raise with the daemon's log tail if it has already exited."""
        if self.proc.poll() is not None:
            tail = "\n".join(self.log().splitlines()[-15:])
            raise RuntimeError(
                f"{self.logfile.stem} exited with status {self.proc.returncode}:\n{tail}"
            )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM by PID, SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _start(stack: ExitStack, ns: Netns, argv: list[str], logfile: Path) -> Daemon:
    """Start a daemon whose stop is registered on `stack` before anything else can fail."""
    daemon = Daemon(ns, argv, logfile)
    stack.callback(daemon.stop)
    return daemon


def _write_secret(path: Path, data: str) -> None:
    """Create `path` as a new 0600 file holding `data` (O_EXCL: never reuse an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def _wait_link(pair: Pair, target: str, daemons: list[Daemon], what: str) -> None:
    """Poll until a ping from the client reaches `target`, failing early if a daemon died."""

    def ready() -> bool:
        for daemon in daemons:
            daemon.check_alive()
        return pair.client.ping(target, timeout=1)

    poll_until(ready, LINK_TIMEOUT, interval=0.2, what=what)


@contextmanager
def wireguard_go(pair: Pair) -> Iterator[Tunnel]:
    """wireguard-go in each namespace, keyed with `wg set`, 198.19.2.1 <-> 198.19.2.2 over UDP."""
    sides = (
        (pair.server, f"{pair.tag}wgs", WG_SERVER, pair.client_ip),
        (pair.client, f"{pair.tag}wgc", WG_CLIENT, pair.server_ip),
    )
    binary = wireguard_go_binary()
    if binary is None:
        raise RuntimeError("no wireguard-go (set WIREGUARD_GO or run get-wireguard-go-2023.sh)")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{pair.tag}-wg-")))
        keys: dict[str, tuple[Path, str]] = {}
        for _, ifname, _, _ in sides:
            private = run("wg", "genkey").stdout.strip()
            keyfile = work / f"{ifname}.key"
            _write_secret(keyfile, private + "\n")
            public = subprocess.run(
                ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
            ).stdout.strip()
            keys[ifname] = (keyfile, public)
        daemons = []
        for ns, ifname, _, _ in sides:
            # The UAPI socket is in the shared /var/run/wireguard: remove it if SIGKILL left it.
            stack.callback(Path(f"/var/run/wireguard/{ifname}.sock").unlink, missing_ok=True)
            daemons.append(_start(stack, ns, [binary, "-f", ifname], work / f"{ifname}.log"))
        for daemon, (ns, ifname, _, _) in zip(daemons, sides, strict=True):

            def uapi_ready(d: Daemon = daemon, n: Netns = ns, i: str = ifname) -> bool:
                d.check_alive()
                return n.run("wg", "show", i, check=False).returncode == 0

            poll_until(uapi_ready, LINK_TIMEOUT, interval=0.1, what=f"{ifname} UAPI socket")
        for (ns, ifname, addr, endpoint), (_, peer_if, peer_addr, _) in zip(
            sides, reversed(sides), strict=True
        ):
            ns.run(
                "wg", "set", ifname,
                "listen-port", str(WG_PORT),
                "private-key", str(keys[ifname][0]),
                "peer", keys[peer_if][1],
                "endpoint", f"{endpoint}:{WG_PORT}",
                "allowed-ips", f"{peer_addr}/32",
            )  # fmt: skip
            ns.run("ip", "addr", "add", f"{addr}/24", "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
        _wait_link(pair, WG_SERVER, daemons, "wireguard-go handshake")
        mtu = pair.server.run("cat", f"/sys/class/net/{sides[0][1]}/mtu").stdout.strip()
        yield Tunnel(
            WG_SERVER,
            tuple(d.pid for d in daemons),
            f"{_wireguard_go_version(binary)}, userspace, UDP, ChaCha20-Poly1305, MTU {mtu}",
        )


def _openssl(work: Path, *args: str) -> None:
    """Run the openssl CLI in `work` with umask 077, so every key file it writes is 0600."""
    proc = subprocess.run(
        ["openssl", *args], cwd=work, capture_output=True, text=True, umask=0o077, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _throwaway_ca(work: Path, tag: str) -> None:
    """A one-day EC CA (ca.crt) and server/client certs signed by it (server.*, client.*)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    _openssl(
        work, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", f"/CN={tag}-bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        _openssl(
            work, "req", "-x509", *ec, "-CA", "ca.crt", "-CAkey", "ca.key",
            "-keyout", f"{role}.key", "-out", f"{role}.crt",
            "-subj", f"/CN={tag}-{role}",
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature",
            "-addext", f"extendedKeyUsage={eku}",
        )  # fmt: skip


def tool_version(argv: list[str], pattern: str) -> str:
    """The version `argv` prints, matched by `pattern`'s first group ('?' when unreadable)."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    match = re.search(pattern, proc.stdout + proc.stderr)
    return match.group(1) if match else "?"


@contextmanager
def openvpn_tls(pair: Pair) -> Iterator[Tunnel]:
    """OpenVPN point-to-point over TCP with TLS (throwaway CA), AES-256-GCM, 198.19.3.1 <-> .2."""
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{pair.tag}-ovpn-")))
        _throwaway_ca(work, pair.tag)
        common = [
            "openvpn", "--dev-type", "tun", "--disable-dco",
            "--data-ciphers", "AES-256-GCM", "--cipher", "AES-256-GCM",
            "--ca", str(work / "ca.crt"), "--verb", "3",
            # Like vpnd's own TCP socket (and as OpenVPN's manual advises for TCP mode): without
            # it Nagle + delayed ACKs add tens of ms to every ping crossing the tunnel.
            "--socket-flags", "TCP_NODELAY",
        ]  # fmt: skip
        server = _start(
            stack,
            pair.server,
            [
                *common, "--dev", f"{pair.tag}os", "--tls-server", "--dh", "none",
                "--cert", str(work / "server.crt"), "--key", str(work / "server.key"),
                "--remote-cert-tls", "client",
                "--proto", "tcp-server", "--local", pair.server_ip, "--lport", str(OVPN_PORT),
                "--ifconfig", OVPN_SERVER, OVPN_CLIENT,
            ],
            work / "server.log",
        )  # fmt: skip
        client = _start(
            stack,
            pair.client,
            [
                *common, "--dev", f"{pair.tag}oc", "--tls-client",
                "--cert", str(work / "client.crt"), "--key", str(work / "client.key"),
                "--remote-cert-tls", "server",
                "--proto", "tcp-client", "--remote", pair.server_ip, str(OVPN_PORT),
                "--nobind", "--connect-retry", "1", "1",
                "--ifconfig", OVPN_CLIENT, OVPN_SERVER,
            ],
            work / "client.log",
        )  # fmt: skip
        _wait_link(pair, OVPN_SERVER, [server, client], "OpenVPN link")
        for daemon in (server, client):
            ciphers = set(re.findall(r"Data Channel: cipher '([^']+)'", daemon.log()))
            if ciphers != {"AES-256-GCM"}:
                raise RuntimeError(
                    f"OpenVPN {daemon.logfile.stem} negotiated {sorted(ciphers) or 'nothing'}, "
                    "not AES-256-GCM"
                )
        mtu = pair.server.run("cat", f"/sys/class/net/{pair.tag}os/mtu").stdout.strip()
        version = tool_version(["openvpn", "--version"], r"^OpenVPN (\S+)")
        yield Tunnel(
            OVPN_SERVER,
            (server.pid, client.pid),
            f"OpenVPN {version}, TCP, TLS (throwaway EC CA), AES-256-GCM, "
            f"TCP_NODELAY, tun MTU {mtu}, no DCO",
        )


PEERS: list[PeerSetup] = [
    PeerSetup("wireguard-go", ("wireguard-go", "wg"), wireguard_go),
    PeerSetup("openvpn", ("openvpn", "openssl"), openvpn_tls),
]
