"""io/poller.py keeps the selectors semantics the daemon, dialer and acceptor rely on."""

from __future__ import annotations

import select
import selectors
import socket

import pytest

from vpnd_runtime.io.poller import EVENT_READ, EVENT_WRITE, Poller, mask_of


def _noop(mask: int, now: float) -> None:
    pass


def test_register_modify_unregister_follow_selectors() -> None:
    p = Poller()
    a, b = socket.socketpair()
    try:
        p.register(a, EVENT_READ, _noop)
        with pytest.raises(KeyError):
            p.register(a.fileno(), EVENT_READ, _noop)  # the fd, however it is named
        assert p.get_key(a).events == EVENT_READ and p.get_key(a).data is _noop
        assert p.select(0) == []
        b.send(b"x")
        [(key, mask)] = p.select(0)
        assert (key.fd, mask, key.data) == (a.fileno(), EVENT_READ, _noop)

        def other(mask: int, now: float) -> None:
            pass

        p.modify(a, EVENT_READ | EVENT_WRITE, other)
        assert p.callbacks[a.fileno()] is other
        assert {k.fd: m for k, m in p.select(0)} == {a.fileno(): EVENT_READ | EVENT_WRITE}
        with pytest.raises(ValueError):
            p.modify(a, 0, other)
        a.close()  # fileno() is -1 now: still unregistered by the object itself
        p.unregister(a)
        with pytest.raises(KeyError):
            p.unregister(a)
        assert not p.callbacks and not p.events
    finally:
        a.close()
        b.close()
        p.close()


@pytest.mark.parametrize(
    ("ev", "registered", "mask"),
    [
        (select.EPOLLIN, EVENT_READ, EVENT_READ),
        (select.EPOLLOUT, EVENT_WRITE, EVENT_WRITE),
        (select.EPOLLIN | select.EPOLLOUT, EVENT_READ | EVENT_WRITE, EVENT_READ | EVENT_WRITE),
        (select.EPOLLERR, EVENT_READ, EVENT_READ),  # an error wakes a reader...
        (select.EPOLLHUP, EVENT_WRITE, EVENT_WRITE),  # ...and a writer, as selectors says
        (select.EPOLLIN | select.EPOLLHUP, EVENT_READ | EVENT_WRITE, EVENT_READ | EVENT_WRITE),
    ],
)
def test_masks_translate_as_selectors_does(ev: int, registered: int, mask: int) -> None:
    assert mask_of(ev, registered) == mask
    assert selectors.EVENT_READ == select.EPOLLIN  # the loop's shortcut for the common case
