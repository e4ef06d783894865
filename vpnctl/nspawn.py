"""Lab hosts that boot a real systemd: ``systemd-nspawn -b`` on a cached minimal Debian rootfs.

Theory of operation
-------------------
``vpnctl lab up --systemd`` (:mod:`vpnctl.lab`) turns every lab host into a container:

* **One rootfs per machine and release, built once.** :func:`ensure_rootfs` runs ``debootstrap
  --variant=minbase`` (Debian bookworm by default, or bullseye/trixie for ``lab up --release``,
  with systemd, dbus, openssh-server, iproute2, python3: about a minute and 250-300 MB each)
  into :func:`rootfs_cache` -- ``$VPNCTL_ROOTFS_CACHE`` or
  ``/var/cache/vpnctl/rootfs`` -- under an exclusive ``flock``, so two labs started at once build
  it once. The directory name carries a hash of the recipe (suite, packages, the tweaks below):
  a changed recipe builds afresh. It is only marked complete after it was built whole.
  ``$VPNCTL_DEBIAN_MIRROR`` overrides debootstrap's mirror (default deb.debian.org).
* **Each host boots from an overlay** of that rootfs (``mount -t overlay``, its upper layer in
  the host's lab directory): hosts never write to the cache or to each other, and a host keeps
  what deploy installed across a reboot of its container.
* **Networking is the lab's own namespace**: ``--network-namespace-path=/run/netns/<ns>``, so
  the container has the host's ``mgmt0``/``wan0`` and its own sshd (the Debian ``ssh.service``
  under systemd, with a per-host ed25519 key and the lab operator key for root) listens there.
* **What vpnd needs**: ``--capability=CAP_NET_ADMIN`` (without it TUNSETIFF fails with EPERM)
  and ``/dev/net/tun``. The node bound in is a private one made in the host's lab directory,
  mode 0666 as udev makes it on a real Debian host, so the hardened unit's ``vpnd`` user can
  open it without touching this machine's ``/dev/net/tun``.
* **No systemd on the machine running the lab**: ``--register=no --keep-unit``, and
  ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` for a clean cgroup2 boot. nspawn puts its
  ``payload/`` and ``supervisor/`` cgroups below the cgroup it was started in, so every
  container is started from a cgroup of its own (``vpnlab-<tag>-<host>`` below ours): two
  containers never share one, and :func:`stop_container` removes the whole tree.
* **Reboot works**: a container that reboots makes nspawn exit with 133; the small supervisor
  shell (:func:`start_container`) then boots it again, as ``systemd-nspawn@.service`` would.
  SIGTERM to the supervisor powers the container off cleanly (nspawn sends SIGRTMIN+3 to its
  init).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

SUITE = "bookworm"  # the default release of a lab host
# Releases a lab host may boot (``lab up --release``), with the python3 each ships: the runtime
# is proven on the oldest Python it supports (bullseye's 3.9) beside the newer ones.
SUITES = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "python3")
# sshd for the lab: root by key only, one host key (written per host), enough sessions for
# vpnctl's multiplexed parallel steps.
SSHD_DROPIN = """\
# written by vpnctl (lab rootfs): root logs in with the lab operator key only
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
MaxSessions 100
MaxStartups 100:30:200
"""
RECIPE_VERSION = "1"  # bump when the tweaks in _finish_rootfs change
BUILD_TIMEOUT = 900.0
COMPLETE = ".vpnctl-complete"
STOP_TIMEOUT = 20.0
TUN_MAJOR, TUN_MINOR = 10, 200


class NspawnError(RuntimeError):
    """A container or the rootfs could not be built, booted or removed; the message says why."""


def tools_missing() -> list[str]:
    """The executables a systemd lab needs that are not installed (with their Debian package)."""
    need = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap",
            "nsenter": "util-linux", "mount": "mount"}  # fmt: skip
    return [
        f"{tool} (apt-get install {package})"
        for tool, package in need.items()
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
    ]


def rootfs_cache() -> Path:
    """Where built rootfs trees live: ``$VPNCTL_ROOTFS_CACHE`` or ``/var/cache/vpnctl/rootfs``."""
    return Path(os.environ.get("VPNCTL_ROOTFS_CACHE") or "/var/cache/vpnctl/rootfs")


def recipe_id(suite: str = SUITE) -> str:
    """Suite plus a short hash of the whole recipe: the cached tree's directory name."""
    recipe = "\n".join([suite, *PACKAGES, SSHD_DROPIN, RECIPE_VERSION])
    return f"{suite}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def ensure_rootfs(say: Callable[[str], None] | None = None, suite: str = SUITE) -> Path:
    """The cached rootfs of Debian `suite` (one of :data:`SUITES`), built first if missing
    (``say`` hears that a build starts and ends). Each suite is a tree of its own beside the
    others in the cache, with a lock of its own.

    Holds an exclusive flock on ``<cache>/<id>.lock`` while checking and building, so a second
    caller waits for the first build instead of racing it. A half-built tree (crash, Ctrl-C) is
    never marked complete and is rebuilt from scratch next time.
    """
    if suite not in SUITES:
        raise NspawnError(f"Debian release {suite!r}: the lab knows {', '.join(SUITES)}")
    cache = rootfs_cache()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / recipe_id(suite)
    with open(cache / f"{recipe_id(suite)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / COMPLETE).exists():
            return final
        if say:
            say(
                f"building the Debian {suite} rootfs for systemd lab hosts in {final} "
                "(debootstrap: once per machine, about a minute)..."
            )
        started = time.monotonic()
        partial = cache / f"{recipe_id(suite)}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                suite, str(partial)]  # fmt: skip
        mirror = os.environ.get("VPNCTL_DEBIAN_MIRROR")
        if mirror:
            argv.append(mirror)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
            )
        except FileNotFoundError as exc:
            raise NspawnError("debootstrap not found: apt-get install debootstrap") from exc
        except subprocess.TimeoutExpired as exc:
            raise NspawnError(f"`{' '.join(argv)}` timed out after {BUILD_TIMEOUT:.0f}s") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            log = partial / "debootstrap/debootstrap.log"
            raise NspawnError(f"`{' '.join(argv)}` failed ({proc.returncode}); see {log}:\n{tail}")
        _finish_rootfs(partial)
        os.rename(partial, final)
        (final / COMPLETE).write_text(f"{' '.join(argv)}\n")
        if say:
            say(f"rootfs built in {time.monotonic() - started:.0f}s")
        return final


