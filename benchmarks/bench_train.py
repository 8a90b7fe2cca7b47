"""Training-step and evaluation images/s: explicit vs SDPA attention, lite0-256 and mvtec-512 (random weights, CPU).

One run, variants interleaved round by round. Training is ``train_one_epoch`` over cached features, as
``recon-train fit`` runs it (reconstructor forward with jitter and dropout, MSE, backward, gradient clipping,
AdamW); evaluation is ``predict``, the fused forward (uint8 images -> anomaly map and score) in eval mode.
Variants:

- ``today``: explicit attention (the export form) and glibc's default heap, as before issue 13;
- ``explicit``: explicit attention, freed memory kept in the heap (``retain_freed_memory``, as fit runs now);
- ``sdpa``: ``F.scaled_dot_product_attention``, heap kept: what ``fit`` and ``evaluate`` run now.

``today`` emulates the default heap in the same process: mmap for blocks above 32 MiB (glibc's steady state,
whose dynamic threshold stops there) and the heap trimmed, then one untimed step re-grows it for the others.
Speed-ups are medians of per-round ratios, which cancel slow drifts of a shared machine. Writes
benchmarks/results/bench_train.json and bench_train.md; ``--profile`` also writes torch.profiler tables
(by op, self CPU time) of one step of each variant to benchmarks/results/bench_train_profile.md.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--presets lite0-256 mvtec-512] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from reconad.model import PRESETS, build_detector
from reconad.model.transformer import explicit_attention
from reconad.train.config import TrainConfig
from reconad.train.evaluate import predict
from reconad.train.fit import DistributedContext, extract_all_features, train_one_epoch
from reconad.train.memory import retain_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"mvtec-512_train_speedup_vs_today_min": 1.8}
VARIANTS = ("today", "explicit", "sdpa")
# glibc mallopt parameters (malloc.h) and the steady state of its dynamic mmap threshold.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def default_heap() -> None:
    """glibc's default behaviour after warm-up: blocks above 32 MiB mmap'd per allocation, the heap trimmed."""
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, 65536)
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)
    libc.malloc_trim(0)


class Workload:
    """One preset: a random-weight detector, cached features and images, and the timed calls."""

    def __init__(self, preset: str, batch_size: int, train_batches: int, eval_batches: int):
        self.preset = preset
        config = PRESETS[preset]
        torch.manual_seed(0)
        self.detector = build_detector(config)  # random backbone (backbone_weights="none")
        generator = torch.Generator().manual_seed(0)
        count = batch_size * max(train_batches, eval_batches)
        self.images = torch.randint(0, 256, (count, *config.input_hw, 3), dtype=torch.uint8, generator=generator).numpy()
        features = extract_all_features(self.detector.eval(), self.images, batch_size, torch.device("cpu"))
        # A random backbone's deep stages come out ~1e-8; AdamW's squared gradients of such targets are
        # denormal floats, ~10x slower on a CPU. Unit RMS per channel, the scale of pretrained features.
        features = features / features.square().mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.features = features[: batch_size * train_batches].clone()
        self.images = self.images[: batch_size * eval_batches].copy()
        self.batch_size = batch_size
        self.train_config = TrainConfig(preset=preset, batch_size=batch_size, epochs=1000)
        self.context = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
        self.optimizer = torch.optim.AdamW(
            self.detector.reconstructor.parameters(), lr=self.train_config.learning_rate,
            weight_decay=self.train_config.weight_decay,
        )
        self.epoch = 0

    @contextlib.contextmanager
    def variant(self, name: str):
        if name == "today":
            default_heap()
        else:
            retain_freed_memory()
        with explicit_attention(self.detector) if name in ("today", "explicit") else contextlib.nullcontext():
            yield

    def train(self) -> tuple[float, float]:
        """One pass over the cached features (fit's own loop, its progress line discarded): images/s and
        process CPU seconds per image."""
        self.epoch += 1
        start = time.process_time()
        with contextlib.redirect_stderr(io.StringIO()):
            stats = train_one_epoch(self.detector, self.detector.reconstructor, self.features, self.optimizer,
                                    self.context, self.train_config, self.epoch)
        return stats["images_per_s"], (time.process_time() - start) / len(self.features)

    def evaluate(self) -> tuple[float, float]:
        """``predict`` over the images: images/s and process CPU seconds per image."""
        start, cpu_start = time.perf_counter(), time.process_time()
        predict(self.detector, self.images, self.batch_size, torch.device("cpu"))
        return len(self.images) / (time.perf_counter() - start), (time.process_time() - cpu_start) / len(self.images)


def measure(workload: Workload, rounds: int) -> dict:
    """images/s per phase and variant, rounds interleaved; an untimed call after each switch to ``today``."""
    rates = {phase: {name: [] for name in VARIANTS} for phase in ("train", "eval")}
    cpu = {phase: {name: [] for name in VARIANTS} for phase in ("train", "eval")}
    for phase, call in (("train", workload.train), ("eval", workload.evaluate)):
        for round_index in range(rounds):
            for name in VARIANTS:
                with workload.variant(name):
                    if round_index == 0 or name == "explicit":  # warm-up; the heap re-grows after "today"
                        call()
                    rate, cpu_s = call()
                rates[phase][name].append(rate)
                cpu[phase][name].append(cpu_s)
    return {"images_per_s": rates, "cpu_s_per_image": cpu}


def profile(workload: Workload) -> str:
    """torch.profiler tables (self CPU time by op) of one training pass and one evaluation per variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sections = []
    for phase, call in (("train", workload.train), ("eval", workload.evaluate)):
        for name in VARIANTS:
            with workload.variant(name):
                call()
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    call()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            sections.append(f"### {workload.preset}, {phase}, {name}\n\n```\n{table}\n```\n")
    return "\n".join(sections)


def summarize(measured: dict) -> dict:
    """Medians, and speed-ups as medians of per-round ratios (wall clock; CPU time as a cross-check that a
    busy machine affects less)."""
    summary = {}
    for phase, by_variant in measured["images_per_s"].items():
        cpu = measured["cpu_s_per_image"][phase]
        summary[phase] = {}
        for name, values in by_variant.items():
            summary[phase][name] = {
                "images_per_s_median": statistics.median(values),
                "images_per_s_all": values,
                "speedup_vs_today_median": statistics.median(v / t for v, t in zip(values, by_variant["today"])),
                "cpu_s_per_image_median": statistics.median(cpu[name]),
                "cpu_speedup_vs_today_median": statistics.median(t / v for v, t in zip(cpu[name], cpu["today"])),
            }
        summary[phase]["sdpa_vs_explicit_median"] = statistics.median(
            s / e for s, e in zip(by_variant["sdpa"], by_variant["explicit"])
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["lite0-256", "mvtec-512"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--train-batches", type=int, default=2, help="batches per timed training pass")
    parser.add_argument("--eval-batches", type=int, default=1, help="batches per timed evaluation")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler tables per variant")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    results, profiles = {}, []
    for preset in args.presets:
        workload = Workload(preset, args.batch_size, args.train_batches, args.eval_batches)
        results[preset] = summarize(measure(workload, args.rounds))
        if args.profile:
            profiles.append(profile(workload))
        del workload
    speedup = results.get("mvtec-512", {}).get("train", {}).get("sdpa", {}).get("speedup_vs_today_median")
    checks = {}
    if speedup is not None:
        checks["mvtec-512_train_speedup_vs_today"] = {
            "value": speedup, "passed": speedup >= TARGETS["mvtec-512_train_speedup_vs_today_min"],
        }
    meta = {
        "presets": args.presets,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "train_images_per_pass": args.batch_size * args.train_batches,
        "eval_images_per_pass": args.batch_size * args.eval_batches,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    result = {"meta": meta, "results": results, "targets": TARGETS, "checks": checks}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render_table(result)
    (RESULTS / "bench_train.md").write_text(table + "\n")
    if profiles:
        (RESULTS / "bench_train_profile.md").write_text("\n".join(profiles))
    print(table)


def render_table(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"batch {meta['batch_size']}, random weights, CPU, median of {meta['rounds']} interleaved rounds; "
        f"torch {meta['torch']} ({meta['torch_threads']} threads), {meta['cpu_count']} CPUs, "
        f"load average {meta['load_average_before'][0]:.1f} before, {meta['load_average_after'][0]:.1f} after",
        "",
        "| preset | phase | today: explicit, default heap (img/s) | explicit, heap kept (img/s) | SDPA, heap kept (img/s) "
        "| SDPA vs today | SDPA vs explicit | SDPA vs today, CPU time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, phases in result["results"].items():
        for phase, row in phases.items():
            cells = [preset, "training step" if phase == "train" else "evaluation (fused forward)"]
            cells += [f"{row[name]['images_per_s_median']:.2f}" for name in VARIANTS]
            cells += [f"{row['sdpa']['speedup_vs_today_median']:.2f}x", f"{row['sdpa_vs_explicit_median']:.2f}x",
                      f"{row['sdpa']['cpu_speedup_vs_today_median']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, check in result["checks"].items():
        lines.append(f"- {name}: {check['value']:.3g} (target {TARGETS[name + '_min']}; "
                     f"{'pass' if check['passed'] else 'FAIL'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
