"""The only module that speaks SSH: the system OpenSSH client, one multiplexed connection per host.

Theory of operation
-------------------
Every remote action is ``ssh [options] -- DESTINATION COMMAND`` run by :class:`SshHost`: the
``--`` ends ssh's option parsing, so a destination can never be read as an option (the inventory
also refuses a host, user or jump host starting with ``-``; this is the second line of defence).
Using the system client means the operator's ``~/.ssh/config``, agent, known_hosts and
ProxyJump all apply.
Options added to whatever the operator configured:

* ``BatchMode=yes`` -- never prompt (a prompt would hang a parallel deploy);
* ``ConnectTimeout`` -- an unreachable host fails in bounded time;
* multiplexing -- ``ControlMaster=auto`` + ``ControlPersist`` + a ``ControlPath`` under
  ``~/.cache/vpnctl/cm`` unless the inventory's options name their own, so the first command to
  a host opens the connection and every later one (probe, apply, status polls) reuses it;
* ``-F FILE`` when the inventory host names an ssh config file (``Ssh.config``, if present).

Every call has a wall-clock timeout enforced here (the ssh child is killed when it expires), so a
host that stops answering mid-session cannot hold up the caller. Secrets (key files) are only
ever passed on stdin -- never in argv, which any local user can read from /proc.

Become: a host whose inventory says ``become: sudo`` (an ssh user that is not root) has every
command run as ``sudo -n -- sh -c COMMAND``: ``-n`` never prompts, so a sudo that wants a
password fails at once, and :class:`SshBecomeError` names the host and the user instead of a
deploy hanging or failing later with a permission error. stdin passes through sudo unchanged.

Exit status: ssh returns 255 for its own failures (connection, authentication, host key), else
the remote command's status. :class:`SshError` (a UserError) is raised for the former and for
timeouts; the latter is returned to the caller in :class:`RemoteResult`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vpnctl.inventory import UserError

__all__ = [
    "RemoteResult",
    "SshBecomeError",
    "SshError",
    "SshHost",
    "SshTimeout",
    "SshUnreachable",
    "quote",
]

SSH_FAILURE = 255
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CONTROL_PERSIST = 60


class SshError(UserError):
    """An ssh-level failure talking to `host` (the remote command never ran, or was cut off)."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class SshUnreachable(SshError):
    """The host did not accept the connection (down, filtered, authentication, host key)."""


class SshTimeout(SshError):
    """The remote command did not finish within its time bound."""


class SshBecomeError(SshError):
    """``become: sudo`` did not give root: sudo wants a password, refuses the user, or is
    missing on the host (the remote command never ran)."""


# What sudo -n (or the shell, for a missing sudo) prints when the command never ran.
_SUDO_FAILURE = re.compile(
    r"^(?:sudo: (?:a password is required|a terminal is required|.*is not in the sudoers"
    r"|.*not allowed to execute|.*may not run sudo|sorry, you must have a tty)"
    r"|.*\bsudo: (?:command )?not found)",
    re.MULTILINE,
)


@dataclass(frozen=True)
class RemoteResult:
    """What a remote command returned."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (replacement characters for anything else)."""
        return self.stdout.decode(errors="replace")

    @property
    def error_text(self) -> str:
        """stderr decoded, stripped: for messages."""
        return self.stderr.decode(errors="replace").strip()


class _SshSettings(Protocol):
    host: str
    port: int
    user: str
    identity: str | None
    options: tuple[str, ...]
    proxyjump: str | None


def quote(*words: str) -> str:
    """A shell command line from words, each quoted for the remote POSIX shell."""
    return " ".join(shlex.quote(w) for w in words)


def _default_control_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vpnctl" / "cm"


