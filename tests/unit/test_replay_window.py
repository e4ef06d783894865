"""The datagram replay window (session.ReplayWindow): each counter once, any order within 2,048."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vpnd_runtime.proto.session import REPLAY_WINDOW, ReplayWindow


def accept(w: ReplayWindow, c: int) -> bool:
    if w.check(c) is None:
        w.mark(c)
        return True
    return False


def test_in_order_replay_and_too_old() -> None:
    w = ReplayWindow()
    assert all(accept(w, c) for c in range(5000))
    assert not any(accept(w, c) for c in range(5000))
    assert w.check(4999) == "replay"
    assert w.check(5000 - REPLAY_WINDOW) == "replay"
    assert w.check(5000 - REPLAY_WINDOW - 1) == "too_old"


def test_jump_clears_the_window() -> None:
    w = ReplayWindow()
    accept(w, 10)
    assert accept(w, 10**9)
    assert accept(w, 10**9 - 1)  # never seen, inside the window after the jump
    assert not accept(w, 10)  # too old now
    assert accept(w, 10**9 - REPLAY_WINDOW + 1)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6000),
    spread=st.integers(0, 3000),
    dup=st.floats(0, 0.5),
    seed=st.integers(0, 2**32),
)
def test_matches_a_reference_set(n: int, spread: int, dup: float, seed: int) -> None:
    """Reordered, duplicated arrivals: the window accepts exactly what a set-based reference
    with the same rules accepts (new and within REPLAY_WINDOW of the highest seen)."""
    rng = random.Random(seed)
    arrivals = [c + rng.randint(0, spread) for c in range(n)]
    arrivals += [rng.choice(arrivals) for _ in range(int(n * dup))]
    rng.shuffle(arrivals)
    w = ReplayWindow()
    seen: set[int] = set()
    top = -1
    for c in arrivals:
        ok = c not in seen and (c > top or top - c < REPLAY_WINDOW)
        assert accept(w, c) == ok, c
        if ok:
            seen.add(c)
            top = max(top, c)
