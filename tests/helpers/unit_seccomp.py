"""The rendered unit's SystemCallFilter= and RestrictAddressFamilies=, without systemd.

There is no running systemd on test machines, so the unit cannot be started for real. This
helper reads the unit file, asks ``systemd-analyze syscall-filter`` what its syscall groups hold
(the same tables systemd would use), and installs the equivalent seccomp filter with libseccomp
(ctypes; libseccomp ships with systemd): the allow-list minus the ``~`` groups, every other
syscall failing with the unit's SystemCallErrorNumber=, and socket() allowed only for the
unit's address families. Then it execs the rest of its command line, which inherits the filter.

Usage (as root, before dropping to the user)::

    python -m tests.helpers.unit_seccomp UNIT_FILE -- ARGV...
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from functools import cache

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ = 4


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@cache
def expand(name: str) -> frozenset[str]:
    """The syscalls of ``@group`` (recursively), or ``{name}`` for a plain syscall name."""
    if not name.startswith("@"):
        return frozenset({name})
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                         text=True, check=True, timeout=60).stdout  # fmt: skip
    found: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            found |= expand(word)
    return frozenset(found)


def unit_settings(unit_text: str) -> tuple[set[str], set[int], int]:
    """(allowed syscalls, allowed socket families, errno) as the unit's [Service] states them."""
    allowed: set[str] = set()
    denied: set[str] = set()
    families: set[int] = set()
    code = errno.EPERM
    for line in unit_text.splitlines():
        key, _, value = line.partition("=")
        if key == "SystemCallFilter":
            words = value.split()
            if value.startswith("~"):
                words[0] = words[0][1:]
                for word in words:
                    denied |= expand(word)
            else:
                for word in words:
                    allowed |= expand(word)
        elif key == "RestrictAddressFamilies":
            families |= {int(getattr(socket, name)) for name in value.split()}
        elif key == "SystemCallErrorNumber":
            code = int(getattr(errno, value))
    return allowed - denied, families, code


def install(allowed: set[str], families: set[int], code: int) -> None:
    """Load the filter into this process (root, or no_new_privs set)."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(_act_errno(code))
    if not ctx:
        raise OSError("seccomp_init failed")
    for name in sorted(allowed - {"socket"}):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not a syscall of this architecture
        if lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, number, 0, None) != 0:
            raise OSError(f"seccomp_rule_add {name}")
    if "socket" in allowed:
        number = lib.seccomp_syscall_resolve_name(b"socket")
        for family in sorted(families):
            cmp = (_ArgCmp * 1)(_ArgCmp(0, _SCMP_CMP_EQ, family, 0))
            if lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ALLOW, number, 1, cmp) != 0:
                raise OSError(f"seccomp_rule_add socket family {family}")
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load failed")


def main(argv: list[str]) -> None:
    """``UNIT_FILE -- ARGV...``: install the unit's filter, exec ARGV."""
    unit, sep, command = argv[0], argv[1], argv[2:]
    if sep != "--" or not command:
        sys.exit("usage: python -m tests.helpers.unit_seccomp UNIT_FILE -- ARGV...")
    with open(unit) as fh:
        install(*unit_settings(fh.read()))
    os.execvp(command[0], command)  # noqa: S606 - the test's own argv, no shell on purpose


if __name__ == "__main__":
    main(sys.argv[1:])
