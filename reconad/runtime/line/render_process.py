"""Video outputs rendered and encoded in a child process, so drawing and encoding never share the
interpreter lock, nor a CPU priority, with inference.

In one process the render thread holds the interpreter lock for its Python and numpy steps; lowered in
priority (``SinkWorker``), it is preempted while holding it and the inference thread then waits for a
thread the scheduler keeps off the CPU (a priority inversion). A child process has its own interpreter
and runs under Linux's SCHED_IDLE policy (``sched(7)``): it gets a core only when no normal thread wants
it, and a waking inference thread preempts it at once. Nice 19 alone is not enough: ONNX Runtime's
thread pool wakes its workers for every parallel operator, and each wake-up then waits behind the
low-priority child for up to a scheduler slice (measured with benchmarks/bench_loop.py --render-modes).

The parent's sink sends each accepted result over a pipe: the result without its frame (pickled; the
anomaly map is small), then the frame's bytes straight from the array (``send_bytes``: no pickling copy,
the write releases the lock); the child renders it with ``VideoOutputSink`` and answers with the outputs'
state. ``write`` waits for that answer on the sink's own thread, so ``SinkWorker``'s drop-oldest queue,
counters and error reports work as for any sink. The child ignores SIGINT (the loop stops it with the
run), and ends when the pipe closes: a parent that is killed leaves its files named partial, as before.
Written with the standard library's ``multiprocessing`` (spawn: the parent runs threads); no shared-memory
segments, which a crash would leak in /dev/shm.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.priority import background_thread
from reconad.runtime.line.video_sink import OutputRateLimit, Scale

START_TIMEOUT_S = 60.0  # spawning imports numpy and OpenCV and opens every output
CLOSE_TIMEOUT_S = 30.0  # finishing a file or an RTSP server


@dataclasses.dataclass(frozen=True)
class OutputState:
    """What the parent knows of one output in the child: ``uri``, ``frames_written``, for an RTSP output
    the ``url`` clients open and the ``note`` on who can reach it, and ``failed`` once the render process
    is gone (what ``summary.json`` reports)."""

    uri: str
    frames_written: int = 0
    url: str | None = None
    note: str | None = None
    failed: str | None = None  # why the output stopped (the render process ended), else None


def _state(sink: Any) -> dict[str, Any]:
    return {
        "wants_frames": any(getattr(output, "wants_frames", True) for output in sink.outputs),
        "outputs": [OutputState(output.uri, output.frames_written, getattr(output, "url", None),
                                getattr(output, "note", None)) for output in sink.outputs],
        "render_ms": sink.render_ms,
    }


def _name_process(name: bytes) -> None:
    """Give the child the name ``ps -o comm``, ``top`` and ``pgrep`` show (Linux prctl PR_SET_NAME)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (AttributeError, OSError):
        pass  # not Linux: the child keeps the interpreter's name


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Ignore SIGINT while the child is spawned: an ignored signal stays ignored across exec and Python
    then installs no handler of its own, so a Ctrl-C during the child's imports cannot print its
    traceback (the parent handles Ctrl-C and stops the child). Only the main thread may change it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _serve(connection: Any, uris: Sequence[str], fps: float, idle: bool, options: dict[str, Any]) -> None:
    """The child: open the outputs, then render each frame it is sent until told to close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    background_thread(idle)  # the child's main thread; the threads OpenCV and FFmpeg start inherit it
    _name_process(b"reconad-render")
    from reconad.runtime.frames import import_cv2
    from reconad.runtime.line.outputs import open_outputs
    from reconad.runtime.line.sinks import describe_error
    from reconad.runtime.line.video_sink import VideoOutputSink

    # One frame at a time on one thread: OpenCV's pool would wake a thread per core for every resize and
    # blend, each wake-up preempting inference somewhere (the render only has idle cycles to use anyway).
    import_cv2().setNumThreads(1)

    try:
        sink = VideoOutputSink(open_outputs(uris, fps=fps), **options)
    except Exception as error:  # noqa: BLE001 - every failure goes back as one sentence
        connection.send(("error", describe_error(error), None))
        return
    connection.send(("ok", None, _state(sink)))
    buffer = bytearray()
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):  # the parent is gone: leave files partial, as a killed run does
            os._exit(1)
        kind = message[0]
        if kind == "close":
            try:
                sink.close()
                connection.send(("ok", None, _state(sink)))
            except Exception as error:  # noqa: BLE001
                connection.send(("error", describe_error(error), _state(sink)))
            return
        if kind == "poll":
            connection.send(("ok", None, _state(sink)))
            continue
        _, result, shape, dtype = message
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(buffer) != size:
            buffer = bytearray(size)
        connection.recv_bytes_into(buffer)
        frame = np.frombuffer(buffer, dtype=dtype).reshape(shape)
        try:
            written = sink.write(dataclasses.replace(result, frame=frame))
            connection.send(("ok", written, _state(sink)))
        except Exception as error:  # noqa: BLE001 - the parent counts it; the child goes on
            connection.send(("error", describe_error(error), _state(sink)))


class RenderProcessSink(OutputRateLimit):
    """``VideoOutputSink``'s job with the drawing and encoding in a child process (see the module).

    Args:
        uris: the ``--output`` URIs; opened in the child (``ReconadError`` here when one cannot be).
        fps: the outputs' frame rate.
        low, high, pixel_threshold, scales: as for ``VideoOutputSink``.
        max_fps: as for ``VideoOutputSink`` (a live source renders at most at the outputs' rate).
        idle: run the child under Linux's SCHED_IDLE policy (the default); False: nice 19 only.

    Raises:
        ReconadError: an output cannot be opened, or the child does not start within a minute.
    """

    name = "video"
    heavy = False  # its thread only hands frames over (GIL-bound, short); niced, it would hold the GIL while descheduled
    needs_frames = True

    def __init__(self, uris: Sequence[str], *, fps: float = 30.0, low: float | None = None,
                 high: float | None = None, pixel_threshold: float | None = None,
                 scales: Mapping[str, Scale] | None = None, queue_size: int = 2,
                 max_fps: float | None = None, idle: bool = True) -> None:
        super().__init__(max_fps)
        self.queue_size = queue_size
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        options = {"low": low, "high": high, "pixel_threshold": pixel_threshold, "scales": dict(scales or {})}
        self._process = context.Process(target=_serve, args=(child_end, list(uris), fps, idle, options),
                                        name="reconad-render", daemon=True)
        with _ctrl_c_ignored():
            self._process.start()
        child_end.close()
        self._state: dict[str, Any] = {"wants_frames": True, "outputs": [OutputState(uri) for uri in uris],
                                       "render_ms": 0.0}
        self._closed = False
        try:
            status, message, _ = self._answer(START_TIMEOUT_S, "start")
            if status != "ok":
                raise ReconadError(message if message.endswith(".") else f"{message}.")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        """End the child (it has been told to close, or it failed) and free the pipe and its handle."""
        self._closed = True
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._connection.close()
        self._process.close()

    @property
    def outputs(self) -> list[OutputState]:
        """The outputs' last known state (uri, frames written, RTSP url)."""
        return list(self._state["outputs"])

    @property
    def render_ms(self) -> float:
        """The child's last render's duration."""
        return float(self._state["render_ms"])

    def _answer(self, timeout_s: float, doing: str) -> tuple[str, Any, Any]:
        if not self._connection.poll(timeout_s):
            self._process.kill()
            raise ReconadError(f"The video output process did not {doing} within {timeout_s:.0f} s; it was stopped.")
        try:
            status, value, state = self._connection.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise self._ended() from None
        if state is not None:
            self._state = state
        return status, value, state

    def _ended(self) -> ReconadError:
        """The child is gone: every output is marked failed (``summary.json`` says so) and the error
        that says it, once per write, so the run's warnings and sink error count show it."""
        why = f"the video output process ended unexpectedly (exit code {self._process.exitcode})"
        self._state["outputs"] = [dataclasses.replace(state, failed=why) for state in self._state["outputs"]]
        return ReconadError(f"{why[0].upper()}{why[1:]}; the video outputs stopped.")

    def write(self, result: Any) -> bool:
        if self._closed:
            raise ReconadError("The video outputs are closed.")
        if not self._process.is_alive():
            raise self._ended()
        if not self._state["wants_frames"]:  # e.g. RTSP nobody watches: ask whether that changed
            self._connection.send(("poll",))
            self._answer(CLOSE_TIMEOUT_S, "answer")
            if not self._state["wants_frames"]:
                return False
        frame = np.ascontiguousarray(result.frame)
        try:
            self._connection.send(("frame", dataclasses.replace(result, frame=None), frame.shape, frame.dtype.str))
            self._connection.send_bytes(memoryview(frame).cast("B"))
        except OSError:  # a broken pipe: the child is gone
            self._process.join(5)
            raise self._ended() from None
        status, value, _ = self._answer(CLOSE_TIMEOUT_S, "render a frame")
        if status != "ok":
            raise ReconadError(value)
        return bool(value)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._process.is_alive():
                raise ReconadError(f"The video output process ended early (exit code {self._process.exitcode}).")
            self._connection.send(("close",))
            status, value, _ = self._answer(CLOSE_TIMEOUT_S, "close its outputs")
            if status != "ok":
                raise ReconadError(value)
        finally:
            self._release()