def _finish_rootfs(root: Path) -> None:
    """Make the fresh tree a template: no machine id or ssh host keys of its own (each host
    gets its own at boot / from the lab), the lab's sshd settings, no package cache."""
    (root / "etc/machine-id").write_text("")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (root / "etc/ssh/sshd_config.d/vpnlab.conf").write_text(SSHD_DROPIN)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


# --- one container ---------------------------------------------------------------------------


def cgroup_dirs(name: str) -> list[Path]:
    """The cgroup directories a container started as `name` lives in: a child of our own
    cgroup in the unified hierarchy (and in the ``name=systemd`` one on a hybrid machine)."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        own[controllers] = path
    dirs = []
    unified = Path("/sys/fs/cgroup/unified")
    if (unified / "cgroup.procs").exists():  # hybrid: cgroup2 at .../unified, v1 beside it
        dirs.append(unified / own.get("", "/").lstrip("/") / name)
        named = Path("/sys/fs/cgroup/systemd")
        if "name=systemd" in own and (named / "cgroup.procs").exists():
            dirs.append(named / own["name=systemd"].lstrip("/") / name)
    else:
        dirs.append(Path("/sys/fs/cgroup") / own.get("", "/").lstrip("/") / name)
    return dirs


def prepare_root(
    rootfs: Path, hostdir: Path, *, hostname: str, host_key: Path, authorized_key: Path
) -> Path:
    """Mount the host's overlay of `rootfs` at ``hostdir/rootfs`` and write what is the
    host's own into it: hostname, ssh host key, the operator key for root, a 0666 TUN node."""
    upper, work, merged = hostdir / "upper", hostdir / "work", hostdir / "rootfs"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={rootfs},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)])
    (merged / "etc/hostname").write_text(hostname + "\n")
    ssh = merged / "etc/ssh"
    shutil.copyfile(host_key, ssh / "ssh_host_ed25519_key")
    os.chmod(ssh / "ssh_host_ed25519_key", 0o600)
    shutil.copyfile(f"{host_key}.pub", ssh / "ssh_host_ed25519_key.pub")
    dot_ssh = merged / "root/.ssh"
    dot_ssh.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(authorized_key, dot_ssh / "authorized_keys")
    os.chmod(dot_ssh / "authorized_keys", 0o600)
    tun = hostdir / "tun"
    if not tun.exists():
        os.mknod(tun, 0o666 | 0o020000, os.makedev(TUN_MAJOR, TUN_MINOR))
    os.chmod(tun, 0o666)  # noqa: S103 - as udev makes it on a real host; mknod honours umask
    return merged


