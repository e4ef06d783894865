"""Files whose content decides what root (or the daemon's user) runs: only their owner may write.

The config file, the hook scripts (slipup/slipdown/linkup/linkdown) and the modemchat file are
executed or obeyed with the daemon's rights. If anyone else can write one of them, that someone
can run code as the daemon. So each is refused when it is group- or other-writable, or owned by
someone other than root or the user vpnd runs as at that moment. The message names the path and
the mode (or owner) and says how to fix it.

Why not the ``user`` directive's account as well: a config or hook that account may edit would
let it choose, at the next start as root, what root runs (drop ``user``, add a hook). While vpnd
already runs as that user (after the drop, or started as it by systemd's ``User=``), "the current
user" is that account, so its own files are accepted then, and that gains it nothing.

Checked are the file itself (symlinks followed), not the directories above it.
"""

from __future__ import annotations

import os
import stat

__all__ = ["UntrustedFileError", "check_trusted", "untrusted_reason"]


class UntrustedFileError(PermissionError):
    """A file others could have written; ``path`` names it, the message says what is wrong."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def untrusted_reason(info: os.stat_result, path: str, what: str) -> str | None:
    """Why the file described by ``info`` must not be trusted, or None when it may be."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        return f"{what} is writable by {who} (mode {mode:04o}); run chmod go-w {path}"
    if info.st_uid not in (0, os.geteuid()):
        return (
            f"{what} is owned by uid {info.st_uid}, not by root or the user vpnd runs as "
            f"(uid {os.geteuid()}); run chown root {path}"
        )
    return None


def check_trusted(path: str, what: str) -> None:
    """Raise :class:`UntrustedFileError` unless ``path`` may be trusted (see the module doc).

    A missing file raises FileNotFoundError (an OSError), as ``os.stat`` does.
    """
    reason = untrusted_reason(os.stat(path), path, what)
    if reason is not None:
        raise UntrustedFileError(path, reason)
