"""The lab: network namespaces that stand in for real hosts, each with its own sshd.

Theory of operation
-------------------
``lab_up`` builds, for a lab tagged ``T`` in directory ``D``::

    root namespace                          T-wan (switch namespace, bridge br0)
    bridge T-mgmt 198.18.M.1/24                 |            |
      |  veth Tm0 ... Tm<n>                     |            |
    T-server   mgmt0 198.18.M.2   wan0 198.18.1.1/24  (sshd on mgmt0:22)
    T-client1  mgmt0 198.18.M.3   wan0 198.18.1.11/24 (sshd on mgmt0:22)
    ...

* Every host namespace runs its own ``sshd`` (own ed25519 host key, the lab operator key
  authorised, pidfile in ``D/hosts/<host>/``) on the management link, so ``vpnctl deploy`` reaches
  it through the system OpenSSH client exactly as it would reach a real machine. Its logins get
  a fresh root home (``D/hosts/<host>/home`` bound over ``/root`` in that sshd's own mount
  namespace), not this machine's dotfiles: a real host does not run a developer's shell init.
* Every host gets its own deploy prefix ``D/hosts/<host>/root``: configs, keys, the runtime venv,
  pidfiles and status records of one host never collide with another's on the shared filesystem.
  The hosts do not run systemd, so deploy uses the runtime's daemon mode and pidfile.
* Only 198.18.0.0/15 addresses are used. The management /24 (``198.18.M.0/24``) lives in the root
  namespace and must not overlap another lab's, so it is a parameter (tests derive it from their
  tag); the WAN lives inside namespaces and is always ``198.18.1.0/24``.
* IPv6: ``stack`` says per host (server first) whether it is ``ipv4`` (the default), ``dual``
  (both families on WAN and management) or ``ipv6`` only (no IPv4 at all: ssh and the carrier
  run over IPv6). IPv6 addresses are documentation ones: WAN ``2001:db8:1::/64`` inside the
  namespaces, management ``2001:db8:ff:M::/64`` (M = the management /24's third octet).
* ``D/inventory.yaml`` describes the hosts and one link per client (server <-> client i) and
  ``D/ssh_config`` the ssh connection details (known_hosts pinned, multiplexing in ``D``).
* ``--wan SPEC`` puts the WAN emulator (``vpnctl/wan.py``) on the server's switch port in
  ``T-wan``, so every client <-> server packet crosses it (``_start_wan``); ``lab down`` stops it.
* ``--systemd`` boots every host as a systemd container instead (``vpnctl/nspawn.py``:
  ``systemd-nspawn -b`` in the host's namespace on an overlay of a cached Debian rootfs, built
  once per machine): its own sshd runs under systemd, the inventory says ``systemd: true``,
  prefix ``/`` and the default daemon user, so deploy installs units as on a real host.
* Everything is recorded in ``D/lab.json`` *before* it is created, so ``lab_down`` removes every
  trace -- processes running inside the lab's namespaces, ssh control masters, namespaces, root
  links, files -- even after ``lab_up`` crashed halfway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from vpnctl import nspawn
from vpnctl.wan import WanError, WanSpecError, parse_spec, start_wan

STATE_FILE = "lab.json"
TAG_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
WAN_NET = ipaddress.IPv4Network("198.18.1.0/24")
WAN_NET6 = ipaddress.IPv6Network("2001:db8:1::/64")
STACKS = ("ipv4", "dual", "ipv6")
LAB_SPACE = ipaddress.IPv4Network("198.18.0.0/15")
MAX_CLIENTS = 100
SSHD_READY_TIMEOUT = 10.0
CONTAINER_READY_TIMEOUT = 90.0  # a systemd boot to sshd: < 1 s idle, far more on a busy CI box
# Fast liveness for lab links so tests and the demo see a cut link within seconds.
LAB_KEEPALIVE = 1
LAB_NOANSWER = 3


class LabError(RuntimeError):
    """A lab could not be built or torn down; the message says which step and why."""


@dataclass
class LabHost:
    """One namespaced test host."""

    name: str
    role: str  # "server" | "client"
    namespace: str
    mgmt_ip: str
    wan_ip: str
    prefix: str
    root_veth: str
    #: ipv4 | dual | ipv6; the IPv6 addresses are "" on an ipv4 host (IPv4 ones on an ipv6 host).
    stack: str = "ipv4"
    mgmt_ip6: str = ""
    wan_ip6: str = ""
    rootfs: str = ""  # systemd hosts: the container's root as seen from here (its overlay)
    machine: str = ""  # systemd hosts: the container's machine name (= its namespace)
    release: str = ""  # systemd hosts: the Debian release it boots (``lab up --release``)

    @property
    def ssh_ip(self) -> str:
        """The address deploy's ssh reaches the host on (IPv6 on an IPv6-only host)."""
        return self.mgmt_ip or self.mgmt_ip6


