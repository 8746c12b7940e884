"""A budget concurrent calls share (generate slots, pixels being decoded): a bounded wait for it, then a clear
RESOURCE_EXHAUSTED with a time to retry after, instead of piling work onto the server."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

from .errors import ResourceExhausted


class Budget:
    """`capacity` units (slots, pixels); `hold(amount)` waits while they are spent, with at most `queue` callers
    waiting and each for at most `wait_s`; beyond either it raises ResourceExhausted saying when to retry."""

    def __init__(self, capacity: float, *, queue: int, wait_s: float, what: str, settings: str):
        self.capacity, self.queue, self.wait_s = capacity, queue, wait_s
        # What is spent and which settings raise it, for the message: "Generate calls", "PERSONA_GENERATE_QUEUE".
        self.what, self.settings = what, settings
        self.used = 0.0
        self.waiting = 0
        self._changed = threading.Condition()
        # Seconds a hold lasted, smoothed: how long a caller turned away should wait before retrying.
        self._typical_s = 1.0

    def retry_after_s(self) -> float:
        with self._changed:
            return min(60.0, max(1.0, self._typical_s * (self.waiting + 1)))

    def _exhausted(self, why: str) -> ResourceExhausted:
        after = self.retry_after_s()
        error = ResourceExhausted(f"the server is busy ({why}; {self.settings} raise it): retry in {after:.0f} s "
                                  "(the persona SDK and persona-cli retry by themselves)")
        error.retry_after_s = after
        return error

    @contextlib.contextmanager
    def hold(self, amount: float = 1.0, is_active: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Holds `amount` (at most the capacity) for the `with` block. `is_active` False (the caller went away)
        stops the wait."""
        amount = min(amount, self.capacity)
        with self._changed:
            if self.used + amount > self.capacity:
                if self.waiting >= self.queue:
                    raise self._exhausted(f"{self.what}: all in use and {self.waiting} waiting")
                self.waiting += 1
                deadline = time.monotonic() + self.wait_s
                try:
                    while self.used + amount > self.capacity:
                        left = deadline - time.monotonic()
                        if left <= 0 or not is_active():
                            raise self._exhausted(f"{self.what}: none free within {self.wait_s:g} s")
                        self._changed.wait(min(left, 0.5))
                finally:
                    self.waiting -= 1
            self.used += amount
        started = time.monotonic()
        try:
            yield
        finally:
            with self._changed:
                self.used -= amount
                self._typical_s = 0.8 * self._typical_s + 0.2 * (time.monotonic() - started)
                self._changed.notify_all()
