"""The loop's background preprocessing: SCHED_IDLE workers, OpenCV single-threaded while a loop runs, and
an inference thread that never waits on a starved worker (line/preprocess.py)."""

import os
import sys
import threading
import time

import cv2
import numpy as np
import pytest

import reconad.runtime.line.preprocess as preprocess_module
from reconad.runtime.frames import prepare_image
from reconad.runtime.line.config import InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.preprocess import LATE_BOUNDS_S, LATE_FACTOR, FramePreparer
from tests.runtime.fakes import Collector, FakeInspector, ScriptedSource, gray_frame

FRAME = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is a Linux scheduling policy")
def test_workers_run_under_sched_idle_with_opencv_single_threaded_until_closed():
    cv2.setNumThreads(2)
    policies = []

    def policy_of_worker(image, colour):
        policies.append(os.sched_getscheduler(threading.get_native_id()))
        return prepare_image(image, (16, 16), colour=colour)

    with FramePreparer((16, 16), None, 2) as preparer:
        assert cv2.getNumThreads() == 1
        preparer.prepare = policy_of_worker
        preparer.submit(FRAME, "BGR").result(timeout=10)
        assert policies == [os.SCHED_IDLE] and preparer.priority == "idle"
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller keeps its own
    assert cv2.getNumThreads() == 2  # restored when the last loop closes

    with FramePreparer((16, 16), None, 1, background=False) as preparer:  # the old design, for comparison
        assert cv2.getNumThreads() == 2
        preparer.prepare = policy_of_worker
        preparer.submit(FRAME, "BGR").result(timeout=10)
        assert policies[-1] == os.SCHED_OTHER and preparer.priority is None


def test_a_frame_no_worker_has_started_is_prepared_on_the_calling_thread():
    release = threading.Event()
    try:
        with FramePreparer((16, 16), None, 1) as preparer:
            preparer.submit(FRAME, "BGR")  # occupies the only worker...
            preparer._executor.submit(release.wait, 3)  # ...and this keeps it busy
            future = preparer.submit(FRAME, "BGR")
            started = time.perf_counter()
            image = preparer.result(future, FRAME, "BGR")
            assert time.perf_counter() - started < LATE_BOUNDS_S[0] + 0.01  # no waiting on the worker
            np.testing.assert_array_equal(image, prepare_image(FRAME, (16, 16), colour="BGR"))
            assert preparer.inline == 1 and future.cancelled()
    finally:
        release.set()


def test_a_worker_that_started_but_is_late_is_not_waited_for(monkeypatch):
    original = preprocess_module.prepare_image
    release = threading.Event()

    def starved_on_workers(*args, **kwargs):
        if threading.current_thread().name.startswith("preprocess"):
            release.wait(5)  # a worker descheduled by another process's load
        return original(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "prepare_image", starved_on_workers)
    try:
        with FramePreparer((16, 16), (8, 8, 32, 24), 1) as preparer:
            future = preparer.submit(FRAME, "RGB")
            while not future.running():
                time.sleep(0.001)
            started = time.perf_counter()
            image = preparer.result(future, FRAME, "RGB")
            assert LATE_BOUNDS_S[1] <= time.perf_counter() - started < 1.0  # nothing timed yet: the upper bound
            np.testing.assert_array_equal(image, prepare_image(FRAME, (16, 16), roi=(8, 8, 32, 24)))
            assert preparer.late == 1 and preparer.inline == 0
    finally:
        release.set()


def test_a_started_preparation_is_waited_for_about_three_typical_durations():
    with FramePreparer((16, 16), None, 1) as preparer:
        assert preparer.late_after_s() == LATE_BOUNDS_S[1]  # nothing timed yet
        preparer._durations.extend([0.004] * 24 + [0.9] * 8)  # a quarter stretched by starvation: not typical
        assert preparer.late_after_s() == pytest.approx(LATE_FACTOR * 0.004)
        preparer._durations.extend([0.0001] * 32)
        assert preparer.late_after_s() == LATE_BOUNDS_S[0]
        preparer._durations.extend([0.2] * 32)  # a large frame on a slow CPU: waited for, up to the bound
        assert preparer.late_after_s() == LATE_BOUNDS_S[1]
        for _ in range(4):
            preparer.prepare(FRAME, "BGR")  # real preparations are timed
        assert preparer.late_after_s() == LATE_BOUNDS_S[1] and len(preparer._durations) == 32


def test_the_loop_inspects_every_frame_when_its_workers_never_run(monkeypatch):
    """Workers starved for the whole run (another process takes every core): the inference thread
    prepares each frame itself, in order, and nothing is lost."""
    release = threading.Event()
    monkeypatch.setattr(FramePreparer, "_start_worker", lambda self: release.wait(3))
    collector = Collector(queue_size=100)
    frames = [gray_frame(60 + n) for n in range(12)]
    started = time.perf_counter()
    try:
        config = InspectConfig(stats_interval_s=0, blind_checks="never", queue_size=2, preprocess_threads=2)
        result = run_inspection(ScriptedSource(frames, live=False), FakeInspector(), config, [collector],
                                report=lambda line: None, handle_signals=False)
    finally:
        release.set()
    assert time.perf_counter() - started < 2.0  # never waited for the starved workers
    assert result.exit_code == 0 and result.stats.counters["inspected"] == 12
    assert result.stats.counters["prepared_inline"] == 12  # counted, for summary.json and /metrics
    assert [item.index for item in collector.items] == list(range(12))
    assert cv2.getNumThreads() != 1 or os.cpu_count() == 1  # restored after the run
