"""Bounded queues between the loop's threads: a full queue drops its oldest item (live) or waits (files)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any


class DropOldestQueue:
    """A bounded FIFO: a full queue drops its oldest item to take a new one (``put``) or waits (``put_wait``).

    ``close`` ends it: getters receive what is left, then None. ``on_drop`` is called with every item
    that ``put`` or ``clear`` throws away.
    """

    def __init__(self, maxsize: int, on_drop: Callable[[Any], None] | None = None) -> None:
        self.maxsize = maxsize
        self._on_drop = on_drop
        self._items: collections.deque[Any] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False

    def put(self, item: Any) -> int:
        """Add ``item``; returns how many items were dropped to make room (0 or 1)."""
        with self._condition:
            dropped = 0
            if len(self._items) >= self.maxsize:
                oldest = self._items.popleft()
                if self._on_drop is not None:
                    self._on_drop(oldest)
                dropped = 1
            self._items.append(item)
            self._condition.notify_all()
            return dropped

    def put_wait(self, item: Any, stop: threading.Event) -> bool:
        """Add ``item`` once there is room (back-pressure for files); False if ``stop`` is set first."""
        with self._condition:
            while len(self._items) >= self.maxsize:
                if stop.is_set() or self._closed:
                    return False
                self._condition.wait(0.05)
            self._items.append(item)
            self._condition.notify_all()
            return True

    def get_batch(self, max_items: int, timeout_s: float) -> list[Any] | None:
        """Up to ``max_items`` items, waiting at most ``timeout_s`` for the first; [] on timeout, None when
        closed and empty."""
        with self._condition:
            if not self._items and not self._closed:
                self._condition.wait(timeout_s)
            if not self._items:
                return None if self._closed else []
            count = min(max_items, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
            self._condition.notify_all()
            return batch

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def clear(self) -> int:
        """Drop every waiting item; returns how many."""
        with self._condition:
            count = len(self._items)
            if self._on_drop is not None:
                for item in self._items:
                    self._on_drop(item)
            self._items.clear()
            self._condition.notify_all()
            return count

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)
