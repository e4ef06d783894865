"""vpnd's runtime. Importing it defers the standard modules a daemon never uses (lazyimport)."""

from vpnd_runtime.lazyimport import DEFERRED, defer

__version__ = "0.1.0"

for _name in DEFERRED:
    defer(_name)
