"""What the runtime needs to run on every Python it is shipped to (3.9+), in one place.

vpnctl itself needs 3.11+, but the runtime (this package) is installed on the hosts a fleet
really has: Debian 11 and RHEL 9 ship Python 3.9, Ubuntu 22.04 ships 3.10. The rules for code in
``vpnd_runtime`` (checked by ruff with ``per-file-target-version`` and by
tests/unit/test_runtime_py39.py, which imports every module and runs ``vpnd --check`` under 3.9):

* ``X | Y`` only in annotations (strings under ``from __future__ import annotations``); type
  aliases use ``typing.Union``/``Optional``, ``isinstance`` takes a tuple.
* ``@dataclass(..., **SLOTS)`` / ``**KW_ONLY`` instead of ``slots=True`` / ``kw_only=True``
  (3.10+): on 3.10+ the class is exactly as before; on 3.9 it has a ``__dict__`` and takes
  positional arguments. A hot class whose fields have no defaults declares ``__slots__``
  itself instead, so it is slotted everywhere.
* No ``match``, ``zip(strict=)``, parenthesised context managers, ``int.bit_count``, or other
  3.10+ library calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: ``@dataclass(**SLOTS)``: ``slots=True`` where dataclasses support it (3.10+).
SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}

#: ``@dataclass(**KW_ONLY)``: ``kw_only=True`` where dataclasses support it (3.10+).
KW_ONLY: dict[str, Any] = {"kw_only": True} if sys.version_info >= (3, 10) else {}


def zlib_compress() -> Callable[[bytes, int, int], bytes]:
    """``zlib.compress(data, level, wbits)``: its `wbits` argument is new in 3.11; before that
    the same raw-deflate bytes come from a ``compressobj`` per call."""
    import zlib  # noqa: PLC0415 - lazy: only links with `compress` load it

    if sys.version_info >= (3, 11):
        return zlib.compress

    def compress(data: bytes, level: int, wbits: int) -> bytes:
        packer = zlib.compressobj(level, zlib.DEFLATED, wbits)
        return packer.compress(data) + packer.flush()

    return compress
