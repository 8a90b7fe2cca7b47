"""Throughput of ``recon-inspect serve`` (a real Triton server, PyTriton) for 1, 2, 4, 8 concurrent clients vs one local Inspector.

Each client is a thread sending one prepared frame per request over gRPC (a camera sends a frame at a
time), back to back; fps = frames answered / wall time over all clients. The batch sizes Triton formed
come from its own Prometheus counters (frames inferred / model executions per measurement). The local
baseline is one Inspector in this process inferring one frame per call, measured in the same round
right before the server runs, so the ratio cancels slow drifts of a shared machine. On a CPU the server
cannot beat local inference per frame; what matters is that throughput holds as clients grow, and on a
GPU server the batches raise it. Writes benchmarks/results/bench_triton.json and .md (git-ignored).

    .venv/bin/python benchmarks/bench_triton.py --model export/line1-256x256-fp32.onnx --backend ort-cpu
    .venv/bin/python benchmarks/bench_triton.py        # the tiny contract graph (serving overhead only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from reconad.runtime.inspector import Inspector
from reconad.runtime.serve import default_model_name

RESULTS = Path(__file__).resolve().parent / "results"


def contract_artifact(folder: Path, input_hw: tuple[int, int]) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.runtime.onnx_graphs import write_artifact

    return write_artifact(folder, name="contract-256x256-fp32.onnx", input_hw=input_hw, max_batch=8)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_server(model: Path, args, log: Path) -> tuple[subprocess.Popen, dict[str, int], float]:
    import tritonclient.http as httpclient

    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
    command = [
        sys.executable, "-c", "from reconad.runtime.cli import app; app(prog_name='recon-inspect')", "serve", str(model),
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
        "--backend", args.backend, "--max-batch", str(args.max_batch), "--max-queue-delay-us", str(args.max_queue_delay_us),
    ]  # fmt: skip
    if args.num_threads:
        command += ["--num-threads", str(args.num_threads)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    name = default_model_name(model)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"recon-inspect serve exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if client.is_model_ready(name):
                break
        except Exception:  # not listening yet
            pass
        if time.perf_counter() - started > 120:
            process.send_signal(signal.SIGTERM)
            raise SystemExit("recon-inspect serve not ready after 120 s")
        time.sleep(0.2)
    client.close()
    return process, ports, time.perf_counter() - started


def triton_counts(metrics_port: int, name: str) -> tuple[float, float]:
    """(frames inferred, model executions) from Triton's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for line in text.splitlines():
        metric = line.split("{", 1)[0]
        if metric in totals and f'model="{name}"' in line:
            totals[metric] += float(line.rsplit(" ", 1)[1])
    return totals["nv_inference_count"], totals["nv_inference_exec_count"]


def server_fps(grpc_port: int, name: str, frames: np.ndarray, clients: int, per_client: int) -> float:
    import tritonclient.grpc as grpcclient

    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        connection = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            barrier.wait()
            for request in range(per_client):
                frame = frames[(index + request) % len(frames)][None]  # [1, H, W, 3]
                tensor = grpcclient.InferInput("images", list(frame.shape), "UINT8")
                tensor.set_data_from_numpy(frame)
                connection.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput("is_anomalous")])
        except Exception as error:  # reported after the run
            errors.append(repr(error))
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"client errors: {errors[:3]}")
    return clients * per_client / elapsed


def local_fps(inspector: Inspector, frames: np.ndarray, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        inspector.infer(frames[index % len(frames)][None])
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an .onnx or .engine artifact; default: the tiny contract graph")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels")
    parser.add_argument("--frames", type=int, default=200, help="frames per measurement (split over the clients)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--num-threads", type=int, default=None, help="ONNX Runtime threads (server and local)")
    args = parser.parse_args()
    levels = [int(value) for value in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or contract_artifact(scratch / "model", (256, 256))
        name = default_model_name(model)
        inspector = Inspector.open(model, args.backend, num_threads=args.num_threads)
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, size=(8, *inspector.input_hw, 3), dtype=np.uint8)
        inspector.infer(frames[:1])  # warm-up
        process, ports, startup_s = start_server(model, args, scratch / "serve.log")
        print(f"server ready in {startup_s:.1f} s ({inspector.backend.name}, max batch {args.max_batch})", flush=True)
        rows = {level: {"local_fps": [], "server_fps": [], "mean_batch": []} for level in levels}
        try:
            server_fps(ports["grpc"], name, frames, 1, 8)  # warm-up
            for round_index in range(args.rounds):
                for level in levels:
                    per_client = max(1, args.frames // level)
                    local = local_fps(inspector, frames, max(8, args.frames // 2))
                    before = triton_counts(ports["metrics"], name)
                    served = server_fps(ports["grpc"], name, frames, level, per_client)
                    after = triton_counts(ports["metrics"], name)
                    inferred, executions = after[0] - before[0], after[1] - before[1]
                    rows[level]["local_fps"].append(local)
                    rows[level]["server_fps"].append(served)
                    rows[level]["mean_batch"].append(inferred / max(executions, 1))
                    print(
                        f"round {round_index + 1}, {level} clients: local {local:.1f} fps, server {served:.1f} fps, "
                        f"mean batch {inferred / max(executions, 1):.2f}",
                        flush=True,
                    )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            inspector.close()
        backend = inspector.backend.name
        input_hw = inspector.input_hw

    table = [
        "| clients | local Inspector fps | serve fps | serve / local | mean batch Triton formed |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for level, row in rows.items():
        local, served = statistics.median(row["local_fps"]), statistics.median(row["server_fps"])
        ratios = [s / l for s, l in zip(row["server_fps"], row["local_fps"])]
        summary[level] = {
            "local_fps": [round(value, 2) for value in row["local_fps"]],
            "server_fps": [round(value, 2) for value in row["server_fps"]],
            "server_to_local": round(statistics.median(ratios), 3),
            "mean_batch": [round(value, 2) for value in row["mean_batch"]],
        }
        table.append(
            f"| {level} | {local:.1f} | {served:.1f} | {statistics.median(ratios):.2f} | "
            f"{statistics.median(row['mean_batch']):.2f} |"
        )
    record = {
        "model": str(args.model) if args.model else "tiny contract graph at 256x256 (tests/runtime/onnx_graphs.py)",
        "input_hw": list(input_hw),
        "backend": backend,
        "max_batch": args.max_batch,
        "max_queue_delay_us": args.max_queue_delay_us,
        "frames_per_measurement": args.frames,
        "rounds": args.rounds,
        "server_startup_s": round(startup_s, 2),
        "levels": summary,
        "load_average": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_triton.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "bench_triton.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
