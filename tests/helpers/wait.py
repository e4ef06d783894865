"""The one bounded wait every test uses: poll a condition, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    condition: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.05
) -> T:
    """Return the first truthy value of `condition()`; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = min(interval, 0.001)
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f} s waiting for {what} (last: {value!r})"
            )
        time.sleep(delay)  # a bounded poll step, growing to `interval`
        delay = min(interval, delay * 2)