class SshHost:
    """One inventory host reached over ssh; cheap to create, safe to share between threads."""

    def __init__(
        self,
        name: str,
        settings: _SshSettings,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ssh_binary: str = "ssh",
    ) -> None:
        self.name = name
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.ssh_binary = ssh_binary

    def base_argv(self) -> list[str]:
        """ssh and its options, up to and including the destination."""
        s = self.settings
        argv = [self.ssh_binary]
        config = getattr(s, "config", None)
        if config:
            argv += ["-F", os.path.expanduser(config)]
        argv += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={max(1, round(self.connect_timeout))}",
        ]
        keys = {opt.split("=", 1)[0].strip().lower() for opt in s.options}
        if "controlmaster" not in keys and "controlpath" not in keys:
            control = _default_control_dir()
            control.mkdir(parents=True, exist_ok=True, mode=0o700)
            argv += [
                "-o", "ControlMaster=auto",
                "-o", f"ControlPath={control}/%C",
                "-o", f"ControlPersist={DEFAULT_CONTROL_PERSIST}",
            ]  # fmt: skip
        if "serveraliveinterval" not in keys:  # notice a dead multiplexed connection
            argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2"]
        for opt in s.options:
            argv += ["-o", opt]
        if s.identity:
            argv += ["-i", os.path.expanduser(s.identity)]
        for what, value in (("host", s.host), ("user", s.user), ("proxyjump", s.proxyjump)):
            if value is not None and not _safe_word(value):
                raise SshError(self.name, f"unsafe ssh {what} {value!r} (leading '-' or odd chars)")
        if s.proxyjump:
            argv += ["-J", s.proxyjump]
        argv += ["-p", str(s.port), "-l", s.user, "--", s.host]
        return argv

    def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float = 30.0,
        check: bool = False,
    ) -> RemoteResult:
        """Run `command` through the remote shell; bytes in `stdin` are its standard input.

        Raises SshUnreachable when ssh itself fails (exit 255 before the command ran),
        SshTimeout when the whole call exceeds `timeout` seconds, and SshError for a non-zero
        remote status when `check` is set.
        """
        become = getattr(self.settings, "become", None)
        if become == "sudo":
            command = f"sudo -n -- sh -c {shlex.quote(command)}"
        argv = [*self.base_argv(), command]
        try:
            proc = subprocess.run(
                argv,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SshTimeout(self.name, f"no answer within {timeout:.1f}s") from exc
        except FileNotFoundError as exc:
            raise SshError(
                self.name, f"{self.ssh_binary}: not found; install openssh-client"
            ) from exc
        result = RemoteResult(proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode == SSH_FAILURE and _is_ssh_failure(result.error_text):
            raise SshUnreachable(self.name, f"unreachable: {_last_line(result.error_text)}")
        if become == "sudo" and proc.returncode != 0 and not proc.stdout:
            failure = _SUDO_FAILURE.search(result.error_text)
            if failure:
                raise SshBecomeError(
                    self.name,
                    f"become: sudo failed for ssh user {self.settings.user!r} "
                    f"({failure.group(0).strip()}); give that user passwordless sudo "
                    "(NOPASSWD in sudoers) or connect as root",
                )
        if check and proc.returncode != 0:
            raise SshError(
                self.name,
                f"remote command failed ({proc.returncode}): {_last_line(result.error_text)}",
            )
        return result

    def close(self) -> None:
        """Ask the multiplexing master (if any) to exit; harmless when there is none."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError, SshError):
            subprocess.run(
                [*self.base_argv()[:-2], "-O", "exit", "--", self.settings.host],
                capture_output=True,
                timeout=5,
                check=False,
            )


_SAFE_WORD = re.compile(r"[A-Za-z0-9_.:@\[\],%+-]+")


def _safe_word(value: str) -> bool:
    """True when `value` cannot be taken for an ssh option (no leading '-', no odd characters)."""
    return bool(_SAFE_WORD.fullmatch(value)) and not any(
        part.startswith("-") or part.split("@")[-1].startswith("-") for part in value.split(",")
    )


def _is_ssh_failure(stderr: str) -> bool:
    """True when exit status 255 came from ssh itself rather than the remote command."""
    markers = (
        "ssh:",
        "Permission denied",
        "Host key verification failed",
        "Connection closed",
        "Connection timed out",
        "Connection refused",
        "No route to host",
        "kex_exchange_identification",
        "Could not resolve",
        "mux_client",
        "Control socket",
    )
    return any(m in stderr for m in markers) or not stderr


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
