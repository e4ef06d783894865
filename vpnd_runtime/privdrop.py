"""Least privilege: after start-up vpnd runs as the ``user`` directive's account, keeping only the
two capabilities it still needs, with no way back.

Theory of operation
-------------------
vpnd needs root for a few things at start (the pidfile in a root-owned directory, the key file
root may be the only one to read, the log file) and only two rights afterwards:

* ``CAP_NET_ADMIN``: the TUN is created anew on every link up (``/dev/net/tun`` + ``TUNSETIFF``),
  then addressed, routed (netlink) and its IPv6 switched off (a net sysctl);
* ``CAP_NET_BIND_SERVICE``: the listener may bind port 379 (below 1024), also again after a
  SIGHUP that changes the port.

So :func:`run <vpnd_runtime.daemon.run>` calls, while still single-threaded:

1. :func:`prepare` (as root, before the pidfile is taken): resolve the account, create the status
   file's directory for it when missing (an existing one must already be writable by it);
2. :func:`drop` (after the key, the pidfile and the log file are open):

   a. keep capabilities across the uid change (``PR_SET_KEEPCAPS``);
   b. shrink the bounding set to the two (``PR_CAPBSET_DROP`` of every other: no exec, setuid
      binary or file capability can ever bring one back);
   c. supplementary groups of the account (``initgroups``: a ``dialout`` membership opens the
      serial device), then ``setresgid`` and ``setresuid`` (real, effective and saved ids: no
      way back to root);
   d. permitted = effective = inheritable = the two (``capset``), and raised in the *ambient* set
      so the hooks vpnd runs get exactly the same rights (see below);
   e. ``PR_SET_NO_NEW_PRIVS``: no exec (a hook, or anything it runs) can gain privileges, setuid
      root binaries such as sudo included;
   f. read back ``/proc/self/status`` and refuse to go on unless Uid, CapEff, CapPrm, CapBnd and
      NoNewPrivs are what was asked for; then check, as the user, that ``/dev/net/tun`` opens
      and the status directory (and the serial device) are writable, so a permission problem
      stops the start with a message naming the file rather than failing at the first link up.

Started as the account already (systemd's ``User=`` with ``AmbientCapabilities=``, the rendered
unit), there is no uid to change: vpnd lowers its sets to the two (it refuses to run without
``CAP_NET_ADMIN``), sets no_new_privs, and leaves the bounding set to the unit's
``CapabilityBoundingSet=`` (shrinking it needs ``CAP_SETPCAP``, which the unit does not grant).

Hooks (slipup, linkup, linkdown, slipdown) run as the same account with the same two
capabilities (ambient), no others, and no_new_privs: ``ip route``/``ip addr`` work in them,
``sudo`` and writing root's files do not. That is the documented choice (docs/directives.md).

Capabilities are per thread, and ``capset``/``prctl`` act on the calling thread only: the drop
refuses to run once a second thread exists (the daemon's hook thread starts after it).
Only ctypes and libc are used (``prctl``, ``capget``, ``capset``); no new dependency.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from typing import Any

from vpnd_runtime.config import Config

__all__ = [
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "KEEP",
    "Identity",
    "PrivDropError",
    "drop",
    "prepare",
]

log = logging.getLogger("vpnd.privdrop")

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
#: The capabilities vpnd keeps after the drop.
KEEP = (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE)
KEEP_MASK = sum(1 << cap for cap in KEEP)

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
TUN_DEVICE = "/dev/net/tun"


class PrivDropError(OSError):
    """The drop cannot be done (or did not give what was asked): ``str()`` names the config file
    and the directive, like a ConfigError, and says what to change."""

    def __init__(self, config: Config, directive: str, message: str) -> None:
        super().__init__(f"{config.source}: {directive}: {message}")


@dataclass(frozen=True)
class Identity:
    """The account vpnd switches to: name as written (for messages), uid, gid."""

    user: str
    uid: int
    gid: int
    #: True when the account has a passwd entry (so its supplementary groups can be looked up).
    known: bool = True


# ---------------------------------------------------------------------------------------------
# libc


@functools.cache
def _libc() -> tuple[Any, Any, Any, Any]:
    """(ctypes, libc, the capget header struct, the capget data struct), built on first use:
    only a daemon with ``user`` calls libc, and ctypes costs every other one ~0.4 MiB of RSS."""
    import ctypes  # noqa: PLC0415 - lazy: see above

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class CapData(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl.restype = ctypes.c_int
    return ctypes, libc, CapHeader, CapData


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    ctypes, libc, _, _ = _libc()
    if libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}): {os.strerror(err)}")


def _capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, as 64-bit masks."""
    ctypes, libc, cap_header, cap_data = _libc()
    header = cap_header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (cap_data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return tuple(  # type: ignore[return-value]
        getattr(data[0], name) | getattr(data[1], name) << 32
        for name in ("effective", "permitted", "inheritable")
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    ctypes, libc, cap_header, cap_data = _libc()
    header = cap_header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (cap_data * 2)()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 63


def proc_status() -> dict[str, str]:
    """This process's /proc/self/status as ``{field: value}`` (what the drop is checked by)."""
    with open("/proc/self/status") as fh:
        pairs = (line.split(":", 1) for line in fh if ":" in line)
        return {key: value.strip() for key, value in pairs}


# ---------------------------------------------------------------------------------------------
# The steps


def resolve(config: Config) -> Identity | None:
    """The account of ``user``/``group`` (None without ``user``); unknown names are refused.

    A numeric ``user`` without a passwd entry is allowed (its group is then ``group``, else the
    same number); uid 0 or gid 0 reached through another name is refused."""
    if config.user is None:
        return None
    name = config.user
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise PrivDropError(config, "user", f"no such user {name!r}") from None
        uid, gid, known = int(name), int(name), False
    else:
        uid, gid, known = entry.pw_uid, entry.pw_gid, True
    if config.group is not None:
        try:
            gid = int(config.group) if config.group.isdigit() else grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise PrivDropError(config, "group", f"no such group {config.group!r}") from None
    if uid == 0:
        raise PrivDropError(config, "user", f"{name!r} is uid 0 (root): name an unprivileged user")
    if gid == 0:
        raise PrivDropError(config, "group", f"the group of {name!r} is gid 0 (root's group)")
    return Identity(name if not known else entry.pw_name, uid, gid, known)


def prepare(config: Config) -> Identity | None:
    """Step 1, while still root: resolve the account and create the status directory for it.

    Call before the pidfile is taken (a pidfile beside the status file would otherwise create
    the directory as root). An existing directory is left as it is: :func:`drop` checks that
    the user can write it. Returns None when there is no ``user`` directive."""
    ident = resolve(config)
    if ident is None or os.geteuid() != 0:
        return ident
    directory = os.path.dirname(config.statusfile) or "."
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o755)
        os.chown(directory, ident.uid, ident.gid, follow_symlinks=False)
    return ident


def drop(config: Config, ident: Identity | None) -> None:
    """Step 2: become ``ident`` with only :data:`KEEP` and no_new_privs (module docs), verify it,
    and check what the daemon will open later. No-op when ``ident`` is None."""
    if ident is None:
        return
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise PrivDropError(config, "user", "cannot drop privileges once threads run (a bug)")
    euid = os.geteuid()
    if euid == 0:
        _switch(config, ident)
    elif euid == ident.uid:
        _narrow(config)
    else:
        raise PrivDropError(
            config,
            "user",
            f"vpnd runs as uid {euid}, neither root nor uid {ident.uid} ({ident.user}): "
            "start it as root or as that user",
        )
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _verify(config, ident, bounding_reduced=euid == 0)
    _check_access(config, ident)
    log.info(
        "running as %s (uid %d, gid %d) with CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only, "
        "no_new_privs",
        ident.user,
        ident.uid,
        ident.gid,
    )


def _switch(config: Config, ident: Identity) -> None:
    """Root -> the account: steps a-d of the module docs."""
    try:
        _prctl(_PR_SET_KEEPCAPS, 1)
        for cap in range(_last_cap() + 1):
            if cap not in KEEP:
                _prctl(_PR_CAPBSET_DROP, cap)
        if ident.known:
            os.initgroups(ident.user, ident.gid)
        else:
            os.setgroups([])
        os.setresgid(ident.gid, ident.gid, ident.gid)
        os.setresuid(ident.uid, ident.uid, ident.uid)
        _capset(KEEP_MASK, KEEP_MASK, KEEP_MASK)
        for cap in KEEP:
            _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)
        _prctl(_PR_SET_KEEPCAPS, 0)
    except OSError as exc:
        raise PrivDropError(config, "user", f"cannot switch to {ident.user}: {exc}") from None


