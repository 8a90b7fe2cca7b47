"""Progress of long steps (feature caching, epochs, evaluation, export, calibration, engine build).

On a terminal: a live bar drawn by rich (a dependency of typer, so present wherever a reconad CLI runs),
with done/total, rate and ETA. Off a terminal (a service log, CI, ``nohup``): one plain line every
``interval`` seconds and one at the end, e.g. ``epoch 3/40: 27/54 batches (50%), 7.1 img/s, ETA 0:00:31``.
Quiet: nothing. Torch-free and dependency-free apart from rich (optional), so the Jetson runtime uses it.

The CLIs set the process-wide defaults once (``configure(quiet=...)``); the library code only opens
``Progress(...)`` where a step is long. ``RECONAD_PROGRESS_SECONDS`` overrides the plain-line interval.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

_SETTINGS = {"quiet": False, "interval": None, "live": None}
DEFAULT_INTERVAL_S = 10.0


def configure(quiet: bool | None = None, interval: float | None = None, live: bool | None = None) -> None:
    """Process-wide defaults: ``quiet`` (print nothing), ``interval`` (seconds between plain lines),
    ``live`` (force the terminal bar on/off; None = when stderr is a terminal). None leaves a setting."""
    for key, value in (("quiet", quiet), ("interval", interval), ("live", live)):
        if value is not None:
            _SETTINGS[key] = value


def is_quiet() -> bool:
    return bool(_SETTINGS["quiet"])


def note(message: str, stream: TextIO | None = None) -> None:
    """An informational line on stderr (e.g. "cached features of 480 images in 38 s"), unless quiet."""
    if not is_quiet():
        print(message, file=stream or sys.stderr, flush=True)


def _interval() -> float:
    if _SETTINGS["interval"] is not None:
        return float(_SETTINGS["interval"])
    try:
        return float(os.environ.get("RECONAD_PROGRESS_SECONDS", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (e.g. ``0:03:20``)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """done/total of one step. ``advance(n, **fields)`` after each piece; ``close(summary)`` at the end
    (or use it as a context manager). ``total`` None: an indeterminate step (elapsed time only);
    ``heartbeat()`` then keeps the lines coming while one blocking call (an engine build) runs.

    Args:
        description: what is running, e.g. ``"caching features"`` or ``"epoch 3/40"``.
        total: pieces to do (images, batches), or None.
        unit: the pieces' name in the lines (``"images"``, ``"batches"``).
        rate_unit / rate_scale: the rate shown, e.g. ``"img/s"`` with ``rate_scale`` images per piece.
        enabled: False prints nothing (e.g. on DDP ranks other than 0); quiet (``configure``) wins.
        stream: default stderr.
    """

    def __init__(self, description: str, total: int | None, unit: str = "items", rate_unit: str | None = None,
                 rate_scale: float = 1.0, enabled: bool = True, stream: TextIO | None = None):
        self.description, self.total, self.unit = description, total, unit
        self.rate_unit, self.rate_scale = rate_unit or f"{unit}/s", rate_scale
        self.stream = stream or sys.stderr
        self.enabled = enabled and not is_quiet()
        self.done, self.fields = 0, {}
        self.started = self.last_line = time.monotonic()
        self.interval = _interval()
        self._lock = threading.Lock()
        self._bar = self._task = None
        self._closed = False
        live = _SETTINGS["live"]
        if self.enabled and (live if live is not None else getattr(self.stream, "isatty", lambda: False)()):
            self._start_bar()

    def _start_bar(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn
        except ImportError:  # no rich: plain lines on the terminal too
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, console=Console(file=self.stream), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, info="")

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done * self.rate_scale / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if not self.total or not self.done:
            return None
        return elapsed / self.done * (self.total - self.done)

    def line(self) -> str:
        """The plain line for the current state."""
        elapsed = time.monotonic() - self.started
        if self.total is None:
            text = f"{self.description}: {format_seconds(elapsed)} elapsed"
        else:
            text = f"{self.description}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f}%)"
            if self.done:
                text += f", {self.rate():.1f} {self.rate_unit}"
            eta = self.eta_seconds()
            if eta is not None and self.done < self.total:
                text += f", ETA {format_seconds(eta)}"
        extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items())
        return f"{text}, {extra}" if extra else text

    def advance(self, n: int = 1, **fields) -> None:
        with self._lock:
            self.done += n
            self.fields.update(fields)
            if not self.enabled:
                return
            if self._bar is not None:
                info = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items())
                self._bar.update(self._task, completed=self.done, info=info)
            elif time.monotonic() - self.last_line >= self.interval and (self.total is None or self.done < self.total):
                self._print(self.line())

    def _print(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(text, file=self.stream, flush=True)

    def heartbeat(self) -> "_Heartbeat":
        """A context manager: while its block runs, the plain line (or the bar's clock) keeps coming."""
        return _Heartbeat(self)

    def close(self, summary: str | None = None) -> None:
        """End the step; ``summary`` (e.g. "loss 0.41, 7.2 img/s, 61 s") ends its last line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.enabled:
                return
            if self._bar is not None:
                self._bar.stop()
                if summary:
                    print(f"{self.description}: {summary}", file=self.stream, flush=True)
                return
            elapsed = format_seconds(time.monotonic() - self.started)
            done = f"{self.done}/{self.total} {self.unit}" if self.total is not None else "done"
            self._print(f"{self.description}: {summary or done} in {elapsed}" if summary is None
                        else f"{self.description}: {summary}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(f"stopped after {self.done}/{self.total} {self.unit}" if kind is not None else None)


class _Heartbeat:
    def __init__(self, progress: Progress):
        self.progress = progress
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period = min(1.0, self.progress.interval) if self.progress._bar is not None else self.progress.interval
        while not self.stop.wait(max(0.01, period)):
            with self.progress._lock:
                if self.progress._closed or not self.progress.enabled:
                    return
                if self.progress._bar is not None:
                    self.progress._bar.refresh()
                else:
                    self.progress._print(self.progress.line())

    def __enter__(self) -> Progress:
        self.thread.start()
        return self.progress

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