def nspawn_argv(root: Path, machine: str, namespace: str, tun: Path) -> list[str]:
    """The systemd-nspawn command line that boots one lab host (see the module docstring)."""
    return [
        shutil.which("systemd-nspawn") or "systemd-nspawn",
        "--quiet", "--boot", f"--directory={root}", f"--machine={machine}",
        "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{namespace}",
        f"--bind={tun}:/dev/net/tun", "--capability=CAP_NET_ADMIN", "--console=pipe",
    ]  # fmt: skip


SUPERVISOR = """\
for cg in {cgroups}; do echo $$ > "$cg/cgroup.procs" || exit 90; done
stopping=0 child=
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
while :; do
  echo "== vpnctl: booting {machine} at $(date -u +%FT%TZ)"
  SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 {argv} </dev/null &
  child=$!
  rc=0; wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done
  echo "== vpnctl: nspawn exited $rc"
  if [ "$stopping" = 0 ] && [ "$rc" = 133 ]; then continue; fi
  exit "$rc"
done
"""


def start_container(  # noqa: PLR0917 - one container's whole description
    root: Path, machine: str, namespace: str, tun: Path, cgroups: list[Path], log: Path
) -> int:
    """Boot the container in the background under a supervisor that boots it again when it
    reboots; return the supervisor's PID. The supervisor and nspawn live in `cgroups`."""
    for cg in cgroups:
        cg.mkdir(parents=False, exist_ok=True)
    script = SUPERVISOR.format(
        cgroups=" ".join(shlex.quote(str(c)) for c in cgroups),
        machine=shlex.quote(machine),
        argv=shlex.join(nspawn_argv(root, machine, namespace, tun)),
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script, f"vpnlab-supervisor-{machine}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def cgroup_pids(cgroups: list[Path]) -> list[int]:
    """Every PID in the cgroup trees (the supervisor, nspawn, the container's processes)."""
    pids: set[int] = set()
    for top in cgroups:
        for sub in _cgroup_tree(top):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (sub / "cgroup.procs").read_text().split())
    return sorted(pids)


def _cgroup_tree(top: Path) -> list[Path]:
    """Every cgroup directory below and including `top`, deepest first. cgroups come and go
    while a container runs or stops: one that vanished during the walk is skipped."""
    found = [Path(root) for root, _dirs, _files in os.walk(top)]  # os.walk ignores errors
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def leader_pid(cgroups: list[Path]) -> int | None:
    """The container's PID 1 (its systemd) as seen from here, None while it is not booted."""
    for top in cgroups:
        procs = top / "payload" / "init.scope" / "cgroup.procs"
        with contextlib.suppress(OSError, ValueError):
            pids = [int(p) for p in procs.read_text().split()]
            for pid in pids:
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:"))
                    if nspid.split()[-1] == "1":
                        return pid
    return None


def exec_argv(leader: int, *argv: str) -> list[str]:
    """A command line that runs `argv` inside the container whose PID 1 is `leader`."""
    return ["nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "-C", "--", *argv]


def stop_container(
    supervisor: int, cgroups: list[Path], merged: Path, timeout: float = STOP_TIMEOUT
) -> list[str]:
    """Power the container off (SIGTERM to its supervisor), SIGKILL what is left in its
    cgroups after `timeout`, unmount its overlay and remove its cgroup trees (nspawn leaves
    ``payload/`` and ``supervisor/`` behind). Idempotent; returns what it removed."""
    removed: list[str] = []
    pids = cgroup_pids(cgroups)
    if supervisor in pids:  # only signal the PID while it is still in our cgroup
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        removed.append(f"container supervisor {supervisor}")
    deadline = time.monotonic() + timeout
    while cgroup_pids(cgroups) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in cgroup_pids(cgroups):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"container process {pid} (killed)")
    deadline = time.monotonic() + 5
    while cgroup_pids(cgroups) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.ismount(merged):
        proc = subprocess.run(["umount", str(merged)], capture_output=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)
        removed.append(f"overlay {merged}")
    for top in cgroups:
        if top.is_dir():
            for sub in _cgroup_tree(top):  # deepest first: a cgroup is removed by rmdir, empty
                with contextlib.suppress(OSError):
                    sub.rmdir()
            removed.append(f"cgroup {top}")
    return removed


def _run(argv: list[str], timeout: float = 30.0) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise NspawnError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