@dataclass
class LabState:
    """Everything a lab created, persisted in ``<dir>/lab.json`` as it is created."""

    tag: str
    directory: str
    mgmt_net: str
    namespaces: list[str] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)
    sshd_pidfiles: list[str] = field(default_factory=list)
    hosts: list[LabHost] = field(default_factory=list)
    created_run_sshd: bool = False
    created_directory: bool = False
    control_dir: str = ""
    wan_spec: str = ""  # `lab up --wan`: the emulator on the server's WAN leg (see _start_wan)
    wan_pid: int = 0
    systemd: bool = False  # `lab up --systemd`: hosts are systemd containers (vpnctl.nspawn)
    container_cgroups: dict[str, list[str]] = field(default_factory=dict)  # host -> cgroup dirs
    container_supervisors: dict[str, int] = field(default_factory=dict)  # host -> supervisor PID

    def save(self) -> None:
        """Write the state atomically so a crash never leaves a half-written record."""
        path = Path(self.directory) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | Path) -> LabState:
        """Read ``<directory>/lab.json``; LabError names the file when it is missing or bad."""
        path = Path(directory) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise LabError(f"{path}: no lab state here (was `vpnctl lab up` run?)") from exc
        except (OSError, ValueError) as exc:
            raise LabError(f"{path}: unreadable lab state: {exc}") from exc
        hosts = [LabHost(**h) for h in raw.pop("hosts", [])]
        return cls(hosts=hosts, **raw)


def default_mgmt_net(tag: str) -> str:
    """The management /24 for a tag: 198.18.0.0/24 for the default tag, else one derived from it.

    Labs with different tags can then coexist in the root namespace without route clashes.
    """
    if tag == "vlab":
        return "198.18.0.0/24"
    third = 100 + sum(tag.encode()) * 7 % 150
    return f"198.18.{third}.0/24"


def _run(argv: list[str], *, timeout: float = 20.0, check: bool = True) -> str:
    """Run a command; a failure raises LabError quoting the command and its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(argv)}` timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ns(namespace: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def _wait_tcp(address: str, port: int, timeout: float) -> None:
    """Poll until something accepts TCP on address:port, or raise LabError after `timeout`."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise LabError(f"sshd on {address}:{port} did not answer within {timeout}s: {last}")


