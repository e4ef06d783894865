"""The C heap under a bulk data path: keep the pages a busy link reuses, give them back when idle.

A TCP link moves 64 KiB super-packets, and every one of them passes through fresh `bytes`
objects (the TUN read, the sealed frame, the carrier's batch); each is a glibc `malloc` of
64-256 KiB. With glibc's defaults a free chunk of that size at the top of the heap is given back
to the kernel at once (the trim threshold is 128 KiB, and moves only with the mmap threshold),
so the next allocation faults the same pages in again: measured ~24 minor page faults per
64 KiB super-packet at the sending end, about half of that daemon's CPU per byte
(`python -m bench.bench_tunnel`, issue 15). `tune()` raises the trim threshold so a busy link
keeps its working set, and fixes the mmap threshold above the largest buffer the data path
allocates (1 MiB; glibc would otherwise move it, and the trim threshold with it, on its own).
`trim()` gives free pages back (`malloc_trim(0)`), at start and once a link has gone idle, so
an idle daemon stays as small as before.

Both go through `_ctypes` alone (the ctypes package on top costs ~0.2 MiB of RSS for nothing
here) and are no-ops without glibc (musl has neither call).
"""

from __future__ import annotations

import os
import sys
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
#: Free memory the heap may keep at its top while a link is busy.
TRIM_THRESHOLD = 8 << 20
#: Allocations above this come from mmap: bigger than any buffer of the data path (TCP reads and
#: TUN batches are 256 KiB), so those stay on the heap and are reused.
MMAP_THRESHOLD = 1 << 20

_calls: dict[str, Any] = {}


def _libc(name: str) -> Any:
    """glibc's function `name`, called with plain ints, its result ignored (None: not there)."""
    if name in _calls:
        return _calls[name]
    fn: Any = None
    try:
        if "ctypes" in sys.modules:  # already loaded (privdrop, with `user`): use it
            fn = getattr(sys.modules["ctypes"].CDLL(None), name)
        else:
            import _ctypes  # noqa: PLC0415 - lazy: once, at start

            class Call(_ctypes.CFuncPtr):  # what ctypes.CDLL builds for a function: C, void
                _flags_ = _ctypes.FUNCFLAG_CDECL
                _restype_ = None

            class Libc:  # CFuncPtr((name, library)) looks the name up in library._handle
                _handle = _ctypes.dlopen(None, os.RTLD_NOW)

            fn = Call((name, Libc()))
    except (OSError, AttributeError, TypeError):  # not glibc, or _ctypes laid out otherwise
        fn = None
    _calls[name] = fn
    return fn


def trim() -> None:
    """Give the heap's free pages back to the kernel (`malloc_trim(0)`)."""
    fn = _libc("malloc_trim")
    if fn is not None:
        fn(0)


def tune() -> None:
    """Let a busy data path reuse its buffers' pages instead of faulting them in again."""
    fn = _libc("mallopt")
    if fn is not None:
        fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
