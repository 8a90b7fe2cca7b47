"""Where the loop's status lines and warnings go: stderr, with recurring faults rate-limited."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

WARNING_INTERVAL_S = 30.0  # a recurring fault (corrupt frames, a failing sink) is reported at most this often


def report_stderr(message: str) -> None:
    """Print one status or warning line on stderr, flushed."""
    print(message, file=sys.stderr, flush=True)


class RateLimitedReporter:
    """Reports a recurring fault at most once per ``WARNING_INTERVAL_S``, with how often it recurred."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time reported, occurrences since)

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            reported_at, since = self._last.get(key, (None, 0))
            if reported_at is not None and now - reported_at < WARNING_INTERVAL_S:
                self._last[key] = (reported_at, since + 1)
                return
            self._last[key] = (now, 0)
        self._report(message + (f" ({since} more since the last report)" if since else ""))