def _check_free_subnet(mgmt: ipaddress.IPv4Network) -> None:
    routes = _run(["ip", "-4", "route", "show"])
    for line in routes.splitlines():
        dest = line.split()[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Network(dest, strict=False).overlaps(mgmt):
                raise LabError(
                    f"management subnet {mgmt} is already routed in the root namespace "
                    f"({line.strip()}); pick another with --mgmt-net or tear the other lab down"
                )


def mgmt_net6(mgmt: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """The IPv6 management /64 beside the management /24: 2001:db8:ff:<third octet>::/64."""
    return ipaddress.IPv6Network(f"2001:db8:ff:{mgmt.network_address.packed[2]:x}::/64")


def parse_stacks(stack: str, hosts: int) -> list[str]:
    """``dual`` (every host) or ``dual,ipv6,ipv4`` (server, client1, ...) -> one per host."""
    words = [w.strip() for w in stack.split(",")]
    bad = [w for w in words if w not in STACKS]
    if bad:
        raise LabError(f"--stack {stack}: {bad[0]!r} is not one of {', '.join(STACKS)}")
    if len(words) == 1:
        return words * hosts
    if len(words) != hosts:
        raise LabError(f"--stack {stack}: give one stack, or one per host ({hosts}: server first)")
    return words


def parse_releases(release: str, hosts: int) -> list[str]:
    """``bullseye`` (every host) or ``bullseye,bookworm`` (server, client1, ...) -> one
    Debian release per systemd host (see :data:`vpnctl.nspawn.SUITES`)."""
    words = [w.strip() for w in release.split(",")]
    bad = [w for w in words if w not in nspawn.SUITES]
    if bad:
        raise LabError(f"--release {release}: {bad[0]!r} is not one of {', '.join(nspawn.SUITES)}")
    if len(words) == 1:
        return words * hosts
    if len(words) != hosts:
        raise LabError(
            f"--release {release}: give one release, or one per host ({hosts}: server first)"
        )
    return words


def _host_plan(
    tag: str,
    directory: Path,
    mgmt: ipaddress.IPv4Network,
    clients: int,
    stacks: list[str] | None = None,
) -> list[LabHost]:
    hosts = []
    mgmt_hosts = list(mgmt.hosts())
    wan_hosts = list(WAN_NET.hosts())
    mgmt6 = mgmt_net6(mgmt)
    names = ["server"] + [f"client{i}" for i in range(1, clients + 1)]
    stacks = stacks or ["ipv4"] * len(names)
    for idx, name in enumerate(names):
        stack = stacks[idx]
        v4, v6 = stack != "ipv6", stack != "ipv4"
        wan_index = 1 if idx == 0 else 10 + idx
        hosts.append(
            LabHost(
                name=name,
                role="server" if idx == 0 else "client",
                namespace=f"{tag}-{name}",
                mgmt_ip=str(mgmt_hosts[idx + 1]) if v4 else "",
                wan_ip=str(wan_hosts[wan_index - 1]) if v4 else "",
                prefix=str(directory / "hosts" / name / "root"),
                root_veth=f"{tag}m{idx}",
                stack=stack,
                mgmt_ip6=str(mgmt6[idx + 2]) if v6 else "",
                wan_ip6=str(WAN_NET6[wan_index]) if v6 else "",
            )
        )
    return hosts


def _sshd_config(host: LabHost, hostdir: Path, directory: Path) -> str:
    listen = [f"ListenAddress {a}" for a in (host.mgmt_ip, host.mgmt_ip6) if a]
    return "\n".join(
        [
            *listen,
            "Port 22",
            f"HostKey {hostdir / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {directory / 'operator_key.pub'}",
            f"PidFile {hostdir / 'sshd.pid'}",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "MaxSessions 100",
            "MaxStartups 100:30:200",
            "UseDNS no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


# What a fresh Debian root account has in its home (base-files); empty files elsewhere.
_DEFAULT_DOTFILES = {".bashrc": "/usr/share/base-files/dot.bashrc",
                     ".profile": "/usr/share/base-files/dot.profile"}  # fmt: skip


def _private_home(hostdir: Path) -> Path:
    """The login home of a namespaced lab host: ``<hostdir>/home``, holding only the dotfiles a
    freshly installed root account has.

    Namespaced hosts share this machine's filesystem, so their root logins would otherwise
    run this machine's ``/root/.bashrc`` -- on a developer box a version manager's init
    (``pyenv init`` costs ~0.1 CPU-s per ssh command, and puts its shims first on PATH), which
    no real fleet host runs. Every host's sshd gets this directory over root's home instead
    (:func:`_sshd_argv`)."""
    home = hostdir / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    for name, source in _DEFAULT_DOTFILES.items():
        try:
            text = Path(source).read_text()
        except OSError:
            text = ""
        (home / name).write_text(text)
    return home


def _sshd_argv(namespace: str, sshd: str, hostdir: Path) -> list[str]:
    """Start a namespaced host's sshd with root's home replaced by :func:`_private_home`.

    ``ip netns exec`` runs its command in a mount namespace of its own (slave to this one), so
    the bind mount is seen by that sshd and its sessions only -- never by this machine."""
    home = _private_home(hostdir)
    root_home = pwd.getpwuid(0).pw_dir or "/root"
    return _ns(namespace, "sh", "-c", 'mount --bind "$1" "$2" && exec "$3" -f "$4"', "sh",
               str(home), root_home, sshd, str(hostdir / "sshd_config"))  # fmt: skip


def _control_dir(directory: Path, tag: str, longest_address: int = 15) -> Path:
    """Where ssh multiplexing sockets live: the lab dir, or a short dir when its path is too long.

    A unix socket path is limited to 108 bytes; ssh appends ``/cm-<user>@<address>`` and, while
    it sets a master up, a 17-byte suffix (``<user>`` is ``root`` for lab logins; room is kept
    for a tagged test account).
    """
    if len(str(directory)) + len("/cm-") + 16 + 1 + longest_address + 17 < 108:
        return directory
    return Path(tempfile.mkdtemp(prefix=f"{tag}-cm-"))


def _ssh_config(hosts: list[LabHost], directory: Path, control_dir: Path) -> str:
    lines = [f"# written by `vpnctl lab up` for the lab in {directory}"]
    for host in hosts:
        lines += [
            f"Host {host.name}",
            f"    HostName {host.ssh_ip}",
            "    User root",
            "    Port 22",
            f"    IdentityFile {directory / 'operator_key'}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {directory / 'known_hosts'}",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            "    ConnectTimeout 5",
            "    ServerAliveInterval 5",
            "    ServerAliveCountMax 2",
            "    ControlMaster auto",
            f"    ControlPath {control_dir}/cm-%r@%h",  # one master per user and host
            "    ControlPersist 60",
            "",
        ]
    return "\n".join(lines)


def lab_ssh_options(directory: Path, control_dir: Path) -> list[str]:
    """ssh -o options that reach lab hosts: the lab's known_hosts pinned, multiplexed in the lab."""
    return [
        "IdentitiesOnly=yes",
        f"UserKnownHostsFile={directory / 'known_hosts'}",
        "StrictHostKeyChecking=yes",
        "ControlMaster=auto",
        f"ControlPath={control_dir}/cm-%r@%h",
        "ControlPersist=60",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=2",
    ]


HUB_NAME = "hub"
HUB_PORT = 4000


def lab_inventory(
    hosts: list[LabHost],
    directory: Path,
    control_dir: Path,
    *,
    hub: bool = False,
    systemd: bool = False,
) -> dict[str, object]:
    """The inventory (vpnctl.inventory format) for a lab: its hosts, one link per client -- or,
    with ``hub``, one hub on the server (``hubs:``, port 4000) with every client. With
    ``systemd`` the hosts are containers: units, prefix ``/`` and the default daemon user."""
    server = hosts[0]
    inventory = {
        "version": 1,
        "defaults": {
            "ssh": {
                "user": "root",
                "identity": str(directory / "operator_key"),
                "options": lab_ssh_options(directory, control_dir),
            },
            "systemd": systemd,
            # Lab hosts share this machine's accounts and live below a private temp directory
            # an unprivileged account cannot reach: their daemons stay root (no `user`).
            "daemon_user": "root",
            "keepalive": LAB_KEEPALIVE,
            "noanswer": LAB_NOANSWER,
        },
        "hosts": [
            {
                "name": host.name,
                "address": host.wan_ip or host.wan_ip6,
                **({"address6": host.wan_ip6} if host.wan_ip and host.wan_ip6 else {}),
                "ssh": {"host": host.ssh_ip},
                "prefix": host.prefix,
            }
            for host in hosts
        ],
        "links": [
            {"name": f"l{idx}", "server": server.name, "client": client.name, "port": 4000 + idx}
            for idx, client in enumerate(hosts[1:], start=1)
        ],
    }
    if systemd:  # a container is a host of its own: the real paths and the real daemon user
        del inventory["defaults"]["daemon_user"]  # type: ignore[attr-defined]
    if hub:
        del inventory["links"]
        inventory["hubs"] = [
            {
                "name": HUB_NAME,
                "server": server.name,
                "port": HUB_PORT,
                "clients": [client.name for client in hosts[1:]],
            }
        ]
    return inventory


def _write_inventory(path: Path, inventory: dict[str, object]) -> None:
    shape = "one hub for every client" if "hubs" in inventory else "one link per client"
    header = f"# written by `vpnctl lab up`: one server, {shape}, lab addresses only\n"
    path.write_text(header + yaml.safe_dump(inventory, sort_keys=False))


def lab_up(
    directory: str | Path,
    *,
    clients: int = 2,
    tag: str = "vlab",
    mgmt_net: str | None = None,
    hub: bool = False,
    wan: str | None = None,
    stack: str = "ipv4",
    systemd: bool = False,
    say: Callable[[str], None] | None = None,
    release: str | None = None,
) -> LabState:
    """Build a lab of one server and `clients` clients; return its recorded state. Its
    inventory joins them by one link per client, or with ``hub`` by one hub for all clients.
    With ``systemd`` every host is a booted systemd container (the rootfs is built first if
    this machine has none cached: ``say`` hears about that minute). `release` picks the Debian
    release the containers boot (default bookworm): one for every host, or one per host, server
    first (``bullseye,bookworm``); each release has its own cached rootfs.

    `stack` is ``ipv4``, ``dual`` or ``ipv6`` for every host, or one per host, server first
    (``dual,ipv6,ipv4``).

    On any failure everything created so far is removed before the LabError propagates.
    """
    if not TAG_RE.match(tag):
        raise LabError(f"lab tag {tag!r}: must be 1-8 lowercase letters/digits starting a letter")
    if not 1 <= clients <= MAX_CLIENTS:
        raise LabError(f"--clients {clients}: must be between 1 and {MAX_CLIENTS}")
    stacks = parse_stacks(stack, clients + 1)
    if release and not systemd:
        raise LabError("--release picks the Debian release of systemd hosts: add --systemd")
    releases = parse_releases(release or nspawn.SUITE, clients + 1)
    if wan:
        try:
            parse_spec(wan)
        except WanSpecError as exc:
            raise LabError(f"--wan: {exc}") from exc
    mgmt = ipaddress.IPv4Network(mgmt_net or default_mgmt_net(tag))
    if not mgmt.subnet_of(LAB_SPACE) or mgmt.overlaps(WAN_NET) or mgmt.prefixlen != 24:
        raise LabError(
            f"management net {mgmt}: must be a /24 in 198.18.0.0/15 other than {WAN_NET}"
        )
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); run it with sudo")
    for tool in ("ip", "sshd", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise LabError(f"`{tool}` not found: install iproute2 and openssh-server/-client")
    directory = Path(directory).resolve()
    if (directory / STATE_FILE).exists():
        raise LabError(f"{directory / STATE_FILE}: a lab already exists here; `vpnctl lab down` it")
    if directory.exists() and any(directory.iterdir()):
        raise LabError(f"{directory}: exists and is not empty; give the lab a fresh directory")
    rootfs = None
    rootfs_by_release: dict[str, Path] = {}
    if systemd:
        missing = nspawn.tools_missing()
        if missing:
            raise LabError(f"--systemd needs {', '.join(missing)}")
        try:
            for suite in dict.fromkeys(releases):  # each distinct release once, in host order
                rootfs_by_release[suite] = nspawn.ensure_rootfs(say, suite)
        except (nspawn.NspawnError, OSError) as exc:
            raise LabError(f"--systemd: rootfs: {exc}") from exc
        rootfs = rootfs_by_release[releases[0]]
    existing = set(_run(["ip", "netns", "list"]).split())
    if any(name.startswith(f"{tag}-") for name in existing):
        raise LabError(f"namespaces tagged {tag}- already exist: another lab runs under this tag")
    _check_free_subnet(mgmt)

    created_directory = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    state = LabState(
        tag=tag, directory=str(directory), mgmt_net=str(mgmt), created_directory=created_directory
    )
    state.wan_spec = wan or ""
    state.systemd = systemd
    state.save()
    try:
        _build(state, directory, mgmt, clients, hub=hub, rootfs=rootfs, stacks=stacks,
               releases=releases, rootfs_by_release=rootfs_by_release)  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):
            lab_down(directory)
        raise
    return state


def _build(
    state: LabState,
    directory: Path,
    mgmt: ipaddress.IPv4Network,
    clients: int,
    *,
    hub: bool,
    rootfs: Path | None = None,
    stacks: list[str] | None = None,
    releases: list[str] | None = None,
    rootfs_by_release: dict[str, Path] | None = None,
) -> None:
    tag = state.tag
    hosts = _host_plan(tag, directory, mgmt, clients, stacks)
    mgmt6 = mgmt_net6(mgmt)
    any6 = any(h.mgmt_ip6 for h in hosts)
    if rootfs is not None:
        for host in hosts:
            host.prefix = "/"  # deploy's paths are the container's own
            host.rootfs = str(directory / "hosts" / host.name / "rootfs")
            host.machine = host.namespace
            host.release = releases[hosts.index(host)] if releases else nspawn.SUITE
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"

    if not Path("/run/sshd").exists():
        state.created_run_sshd = True
        state.save()
        Path("/run/sshd").mkdir(mode=0o755)

    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{tag}-operator",
          "-f", str(directory / "operator_key")])  # fmt: skip

    bridge = f"{tag}-mgmt"
    state.root_links.append(bridge)
    state.save()
    _run(["ip", "link", "add", bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{mgmt[1]}/{mgmt.prefixlen}", "dev", bridge])
    if any6:
        _run(["ip", "-6", "addr", "add", f"{mgmt6[1]}/64", "dev", bridge, "nodad"])
    _run(["ip", "link", "set", bridge, "up"])

    wan_ns = f"{tag}-wan"
    state.namespaces.append(wan_ns)
    state.save()
    _run(["ip", "netns", "add", wan_ns])
    _run(["ip", "-n", wan_ns, "link", "add", "br0", "type", "bridge"])
    _run(["ip", "-n", wan_ns, "link", "set", "br0", "up"])
    _run(["ip", "-n", wan_ns, "link", "set", "lo", "up"])

    known_hosts = []
    for idx, host in enumerate(hosts):
        state.hosts.append(host)
        state.namespaces.append(host.namespace)
        state.root_links.append(host.root_veth)
        state.save()
        ns = host.namespace
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # management: root veth on the bridge, the peer inside the host as mgmt0
        _run(["ip", "link", "add", host.root_veth, "type", "veth", "peer", "name", "mgmt0",
              "netns", ns])  # fmt: skip
        _run(["ip", "link", "set", host.root_veth, "master", bridge, "up"])
        if host.mgmt_ip:
            _run(["ip", "-n", ns, "addr", "add", f"{host.mgmt_ip}/{mgmt.prefixlen}",
                  "dev", "mgmt0"])  # fmt: skip
        if host.mgmt_ip6:
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{host.mgmt_ip6}/64", "dev", "mgmt0",
                  "nodad"])  # fmt: skip
        _run(["ip", "-n", ns, "link", "set", "mgmt0", "up"])
        # WAN: wan0 in the host, its peer h<idx> on the switch bridge
        _run(["ip", "-n", ns, "link", "add", "wan0", "type", "veth", "peer", "name", f"h{idx}",
              "netns", wan_ns])  # fmt: skip
        _run(["ip", "-n", wan_ns, "link", "set", f"h{idx}", "master", "br0", "up"])
        if host.wan_ip:
            _run(["ip", "-n", ns, "addr", "add", f"{host.wan_ip}/{WAN_NET.prefixlen}",
                  "dev", "wan0"])  # fmt: skip
        if host.wan_ip6:
            _run(["ip", "-n", ns, "-6", "addr", "add", f"{host.wan_ip6}/64", "dev", "wan0",
                  "nodad"])  # fmt: skip
        _run(["ip", "-n", ns, "link", "set", "wan0", "up"])
        if hub and host.role == "server":
            # the hub host routes client-to-client traffic through its TUN (as a real hub
            # host would be set up: forwarding is the host's business, not vpnd's)
            _run(_ns(ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"))
            # and IPv6 between the clients of a dual-stack hub
            _run(_ns(ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"))

        hostdir = directory / "hosts" / host.name
        hostdir.mkdir(parents=True, exist_ok=True)
        if rootfs is None:
            Path(host.prefix).mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{tag}-{host.name}",
              "-f", str(hostdir / "ssh_host_ed25519_key")])  # fmt: skip
        pub = (hostdir / "ssh_host_ed25519_key.pub").read_text().split()
        names = ",".join(a for a in (host.mgmt_ip, host.mgmt_ip6) if a)
        known_hosts.append(f"{names} {pub[0]} {pub[1]}")
        if rootfs is not None:
            own = (rootfs_by_release or {}).get(host.release, rootfs)
            _boot_container(state, host, own, hostdir, directory)
            continue
        (hostdir / "sshd_config").write_text(_sshd_config(host, hostdir, directory))
        state.sshd_pidfiles.append(str(hostdir / "sshd.pid"))
        state.save()
        _run(_sshd_argv(ns, sshd, hostdir))

    if state.wan_spec:
        _start_wan(state, directory, wan_ns)
    (directory / "known_hosts").write_text("\n".join(known_hosts) + "\n")
    control_dir = _control_dir(directory, tag, max(len(h.ssh_ip) for h in hosts))
    state.control_dir = str(control_dir)
    state.save()
    (directory / "ssh_config").write_text(_ssh_config(hosts, directory, control_dir))
    _write_inventory(
        directory / "inventory.yaml",
        lab_inventory(hosts, directory, control_dir, hub=hub, systemd=rootfs is not None),
    )
    timeout = CONTAINER_READY_TIMEOUT if rootfs is not None else SSHD_READY_TIMEOUT
    for host in hosts:
        _wait_tcp(host.ssh_ip, 22, timeout)


def _boot_container(
    state: LabState, host: LabHost, rootfs: Path, hostdir: Path, directory: Path
) -> None:
    """Boot `host` as a systemd container in its namespace (vpnctl.nspawn); every container
    boots in the background, so a lab's hosts come up in parallel."""
    cgroups = nspawn.cgroup_dirs(f"vpnlab-{host.machine}")
    state.container_cgroups[host.name] = [str(c) for c in cgroups]
    state.save()  # recorded before the mount and the boot: lab down undoes a half-made host
    try:
        merged = nspawn.prepare_root(
            rootfs, hostdir, hostname=host.name,
            host_key=hostdir / "ssh_host_ed25519_key",
            authorized_key=directory / "operator_key.pub",
        )  # fmt: skip
        pid = nspawn.start_container(merged, host.machine, host.namespace, hostdir / "tun",
                                     cgroups, hostdir / "console.log")  # fmt: skip
    except (nspawn.NspawnError, OSError) as exc:
        raise LabError(f"{host.name}: container: {exc}") from exc
    state.container_supervisors[host.name] = pid
    state.save()


def _start_wan(state: LabState, directory: Path, wan_ns: str) -> None:
    """Put the WAN emulator (vpnctl.wan) on the server's leg of the switch: h0 leaves the
    bridge and the emulator forwards between it and a new veth ``wclients`` whose peer is on the
    bridge. Every client <-> server packet crosses it once (up = clients -> server); traffic
    between two clients does not. Its PID goes into lab.json; stats in ``D/wan.json``."""
    _run(["ip", "-n", wan_ns, "link", "set", "h0", "nomaster"])
    _run(["ip", "-n", wan_ns, "link", "add", "wclients", "type", "veth", "peer", "name", "wbr"])
    _run(["ip", "-n", wan_ns, "link", "set", "wbr", "master", "br0", "up"])
    try:
        wan = start_wan(wan_ns, "wclients", "h0", state.wan_spec, directory / "wan.json",
                        log_path=directory / "wan.log")  # fmt: skip
    except (WanError, WanSpecError) as exc:
        raise LabError(f"--wan {state.wan_spec}: {exc}") from exc
    state.wan_pid = wan.pid
    state.save()


def _stop_wan(state: LabState, ours: Callable[[int], bool]) -> list[str]:
    """Stop the lab's WAN emulator by its recorded PID; report its final counters."""
    if not state.wan_pid or not pid_alive(state.wan_pid) or not ours(state.wan_pid):
        return []
    kill_pids([state.wan_pid], ours=ours)
    line = f"wan emulator pid {state.wan_pid}"
    with contextlib.suppress(OSError, ValueError, KeyError):
        stats = json.loads((Path(state.directory) / "wan.json").read_text())
        for way in ("up", "down"):
            st = stats[way]
            line += (
                f"; {way}: {st['forwarded']} forwarded, {st['dropped_loss']} lost, "
                f"{st['dropped_queue']} queue-dropped, {st['dropped_outage']} in outage, "
                f"{st['reordered']} reordered, delay avg {st['delay_avg_ms']} ms"
            )
    return [line]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_pids(
    pids: list[int], timeout: float = 5.0, *, ours: Callable[[int], bool] | None = None
) -> None:
    """SIGTERM processes we started, then SIGKILL whichever outlive `timeout` seconds.

    `ours`, when given, is asked again right before each signal: a PID that exited and was
    reused by an unrelated process meanwhile is left alone."""
    for pid in pids:
        if ours is None or ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if pid_alive(pid) and (ours is None or ours(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _netns_id(pid: int) -> tuple[int, int] | None:
    """(dev, inode) of the network namespace of `pid`, None when it is gone."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _namespace_ids(namespaces: list[str]) -> set[tuple[int, int]]:
    """(dev, inode) of each named namespace that still exists."""
    out = set()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(f"/run/netns/{ns}")
            out.add((st.st_dev, st.st_ino))
    return out


def namespace_pids(namespace: str) -> list[int]:
    """PIDs of the processes whose network namespace is `namespace` (our lab's, by name)."""
    return pids_in_namespaces([namespace]).get(namespace, [])


def pids_in_namespaces(namespaces: list[str]) -> dict[str, list[int]]:
    """namespace -> PIDs living in it, from one pass over /proc (like `ip netns pids`)."""
    inodes: dict[tuple[int, int], str] = {}
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(f"/run/netns/{ns}")
            inodes[(st.st_dev, st.st_ino)] = ns
    found: dict[str, list[int]] = {ns: [] for ns in namespaces}
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        ns = inodes.get((st.st_dev, st.st_ino))
        if ns is not None:
            found[ns].append(int(entry))
    return found


def _ip_batch(commands: list[str]) -> None:
    """Run many `ip` commands in one process; failures (already gone) are ignored."""
    if commands:
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def lab_down(directory: str | Path) -> list[str]:
    """Remove every trace of the lab recorded in `directory`; return what was removed (and
    any pidfile PID left alone because it is not in the lab).

    Idempotent: anything already gone is skipped. Raises LabError only when no state exists.
    """
    directory = Path(directory).resolve()
    state = LabState.load(directory)
    removed: list[str] = []
    # 1. ssh control masters (processes the operator's ssh started for this lab)
    ssh_config = directory / "ssh_config"
    if ssh_config.exists():

        def close_master(host: LabHost) -> None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["ssh", "-F", str(ssh_config), "-O", "exit", host.name],
                    capture_output=True,
                    timeout=5,
                    check=False,
                )

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(close_master, state.hosts))
    # 2. every process inside the lab's namespaces (sshd, its sessions, the vpnd daemons)
    pids: list[int] = []
    for ns, found in pids_in_namespaces(state.namespaces).items():
        pids += found
        removed += [f"process {pid} in {ns}" for pid in found]
    # A pidfile is only a hint: its PID may since belong to anything. Only processes whose
    # network namespace is one of the lab's are signalled (checked again before SIGKILL).
    lab_ns = _namespace_ids(state.namespaces)

    def ours(pid: int) -> bool:
        return _netns_id(pid) in lab_ns

    removed += _stop_wan(state, ours)
    removed += _stop_containers(state)

    for pidfile in state.sshd_pidfiles:
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(pidfile).read_text().strip())
            if pid not in pids and pid_alive(pid) and not ours(pid):
                removed.append(f"left alone: pid {pid} from {pidfile} is not in the lab")
    kill_pids(sorted(set(pids)), ours=ours)
    # 3. namespaces (their veth ends and the WAN go with them) and root links
    existing = set(_run(["ip", "netns", "list"], check=False).split())
    gone_ns = [ns for ns in state.namespaces if ns in existing]
    gone_links = [link for link in state.root_links if Path(f"/sys/class/net/{link}").exists()]
    _ip_batch([f"netns del {ns}" for ns in gone_ns] + [f"link del {ln}" for ln in gone_links])
    removed += [f"namespace {ns}" for ns in gone_ns] + [f"link {ln}" for ln in gone_links]
    # 4. files
    if state.created_run_sshd and not _sshd_running():
        # sshd's privilege separation directory is shared by every sshd on the machine: another
        # lab's (or the system's) sshd would reset every new connection without it
        with contextlib.suppress(OSError):
            Path("/run/sshd").rmdir()
    if state.control_dir and state.control_dir != str(directory):
        shutil.rmtree(state.control_dir, ignore_errors=True)
    for host in state.hosts:  # never delete through an overlay still mounted
        if host.rootfs and os.path.ismount(host.rootfs):
            subprocess.run(["umount", "-l", host.rootfs], capture_output=True, check=False)
    if state.created_directory:
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"directory {directory}")
    else:
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        removed.append(f"contents of {directory}")
    return removed


def _sshd_running() -> bool:
    """True while any sshd runs on this machine (in any namespace): it needs ``/run/sshd``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "sshd":
                    return True
    return False


def _stop_containers(state: LabState) -> list[str]:
    """Power every container off at once (in parallel: each may take seconds), then remove
    their overlays and cgroups."""
    if not state.container_cgroups:
        return []

    def stop(host: LabHost) -> list[str]:
        cgroups = [Path(c) for c in state.container_cgroups.get(host.name, [])]
        try:
            return nspawn.stop_container(
                state.container_supervisors.get(host.name, 0), cgroups, Path(host.rootfs)
            )
        except (OSError, subprocess.SubprocessError) as exc:  # the rest of lab down goes on
            return [f"container {host.name}: not fully removed: {exc}"]

    hosts = [h for h in state.hosts if h.name in state.container_cgroups]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [item for items in pool.map(stop, hosts) for item in items]


def container_leader(state: LabState, host: str) -> int | None:
    """PID (as seen here) of a systemd lab host's init, None while its container is down."""
    cgroups = [Path(c) for c in state.container_cgroups.get(host, [])]
    if not cgroups:
        raise LabError(f"lab host {host!r} is not a systemd container (lab up --systemd)")
    return nspawn.leader_pid(cgroups)


def container_exec(
    state: LabState, host: str, *argv: str, timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a systemd lab host's container (its mounts, PIDs, systemd)."""
    leader = container_leader(state, host)
    if leader is None:
        raise LabError(f"lab host {host!r}: its container is not running")
    proc = subprocess.run(
        nspawn.exec_argv(leader, *argv),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise LabError(
            f"{host}: `{' '.join(argv)}` failed ({proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()}"
        )
    return proc


def lab_exec(state: LabState, host: str, *argv: str, timeout: float = 20.0) -> str:
    """Run a command inside a lab host's namespace (tests, demo); LabError on failure."""
    for candidate in state.hosts:
        if candidate.name == host:
            return _run(_ns(candidate.namespace, *argv), timeout=timeout)
    raise LabError(f"no lab host named {host!r}")


def iter_hosts(state: LabState, role: str | None = None) -> Iterator[LabHost]:
    """The lab's hosts, optionally only one role."""
    return (h for h in state.hosts if role is None or h.role == role)
