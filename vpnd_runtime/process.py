"""vpnd as a process: logging, the pidfile, detaching, and `run` (what `vpnd -f CONF` calls)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys

from vpnd_runtime import heap, privdrop
from vpnd_runtime.config import Config

log = logging.getLogger("vpnd")


# --------------------------------------------------------------------- process management
def _setup_logging(config: Config, daemon: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    tag = f"vpnd[{config.interface}]"
    if daemon and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # noqa: PLC0415 - lazy: ~0.5 MB, detached only

        handler: logging.Handler = SysLogHandler(
            address="/dev/log", facility=SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter(f"{tag}: %(message)s"))
    elif daemon:
        logpath = log_path(config)
        os.makedirs(os.path.dirname(logpath) or ".", exist_ok=True)
        handler = logging.FileHandler(logpath)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s: %(message)s"))
    root.addHandler(handler)


def log_path(config: Config) -> str:
    """Where a detached daemon logs when there is no syslog socket: beside its status file."""
    base = config.statusfile
    for suffix in (".json", ".status"):
        base = base.removesuffix(suffix)
    return base + ".log"


def write_pidfile(path: str) -> int:
    """Take the pidfile: a file holding our PID, flock'ed and kept open while we run.

    A second vpnd on the same pidfile finds the lock held and refuses (no check-then-create race);
    a stale file, whose process is gone and its lock with it, is simply taken over.
    Returns the fd to hand to `remove_pidfile`.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:  # O_NOFOLLOW: a symlink planted at the pidfile's name never makes us write its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, f"pidfile {path} is a symlink; refusing to follow it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        old = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(errno.EEXIST, f"pidfile {path}: vpnd already running as pid {old}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def remove_pidfile(path: str, fd: int) -> None:
    """Delete the pidfile (still locked by us, so still ours) and release it. After a drop to
    `user` the directory may be root's: the file then stays, unlocked, i.e. stale (harmless)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        os.unlink(path)
    os.close(fd)


def _daemonize() -> int:
    """Detach the vpnd way (fork, setsid, fork); returns the write end of a readiness pipe.

    The original process waits on the pipe and exits 0 when the daemon reports it started, or 1
    with the daemon's error message, so `vpnd --daemon` fails loudly when the link cannot start.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        if msg.startswith(b"ok"):
            os._exit(0)
        sys.stderr.write(
            (msg.decode(errors="replace") or "vpnd: daemon died while starting") + "\n"
        )
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return w


def run(config: Config, daemonize: bool = False, verbose: bool = False) -> int:
    """`vpnd -f CONF`: load the keys, optionally detach, serve the link; returns the exit code.

    The keys are loaded before detaching, so a bad key file fails `vpnd --daemon` at once.
    """
    from vpnd_runtime.daemon import Daemon  # noqa: PLC0415 — the heavy part
    from vpnd_runtime.session import load_table  # noqa: PLC0415

    table = load_table(config)
    ready_fd = _daemonize() if daemonize else -1
    _setup_logging(config, daemonize, verbose)

    def ready(error: str | None) -> None:
        if error is None:
            release_startup_memory()
        if ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ok" if error is None else f"vpnd: {error}".encode())
                os.close(ready_fd)

    pid_fd = -1
    try:
        if config.user is not None:
            preload(config)  # after the drop the interpreter's own files may be unreadable
        ident = privdrop.prepare(config)  # `user`: resolve it, make its status directory
        if config.pidfile:
            pid_fd = write_pidfile(config.pidfile)
        privdrop.drop(config, ident)  # from here: that user, CAP_NET_ADMIN + CAP_NET_BIND_SERVICE
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        ready(str(exc.strerror or exc))
        if config.pidfile and pid_fd >= 0:
            remove_pidfile(config.pidfile, pid_fd)
        return 1
    try:
        return Daemon(config, table).run(ready)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        ready(str(exc))
        return 1
    finally:
        if config.pidfile and pid_fd >= 0:
            remove_pidfile(config.pidfile, pid_fd)


def release_startup_memory() -> None:
    """Give back the C heap's free pages once the daemon has started (issue 15), then set the
    heap up for the data path (heap.py: a busy link keeps its buffers' pages).

    Start-up leaves holes in glibc's heap: every module's .pyc is read whole into a buffer that
    is freed once unmarshalled, and the config, key and sockets leave temporaries behind. glibc
    only ever returns the top of its heap to the kernel; ``malloc_trim(0)`` also releases the
    free pages inside it (~1.4 MiB of RSS here). The pages stay free (nothing is moved or
    paged out): a daemon that allocates again gets fresh zero pages. No-op without glibc."""
    heap.trim()
    heap.tune()


def preload(config: Config) -> None:
    """Import now what this config will need later (hooks, compression, a serial line, the
    hints of a config error on SIGHUP). The runtime imports these lazily to stay small; but once
    vpnd runs as `user`, the Python installation may not be readable by that account (a root-only
    prefix), and a lazy import would fail in the middle of a link up."""
    import difflib  # noqa: F401, PLC0415
    import importlib  # noqa: PLC0415

    wanted = []
    if any((config.linkup, config.linkdown, config.slipup, config.slipdown)):
        wanted.append("subprocess")
    if config.compress:
        wanted.append("zlib")
    if config.is_serial:
        wanted += ["serial", "vpnd_runtime.io.serial", "vpnd_runtime.proto.slip"]
        if config.modemchat:
            wanted.append("vpnd_runtime.io.chat")
    for name in wanted:
        importlib.import_module(name)