def _narrow(config: Config) -> None:
    """Already the account (started by systemd with ``User=``): keep only KEEP."""
    _effective, permitted, _inheritable = _capget()
    if not permitted & (1 << CAP_NET_ADMIN):
        raise PrivDropError(
            config,
            "user",
            "started as this user without CAP_NET_ADMIN, which the TUN needs at every link up: "
            "grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE) or "
            "start vpnd as root",
        )
    keep = permitted & KEEP_MASK
    try:
        _capset(keep, keep, keep)
        for cap in KEEP:
            if keep & (1 << cap):
                _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)
    except OSError as exc:
        raise PrivDropError(config, "user", f"cannot lower capabilities: {exc}") from None


def _verify(config: Config, ident: Identity, *, bounding_reduced: bool) -> None:
    """Step f: the kernel's own account of this process must match what was asked for."""
    status = proc_status()
    wrong = []
    if status["Uid"].split() != [str(ident.uid)] * 4:
        wrong.append(f"Uid {status['Uid']}")
    if status["Gid"].split() != [str(ident.gid)] * 4:
        wrong.append(f"Gid {status['Gid']}")
    for name in ("CapEff", "CapPrm"):
        value = int(status[name], 16)
        if value & ~KEEP_MASK or not value & (1 << CAP_NET_ADMIN):
            wrong.append(f"{name} {status[name]}")
    bounding = int(status["CapBnd"], 16)
    if bounding & ~KEEP_MASK:
        if bounding_reduced:
            wrong.append(f"CapBnd {status['CapBnd']}")
        else:
            log.warning(
                "capability bounding set %s holds more than vpnd needs; the service manager "
                "should limit it (systemd: CapabilityBoundingSet=CAP_NET_ADMIN "
                "CAP_NET_BIND_SERVICE)",
                status["CapBnd"],
            )
    if status.get("NoNewPrivs") != "1":
        wrong.append(f"NoNewPrivs {status.get('NoNewPrivs')}")
    if wrong:
        raise PrivDropError(config, "user", "privileges not dropped as asked: " + ", ".join(wrong))


