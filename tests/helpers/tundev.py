"""Run a command with its own /dev/net/tun node of a chosen mode (test hosts only).

A daemon that dropped to an unprivileged user opens /dev/net/tun at every link up, which needs the
node to be mode 0666 — what udev's default rule gives on ordinary hosts. Containers and CI images
often have a 0600 node (no udev). Rather than change the machine's device, a test runs the daemon
in a private mount namespace where a tmpfs over /dev/net holds a fresh node (same major/minor
10:200, so it is the real TUN driver) with the mode the test asks for.
"""

from __future__ import annotations

import shlex

_SCRIPT = (
    "mount -t tmpfs -o mode=0755,size=16k vpndtest /dev/net && "
    'mknod -m "$0" /dev/net/tun c 10 200 && {setup}exec "$@"'
)


def with_tun_mode(mode: int, *argv: str, read_only_except: str | None = None) -> list[str]:
    """argv that runs `argv` seeing /dev/net/tun with `mode` (needs root, util-linux unshare).

    With `read_only_except`, the root file system is read-only in that mount namespace except
    that one directory (/proc, /sys, /dev stay as they are): systemd's ProtectSystem=strict with
    ReadWritePaths= (or RuntimeDirectory=), which the rendered unit uses."""
    setup = ""
    if read_only_except is not None:
        keep = shlex.quote(read_only_except)
        setup = f"mount --bind {keep} {keep} && mount -o remount,bind,ro / && "
    script = _SCRIPT.replace("{setup}", setup)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, f"{mode:04o}",
            *argv]  # fmt: skip
