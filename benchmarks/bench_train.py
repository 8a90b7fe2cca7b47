"""Training-step and evaluation images/s, the attention before and after issue 13 side by side (random weights, CPU).

One run, variants interleaved round by round, each measurement in a fresh process (glibc's heap state
carries over inside a process, and the variants' peaks would add up). Training is ``train_one_epoch`` over
cached features, as ``recon-train fit`` runs it (reconstructor forward with jitter and dropout, MSE,
backward, gradient clipping, AdamW); evaluation is ``predict``, the fused forward (uint8 images -> anomaly
map and score) in eval mode. Variants:

- ``today``: the attention before issue 13 (explicit form, nn.Dropout on the weights; copied below),
  nn.Dropout everywhere and glibc's default heap;
- ``heap``: the same, freed memory kept in the heap (``retain_freed_memory``);
- ``sdpa``: heap kept, ``F.scaled_dot_product_attention`` for every call, training included (on CPU its
  dropout runs the unfused math kernel), nn.Dropout elsewhere;
- ``new``: what fit and evaluate run now: heap kept, SDPA where it has a fused kernel (evaluation), the
  explicit form for CPU training, every dropout skip-sampled on CPU, and a training batch passed forward
  and backward in micro-batches of at most 64 MiB of attention logits (``micro_batch_size_for``: 2 images
  at mvtec-512, the whole batch at lite0-256). The other variants pass the whole batch at once.

Speed-ups are medians of per-round ratios, which cancel slow drifts of a shared machine; the best round
and CPU time per image are cross-checks that a busy machine affects less (``--threads 1`` steadies both). Also: peak RSS per variant and the evaluation parity of
SDPA vs the explicit form. Writes benchmarks/results/bench_train.json and bench_train.md; ``--profile``
writes torch.profiler tables (self CPU time by op) of one step per variant to bench_train_profile.md.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--presets lite0-256 mvtec-512] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reconad.model import PRESETS, build_detector, transformer
from reconad.model.transformer import Attention, explicit_attention
from reconad.train.config import TrainConfig
from reconad.train.evaluate import predict
from reconad.train import step
from reconad.train.fit import DistributedContext, extract_all_features, train_one_epoch
from reconad.train.memory import retain_freed_memory

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"mvtec-512_train_speedup_vs_today_min": 1.8}
VARIANTS = {"train": ("today", "heap", "sdpa", "new"), "eval": ("today", "heap", "new")}
LABELS = {
    "today": "before: explicit, nn.Dropout, default heap",
    "heap": "explicit, nn.Dropout, heap kept",
    "sdpa": "SDPA everywhere, nn.Dropout, heap kept",
    "new": "now: SDPA where fused, skip-sampled dropout, micro-batches, heap kept",
}
WARMUP_CALLS = 2  # the kept heap grows over the first steps


def attention_before_issue_13(self: Attention, query, key, value, attn_mask=None):
    """``Attention.forward`` as of commit 057dbf7: explicit form, nn.Dropout on the softmax weights (and
    the decoder's learned queries expanded to the batch, as its DecoderLayer did)."""
    if query.shape[0] != key.shape[0]:
        query = query.expand(key.shape[0], -1, -1)
    n, length, d_model = query.shape
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = self.in_proj_bias.chunk(3)

    def heads(x, weight, bias):
        return F.linear(x, weight, bias).view(n, -1, self.nhead, self.head_dim).transpose(1, 2)

    q = heads(query, w_q, b_q) * (1.0 / math.sqrt(self.head_dim))
    k = heads(key, w_k, b_k)
    v = heads(value, w_v, b_v)
    logits = q @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    weights = self.dropout(logits.softmax(dim=-1))
    out = (weights @ v).transpose(1, 2).reshape(n, length, d_model)
    return self.out_proj(out)


def set_variant(variant: str) -> None:
    """Heap mode, attention formulation and dropout of this process."""
    if variant != "today":
        retain_freed_memory()
    if variant != "new":
        transformer.Dropout.forward = torch.nn.Dropout.forward  # F.dropout, as before issue 13
    if variant != "new":  # the whole batch in one forward/backward pass, as before issue 13
        step.micro_batch_size_for = lambda reconstructor, features, budget_bytes=0: len(features)
    if variant in ("today", "heap"):
        Attention.forward = attention_before_issue_13
    elif variant == "sdpa":
        transformer.sdpa_is_fused = lambda device, dropout_p: True


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def prepare_inputs(preset: str, batch_size: int, train_batches: int, eval_batches: int, work: Path) -> Path:
    """Images and their cached features for ``preset``, saved for the workers."""
    config = PRESETS[preset]
    torch.manual_seed(0)
    detector = build_detector(config).eval()  # random backbone (backbone_weights="none")
    generator = torch.Generator().manual_seed(0)
    count = batch_size * max(train_batches, eval_batches)
    images = torch.randint(0, 256, (count, *config.input_hw, 3), dtype=torch.uint8, generator=generator).numpy()
    features = extract_all_features(detector, images, batch_size, torch.device("cpu"))
    # A random backbone's deep stages come out ~1e-8; unit RMS per channel, the scale of pretrained features.
    features = features / features.square().mean(dim=(0, 2, 3), keepdim=True).sqrt()
    path = work / f"{preset}-inputs.pt"
    torch.save({"features": features[: batch_size * train_batches].clone(),
                "images": torch.from_numpy(images[: batch_size * eval_batches].copy())}, path)
    return path


class Workload:
    """One preset in one process: the detector (seed 0), its inputs, and the timed calls."""

    def __init__(self, preset: str, inputs: Path, batch_size: int):
        torch.manual_seed(0)
        self.detector = build_detector(PRESETS[preset])
        saved = torch.load(inputs, weights_only=True)
        self.features, self.images = saved["features"], saved["images"].numpy()
        self.batch_size = batch_size
        self.config = TrainConfig(preset=preset, batch_size=batch_size)
        self.context = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
        self.optimizer = torch.optim.AdamW(self.detector.reconstructor.parameters(), lr=self.config.learning_rate,
                                           weight_decay=self.config.weight_decay)
        self.epoch = 0

    def train(self) -> tuple[float, float]:
        """One pass over the cached features (fit's own loop, its progress line discarded): images/s and
        process CPU seconds per image."""
        self.epoch += 1
        start = time.process_time()
        with contextlib.redirect_stderr(io.StringIO()):
            stats = train_one_epoch(self.detector, self.detector.reconstructor, self.features, self.optimizer,
                                    self.context, self.config, self.epoch)
        return stats["images_per_s"], (time.process_time() - start) / len(self.features)

    def evaluate(self) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        predict(self.detector, self.images, self.batch_size, torch.device("cpu"))
        return len(self.images) / (time.perf_counter() - start), (time.process_time() - cpu_start) / len(self.images)


def worker(args: argparse.Namespace) -> None:
    """One measurement in this fresh process: warm-up calls, then the timed ones (median); one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_variant(args.variant)
    workload = Workload(args.preset, args.inputs, args.batch_size)
    call = workload.train if args.phase == "train" else workload.evaluate
    for _ in range(WARMUP_CALLS):
        call()
    if args.profile_out:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        args.profile_out.write_text(f"### {args.preset}, {args.phase}, {args.variant}\n\n```\n{table}\n```\n")
        return
    rates, cpu_times = zip(*(call() for _ in range(args.timed_calls)))
    print(json.dumps({"images_per_s": statistics.median(rates), "cpu_s_per_image": statistics.median(cpu_times),
                      "peak_rss_mib": peak_rss_mib()}))


def run_worker(args: argparse.Namespace, preset: str, phase: str, variant: str, inputs: Path,
               profile_out: Path | None = None) -> dict | None:
    command = [sys.executable, __file__, "--worker", "--preset", preset, "--phase", phase, "--variant", variant,
               "--inputs", str(inputs), "--batch-size", str(args.batch_size), "--timed-calls", str(args.timed_calls)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if profile_out:
        command += ["--profile-out", str(profile_out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. SIGKILL from the OOM killer: recorded, the other variants go on
        reason = f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0 else \
            (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        print(f"{preset} {phase} {variant}: failed: {reason}", file=sys.stderr, flush=True)
        return {"failed": reason}
    return None if profile_out else json.loads(done.stdout.strip().splitlines()[-1])


def evaluation_parity(preset: str, inputs: Path, batch_size: int) -> dict:
    """Anomaly maps and scores of SDPA vs the explicit form on the benchmark images (eval, float32)."""
    torch.manual_seed(0)
    detector = build_detector(PRESETS[preset])
    images = torch.load(inputs, weights_only=True)["images"].numpy()
    fused_maps, fused_scores = predict(detector, images, batch_size, torch.device("cpu"))
    with explicit_attention(detector):
        maps, scores = predict(detector, images, batch_size, torch.device("cpu"))
    return {
        "map_max_abs": float(abs(fused_maps - maps).max()),
        "map_range": float(maps.max() - maps.min()),
        "score_max_abs": float(abs(fused_scores - scores).max()),
    }


def summarize(measured: dict) -> dict:
    """Medians per variant; ratios only over rounds where both the variant and ``today`` finished."""
    summary = {}
    for phase, by_variant in measured.items():
        today = by_variant["today"]
        summary[phase] = {}
        for name, runs in by_variant.items():
            done = [r for r in runs if "failed" not in r]
            pairs = [(r, t) for r, t in zip(runs, today) if "failed" not in r and "failed" not in t]
            row = {"failed": [r["failed"] for r in runs if "failed" in r]}
            if done:
                row.update({
                    "images_per_s_median": statistics.median(r["images_per_s"] for r in done),
                    "images_per_s_best": max(r["images_per_s"] for r in done),
                    "images_per_s_all": [r["images_per_s"] for r in done],
                    "cpu_s_per_image_median": statistics.median(r["cpu_s_per_image"] for r in done),
                    "peak_rss_mib_max": max(r["peak_rss_mib"] for r in done),
                })
            if pairs:
                row["speedup_vs_today_median"] = statistics.median(r["images_per_s"] / t["images_per_s"] for r, t in pairs)
                row["cpu_speedup_vs_today_median"] = statistics.median(
                    t["cpu_s_per_image"] / r["cpu_s_per_image"] for r, t in pairs)
            summary[phase][name] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["lite0-256", "mvtec-512"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--train-batches", type=int, default=1, help="training steps per timed pass")
    parser.add_argument("--eval-batches", type=int, default=1, help="batches per timed evaluation")
    parser.add_argument("--timed-calls", type=int, default=2, help="timed passes per process (median)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: PyTorch's, one per core)")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler tables per variant")
    parser.add_argument("--work", type=Path, default=RESULTS / "bench_train_work")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results, parity, profiles = {}, {}, []
    for preset in args.presets:
        inputs = prepare_inputs(preset, args.batch_size, args.train_batches, args.eval_batches, args.work)
        parity[preset] = evaluation_parity(preset, inputs, args.batch_size)
        measured = {phase: {name: [] for name in names} for phase, names in VARIANTS.items()}
        for phase, names in VARIANTS.items():
            for _ in range(args.rounds):
                for name in names:  # interleaved: a busy machine affects every variant alike
                    measured[phase][name].append(run_worker(args, preset, phase, name, inputs))
            print(f"{preset} {phase}: " + ", ".join(
                f"{name} {statistics.median(r['images_per_s'] for r in runs if 'failed' not in r):.2f} img/s"
                if any("failed" not in r for r in runs) else f"{name} failed"
                for name, runs in measured[phase].items()), file=sys.stderr, flush=True)
        results[preset] = summarize(measured)
        if args.profile:
            for phase, names in VARIANTS.items():
                for name in names:
                    out = args.work / f"profile-{preset}-{phase}-{name}.md"
                    run_worker(args, preset, phase, name, inputs, profile_out=out)
                    profiles.append(out.read_text())
    checks = {}
    if "mvtec-512" in results:
        speedup = results["mvtec-512"]["train"]["new"].get("speedup_vs_today_median")
        if speedup is not None:
            checks["mvtec-512_train_speedup_vs_today"] = {
                "value": speedup, "passed": speedup >= TARGETS["mvtec-512_train_speedup_vs_today_min"],
            }
    meta = {
        "presets": args.presets,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "train_images_per_pass": args.batch_size * args.train_batches,
        "warmup_and_timed_passes_per_process": [WARMUP_CALLS, args.timed_calls],
        "eval_images_per_pass": args.batch_size * args.eval_batches,
        "torch": torch.__version__,
        "torch_threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    result = {"meta": meta, "results": results, "evaluation_parity": parity, "targets": TARGETS, "checks": checks}
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
        f"batch {meta['batch_size']}, random weights, CPU, median of {meta['rounds']} interleaved rounds (a fresh "
        f"process each); torch {meta['torch']} ({meta['torch_threads']} threads), {meta['cpu_count']} CPUs, "
        f"load average {meta['load_average_before'][0]:.1f} before, {meta['load_average_after'][0]:.1f} after",
        "",
        "| preset | phase | variant | images/s | vs before | best images/s | CPU s / image | vs before (CPU time) "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, phases in result["results"].items():
        for phase, rows in phases.items():
            for name, row in rows.items():
                if "images_per_s_median" not in row or "speedup_vs_today_median" not in row:
                    lines.append(f"| {preset} | {phase} | {LABELS[name]} | failed: {'; '.join(row['failed'])} "
                                 "| | | | | |")
                    continue
                lines.append(
                    f"| {preset} | {'training step' if phase == 'train' else 'evaluation'} | {LABELS[name]} "
                    f"| {row['images_per_s_median']:.2f} | {row['speedup_vs_today_median']:.2f}x "
                    f"| {row['images_per_s_best']:.2f} "
                    f"| {row['cpu_s_per_image_median']:.3f} | {row['cpu_speedup_vs_today_median']:.2f}x "
                    f"| {row['peak_rss_mib_max']:.0f} |"
                )
    lines.append("")
    for preset, gap in result["evaluation_parity"].items():
        lines.append(f"- {preset} evaluation, SDPA vs explicit: map max abs {gap['map_max_abs']:.2g} "
                     f"(map range {gap['map_range']:.3g}), score max abs {gap['score_max_abs']:.2g}")
    for name, check in result["checks"].items():
        lines.append(f"- {name}: {check['value']:.3g} (target {TARGETS[name + '_min']}; "
                     f"{'pass' if check['passed'] else 'FAIL'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
