"""Run a command with its own /dev/net/tun node of a chosen mode (test hosts only).

A daemon that dropped to an unprivileged user opens /dev/net/tun at every link up, which needs the
node to be mode 0666 — what udev's default rule gives on ordinary hosts. Containers and CI images
often have a 0600 node (no udev). Rather than change the machine's device, a test runs the daemon
in a private mount namespace where a tmpfs over /dev/net holds a fresh node (same major/minor
10:200, so it is the real TUN driver) with the mode the test asks for.
"""

from __future__ import annotations

_SCRIPT = (
    "mount -t tmpfs -o mode=0755,size=16k vpndtest /dev/net && "
    'mknod -m "$0" /dev/net/tun c 10 200 && exec "$@"'
)


def with_tun_mode(mode: int, *argv: str) -> list[str]:
    """argv that runs `argv` seeing /dev/net/tun with `mode` (needs root, util-linux unshare)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, f"{mode:04o}",
            *argv]  # fmt: skip
