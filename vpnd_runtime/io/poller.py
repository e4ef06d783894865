"""The daemon's readiness primitive: epoll, called directly, with the `selectors` API around it.

Why not `selectors.DefaultSelector`: its `select()` is several layers of Python per wake-up (the
timeout rounding, a SelectorKey lookup per ready fd through a mapping view, a new list of
(key, mask) pairs, and the caller's namedtuple reads). On an idle link every one of those is cold
memory when a lone packet arrives (issue 15: a cache line first touched after ~10 ms idle costs
DRAM latency on this kind of VM), so each layer is paid by every ping. `Poller` keeps exactly the
API the daemon, dialer and acceptor use (`register`, `modify`, `unregister`, `get_key`, `close`,
masks of `selectors.EVENT_READ` / `EVENT_WRITE`, a callback as `data`), but keeps each fd's
callback in a plain dict: the loop calls `poller.epoll.poll()` itself and dispatches with one dict
lookup per ready fd (`Daemon._turn`).

Semantics kept from `selectors`: registering an fd twice or unregistering an unknown one raises
KeyError; a closed socket can still be unregistered by the object it was registered with; the
mask handed to a callback is `EVENT_READ` for input, `EVENT_WRITE` for output, both for an error
or hang-up, restricted to the events the fd is registered for (`mask_of`). One difference, on
purpose: a callback is looked up when its fd's turn comes, not when the wait returned, so an fd
unregistered by an earlier callback of the same turn is skipped rather than called stale.
"""

from __future__ import annotations

import contextlib
import select
import selectors
from collections.abc import Callable
from typing import Any

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT

#: How the epoll object is made (bench/latency_probe.py wraps it to time the wake-ups).
_epoll: Callable[[], Any] = select.epoll

Callback = Callable[[int, float], None]


def _fileno(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"invalid file object {fileobj!r}")
    return fd


def _epoll_events(events: int) -> int:
    if not events or events & ~(EVENT_READ | EVENT_WRITE):
        raise ValueError(f"invalid events: {events!r}")
    return (EPOLLIN if events & EVENT_READ else 0) | (EPOLLOUT if events & EVENT_WRITE else 0)


def mask_of(ev: int, registered: int) -> int:
    """The selectors-style mask for epoll's `ev` on an fd registered for `registered`."""
    mask = (EVENT_WRITE if ev & ~EPOLLIN else 0) | (EVENT_READ if ev & ~EPOLLOUT else 0)
    return mask & registered


class Poller:
    """epoll with per-fd callbacks; see the module docstring."""

    def __init__(self) -> None:
        self.epoll = _epoll()
        #: fd -> the callback `register`/`modify` gave (the loop reads this dict directly).
        self.callbacks: dict[int, Callback] = {}
        #: fd -> the selectors mask it is registered for.
        self.events: dict[int, int] = {}
        self._fileobjs: dict[int, Any] = {}

    def _lookup(self, fileobj: Any) -> int:
        try:
            return _fileno(fileobj)
        except ValueError:
            # A closed socket (fileno -1): find it by the object it was registered with.
            for fd, obj in self._fileobjs.items():
                if obj is fileobj:
                    return fd
            raise KeyError(f"{fileobj!r} is not registered") from None

    def register(self, fileobj: Any, events: int, data: Callback) -> None:
        """Watch `fileobj` for `events`; `data(mask, now)` runs when it is ready."""
        fd = _fileno(fileobj)
        if fd in self.callbacks:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        self.epoll.register(fd, _epoll_events(events))
        self.callbacks[fd] = data
        self.events[fd] = events
        self._fileobjs[fd] = fileobj

    def unregister(self, fileobj: Any) -> None:
        """Stop watching `fileobj` (KeyError when it is not watched)."""
        fd = self._lookup(fileobj)
        if fd not in self.callbacks:
            raise KeyError(f"{fileobj!r} is not registered")
        del self.callbacks[fd], self.events[fd], self._fileobjs[fd]
        with contextlib.suppress(OSError):  # already closed: the kernel forgot it
            self.epoll.unregister(fd)

    def modify(self, fileobj: Any, events: int, data: Callback) -> None:
        """Watch a registered `fileobj` for other `events`, with callback `data`."""
        fd = self._lookup(fileobj)
        if fd not in self.callbacks:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != self.events[fd]:
            self.epoll.modify(fd, _epoll_events(events))
            self.events[fd] = events
        self.callbacks[fd] = data

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        """The registration of `fileobj`, as selectors returns it."""
        fd = self._lookup(fileobj)
        if fd not in self.callbacks:
            raise KeyError(f"{fileobj!r} is not registered")
        return selectors.SelectorKey(self._fileobjs[fd], fd, self.events[fd], self.callbacks[fd])

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """selectors-style wait (tests and tools; the daemon's loop polls `epoll` itself)."""
        ready = []
        for fd, ev in self.epoll.poll(-1 if timeout is None else max(0.0, timeout)):
            if fd in self.callbacks:
                mask = mask_of(ev, self.events[fd])
                if mask:
                    ready.append((self.get_key(fd), mask))
        return ready

    def close(self) -> None:
        """Close the epoll fd and forget every registration."""
        self.epoll.close()
        self.callbacks.clear()
        self.events.clear()
        self._fileobjs.clear()
