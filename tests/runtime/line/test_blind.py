"""Camera-blind checks: the thresholds on synthetic frames, and the loop raising them to every sink."""

import json

import numpy as np
import pytest

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.blind import BlindConfig, BlindDetector, gray_sample
from reconad.runtime.line.config import InspectConfig
from reconad.runtime.line.loop import run_inspection
from reconad.runtime.line.session import build_sinks
from reconad.runtime.line.sinks import CameraBlind, InspectionResult
from tests.runtime.fakes import Collector, FakeInspector, ScriptedSource


def scene(seed=0, level=110, noise=12, hw=(120, 160)):
    """A textured BGR frame with sensor noise: what a seeing camera delivers."""
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.integers(-noise, noise + 1, (*hw, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (np.zeros((120, 160, 3), np.uint8), "black"),
        (scene(level=12, noise=8), "black"),  # a lens cap: sensor noise in the dark
        (np.full((120, 160, 3), 250, np.uint8), "saturated"),
        (np.full((120, 160, 3), (90, 140, 200), np.uint8), "flat"),  # one colour: a capture card without signal
        (scene(level=128, noise=2), "flat"),
    ],
)
def test_blind_frames_are_named(frame, reason):
    blindness = BlindDetector().check(frame, 0.0)
    assert blindness is not None and blindness.reason == reason and blindness.episode_start


def test_a_few_hot_pixels_or_an_overlay_do_not_hide_a_black_frame():
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:8, :120] = 255  # a timestamp overlay: under 1 % of the frame
    assert BlindDetector().check(frame, 0.0).reason == "black"


@pytest.mark.parametrize(
    "frame",
    [scene(), scene(level=40, noise=20), scene(level=215, noise=20), np.tile(np.arange(256, dtype=np.uint8), (64, 1))],
)
def test_seeing_frames_are_not_blind(frame):
    assert BlindDetector().check(frame, 0.0) is None


def test_a_frozen_camera_is_found_after_frozen_s_and_a_noisy_static_scene_never_is():
    detector = BlindDetector(BlindConfig(frozen_s=1.0))
    stuck = scene(seed=1)
    outcomes = [detector.check(stuck, t * 0.1) for t in range(20)]  # 10 fps, the same buffer again and again
    assert all(outcome is None for outcome in outcomes[:10])  # under 1 s of repeats
    frozen = [outcome for outcome in outcomes[10:] if outcome is not None]
    assert len(frozen) == 10 and all(o.reason == "frozen" for o in frozen)
    assert frozen[0].episode_start and not any(o.episode_start for o in frozen[1:])
    assert detector.check(scene(seed=2), 2.0) is None  # it moves again
    static = BlindDetector(BlindConfig(frozen_s=1.0))
    assert all(static.check(scene(seed=seed), seed * 0.1) is None for seed in range(40))  # noise differs per frame
    detector.reset()
    assert detector.check(stuck, 5.0) is None


def test_thresholds_are_validated_and_the_grid_is_small():
    with pytest.raises(ReconadError, match="gray level"):
        BlindConfig(black_level=300)
    assert gray_sample(np.zeros((2160, 3840, 3), np.uint8)).size <= 65536 * 1.1


def test_the_loop_raises_camera_blind_to_every_sink_and_counts_it(tmp_path):
    script = [scene(seed=n) for n in range(3)] + [np.zeros((120, 160, 3), np.uint8)] * 4 + [scene(seed=9)]
    script += [np.full((120, 160, 3), 252, np.uint8)]
    config = InspectConfig(out=tmp_path, overlays="none", stats_interval_s=0, queue_size=100)
    collector = Collector(queue_size=100)
    sinks = [*build_sinks(config, None), collector]
    result = run_inspection(ScriptedSource(script), FakeInspector(), config, sinks, report=lambda line: None,
                            handle_signals=False)
    counters = result.stats.counters
    assert counters["inspected"] == 4 and counters["blind"] == 5
    assert counters["blind_black"] == 4 and counters["blind_saturated"] == 1
    events = [item for item in collector.items if isinstance(item, CameraBlind)]
    assert [e.episode_start for e in events] == [True, False, False, False, True]
    assert [item.index for item in collector.items if isinstance(item, InspectionResult)] == [0, 1, 2, 3]
    lines = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    blind_lines = [line for line in lines if "camera_blind" in line]
    assert [line["camera_blind"] for line in blind_lines] == ["black"] * 4 + ["saturated"]
    assert "is camera-blind (black)" in blind_lines[0]["error"] and "black <= 30" in blind_lines[0]["error"]
    assert "5 camera-blind (4 black, 1 saturated)" in result.stats.status_line()
    assert "5 camera-blind" in result.headline()


def test_folders_are_not_checked_unless_asked():
    frames = [np.zeros((24, 32, 3), np.uint8)] * 2
    quiet = dict(stats_interval_s=0, queue_size=10)
    files = run_inspection(ScriptedSource(frames, live=False), FakeInspector(), InspectConfig(**quiet),
                           report=lambda line: None, handle_signals=False)
    assert files.stats.counters["inspected"] == 2 and files.stats.counters["blind"] == 0
    checked = run_inspection(ScriptedSource(frames, live=False), FakeInspector(),
                             InspectConfig(blind_checks="always", **quiet), report=lambda line: None,
                             handle_signals=False)
    assert checked.stats.counters["blind"] == 2


def test_the_roi_is_what_is_checked():
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[56:64, 76:84] = scene(hw=(8, 8), level=180)  # a small lit part on a black belt: 0.3 % of the frame
    quiet = dict(stats_interval_s=0, queue_size=10, blind=BlindConfig(frozen_s=0))

    def run(**config):
        return run_inspection(ScriptedSource([frame] * 3), FakeInspector(), InspectConfig(**quiet, **config),
                              report=lambda line: None, handle_signals=False).stats.counters

    whole = run()
    assert whole["blind_black"] == 3 and whole["inspected"] == 0  # under 1 % lit: the frame looks black
    around = run(roi=(70, 50, 20, 20))  # 16 % of the ROI is the part
    assert around["inspected"] == 3 and around["blind"] == 0