def _describe(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


def _check_access(config: Config, ident: Identity) -> None:
    """As the user: what the daemon opens later must work now, or the start fails naming it."""
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise PrivDropError(
            config,
            "user",
            f"user {ident.user} cannot open {TUN_DEVICE} ({exc.strerror}; {_describe(TUN_DEVICE)})"
            ": vpnd creates the TUN at every link up. Most systems give it mode 0666 (udev's "
            "default rule): chmod 0666 /dev/net/tun, or omit 'user'",
        ) from None
    directory = os.path.dirname(config.statusfile) or "."
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PrivDropError(
            config,
            "statusfile",
            f"user {ident.user} cannot write the status directory {directory} "
            f"({_describe(directory)}): chown it to {ident.user}, or remove it and vpnd "
            "creates it",
        )
    if config.is_serial and not os.access(config.server_host, os.R_OK | os.W_OK):
        raise PrivDropError(
            config,
            "server",
            f"user {ident.user} cannot open the serial device {config.server_host} "
            f"({_describe(config.server_host)}): add {ident.user} to the device's group "
            "(often dialout)",
        )
    for name, path in (("keyfile", config.keyfile), ("config", config.source)):
        if not os.access(path, os.R_OK):
            log.warning(
                "user %s cannot read the %s %s: SIGHUP will keep the running configuration "
                "(make it readable by %s to reload it)",
                ident.user,
                name,
                path,
                ident.user,
            )
