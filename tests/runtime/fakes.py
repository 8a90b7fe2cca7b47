"""Test doubles for the inspection loop: an inspector without a model, scripted live sources, frame writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.inspector import Verdict
from reconad.runtime.line.sources import FrameSource, RawFrame, SourceLostError


class FakeInspector:
    """Score = mean pixel / 255, anomalous at or above ``threshold``; optional delay, failure or hang.

    Args:
        delay_s: sleep per ``inspect`` call (a slow model).
        fail_on_call: raise RuntimeError on this call number (1 = the warm-up call).
        hang: when set, calls after the warm-up block until the event is set.
    """

    def __init__(self, input_hw=(16, 16), threshold=0.5, delay_s=0.0, fail_on_call=None, hang=None, unknown_above=None):
        self.input_hw = input_hw
        self.threshold = threshold
        self.unknown_above = unknown_above  # scores above this are UNKNOWN parts (unlike every category)
        self.delay_s = delay_s
        self.fail_on_call = fail_on_call
        self.hang = hang
        self.calls = 0
        self.batch_sizes: list[int] = []

    def inspect(self, frames: np.ndarray) -> list[Verdict]:
        self.calls += 1
        assert frames.dtype == np.uint8 and frames.shape[1:] == (*self.input_hw, 3), frames.shape
        if self.calls == self.fail_on_call:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.hang is not None and self.calls > 1:
            self.hang.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batch_sizes.append(len(frames))
        verdicts = []
        for image in frames:
            score = float(image.mean() / 255.0)
            unknown = self.unknown_above is not None and score > self.unknown_above
            verdicts.append(
                Verdict(
                    image_score=score,
                    is_anomalous=None if unknown else score >= self.threshold,
                    threshold=self.threshold,
                    anomaly_map=image.mean(axis=2).astype(np.float32) / 255.0,
                    is_unknown=unknown,
                )
            )
        return verdicts


class ScriptedSource(FrameSource):
    """A live source replaying a script; each step is an image, an exception to raise, or a callable.

    ``open_failures`` makes that many ``open`` calls after the first one fail (a camera that is gone for
    a while); ``interval_s`` paces frames like a camera. After the script: end of stream (None), which a
    real camera never gives but keeps tests finite.
    """

    colour = "BGR"

    def __init__(self, script: Iterable, *, live=True, open_failures=0, interval_s=0.0, uri="fake://camera"):
        self.uri = uri
        self.live = live
        self._script = list(script)
        self._position = 0
        self._open_failures = open_failures
        self.opens = 0
        self.closes = 0
        self.interval_s = interval_s
        self._is_open = False

    def open(self) -> None:
        self.opens += 1
        if self.opens > 1 and self._open_failures > 0:
            self._open_failures -= 1
            raise ReconadError(f"Cannot open {self.uri}: no such device.")
        self._is_open = True

    def read(self) -> RawFrame | None:
        if not self._is_open:
            raise SourceLostError(f"{self.uri} is not open.")
        if self.interval_s:
            time.sleep(self.interval_s)
        if self._position >= len(self._script):
            return None
        step = self._script[self._position]
        self._position += 1
        if isinstance(step, BaseException):
            if isinstance(step, SourceLostError):
                self._is_open = False
            raise step
        if callable(step):
            return step()
        return RawFrame(step, f"{self.uri}#{self._position}")

    def close(self) -> None:
        self.closes += 1
        self._is_open = False

    @property
    def is_open(self) -> bool:
        return self._is_open


def gray_frame(level: int, hw=(24, 32)) -> np.ndarray:
    """A noisy BGR frame around ``level`` (never blank)."""
    rng = np.random.default_rng(level)
    noise = rng.integers(-8, 9, size=(*hw, 3))
    return np.clip(level + noise, 0, 255).astype(np.uint8)


def write_image_folder(folder: Path, levels: Iterable[int], hw=(24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, level in enumerate(levels):
        path = folder / f"{index:04d}.png"
        cv2.imwrite(str(path), gray_frame(level, hw))
        paths.append(path)
    return paths


def write_video(path: Path, frames: list[np.ndarray], fps=10.0) -> Path:
    """An MJPG .avi (OpenCV's always-available encoder)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def wait_for(condition: Callable[[], bool], timeout_s=10.0, interval_s=0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


class Collector:
    """A sink keeping what it receives; ``delay_s`` makes it slow."""

    def __init__(self, name="collector", queue_size=4, delay_s=0.0, accept=lambda result: True):
        self.name = name
        self.queue_size = queue_size
        self.delay_s = delay_s
        self._accept = accept
        self.items: list = []
        self.closed = threading.Event()

    def accepts(self, result) -> bool:
        return self._accept(result)

    def write(self, result) -> bool:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.items.append(result)
        return True

    def close(self) -> None:
        self.closed.set()

