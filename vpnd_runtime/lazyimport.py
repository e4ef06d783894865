"""Standard modules a daemon imports but never uses, loaded on first use instead (issue 15).

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``opcode``: ~0.5 MiB of a
running daemon's RSS) for one call, ``inspect.signature``, made only for a dataclass without a
docstring; ``logging`` imports ``traceback`` (with ``linecache``, ``tokenize``) to format
exceptions. :func:`defer` puts a stand-in module in ``sys.modules``: ``import inspect``
binds the stand-in, and the first attribute read from it imports the real module (unchanged,
from then on in ``sys.modules``) and answers from it. A module already imported is left alone.

Not ``importlib.util.LazyLoader``: on Python 3.11 the ``import`` statement itself reads the
module's ``__spec__``, which makes a LazyLoader module load at once.
"""

from __future__ import annotations

import _thread
import importlib
import importlib.util
import sys
import types
from typing import Any

#: Deferred when vpnd_runtime is imported: ``inspect`` (dataclasses), ``traceback`` (logging:
#: formatting an exception), ``array`` (socket: passing file descriptors).
DEFERRED = ("inspect", "traceback", "array")

#: One first load at a time (a thread may log an exception while another does).
_LOCK = _thread.allocate_lock()


class _Deferred(types.ModuleType):
    """Stands in for a module until an attribute of it (other than the import machinery's
    ``__spec__``/``__name__``...) is read; then imports it and takes on its namespace."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        with _LOCK:
            if sys.modules.get(name) is self:
                del sys.modules[name]
                try:
                    real = importlib.import_module(name)
                except BaseException:
                    sys.modules[name] = self
                    raise
            else:  # loaded meanwhile (by another thread, or imported by other means)
                real = importlib.import_module(name)
            self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer(name: str) -> None:
    """Make ``import name`` give a stand-in that imports the module on first attribute read."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stub = _Deferred(name)
    stub.__spec__ = spec
    sys.modules[name] = stub
