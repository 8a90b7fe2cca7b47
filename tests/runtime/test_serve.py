"""recon-inspect serve: the libpython fix, the served tensors, and a REAL Triton server (PyTriton) on loopback
with concurrent tritonclient clients, compared with the local Inspector; Triton's own metrics show batching."""

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from reconad.runtime import Inspector
from reconad.runtime.errors import ReconadError
from reconad.runtime.config import utc_now_iso
from reconad.runtime.thresholds import Calibration, Threshold
from reconad.runtime.serve import (
    ServeConfig,
    apply_stub_library_fix,
    default_model_name,
    stub_library_fix,
    verdict_outputs,
)
from tests.runtime.onnx_graphs import expected_outputs, random_images, write_artifact
from tests.triton_servers import prometheus_samples, remove_shared_memory, require_pytriton, serve_process

PYENV_MAPS = (
    "7f0000000000-7f0000001000 r--p 00000000 08:01 1234   /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0\n"
    "7f0000002000-7f0000003000 r-xp 00000000 08:01 1235   /usr/lib/x86_64-linux-gnu/libc.so.6\n"
)
STATIC_MAPS = "55d000000000-55d000001000 r-xp 00000000 08:01 99   /usr/local/bin/python3.11\n"


def test_the_stub_is_pointed_at_this_interpreters_own_libpython():
    fix = stub_library_fix(PYENV_MAPS, environ={"LD_LIBRARY_PATH": "/opt/cuda/lib64"})
    assert fix.library_dir == Path("/root/.pyenv/versions/3.11.7/lib")
    assert "libpython3.11.so.1.0" in fix.message and fix.message.count(". ") == 0
    environ = {"LD_LIBRARY_PATH": "/opt/cuda/lib64"}
    apply_stub_library_fix(fix, environ)
    assert environ["LD_LIBRARY_PATH"] == "/root/.pyenv/versions/3.11.7/lib:/opt/cuda/lib64"
    again = stub_library_fix(PYENV_MAPS, environ=environ)
    assert again.library_dir is None and "already starts with" in again.message
    empty = {}
    apply_stub_library_fix(fix, empty)
    assert empty == {"LD_LIBRARY_PATH": "/root/.pyenv/versions/3.11.7/lib"}


def test_a_static_interpreter_gets_one_sentence_saying_what_to_do(monkeypatch):
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: None)
    fix = stub_library_fix(STATIC_MAPS, environ={})
    assert fix.library_dir is None
    assert "statically linked" in fix.message and "--enable-shared" in fix.message
    assert fix.message.endswith(".") and fix.message.count(". ") == 0


def test_this_process_libpython_is_found_when_it_is_shared():
    import sysconfig

    fix = stub_library_fix(environ={})
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert fix.library_dir is None or fix.library_dir.is_dir()
    else:
        assert fix.library_dir is not None and any(fix.library_dir.glob("libpython3*.so*"))


def test_serve_config_refuses_bad_ports_and_names():
    with pytest.raises(ReconadError, match="must differ"):
        ServeConfig(http_port=9000, grpc_port=9000)
    with pytest.raises(ReconadError, match="port number"):
        ServeConfig(metrics_port=70000)
    with pytest.raises(ReconadError, match="not allowed"):
        ServeConfig(model_name="a b")
    assert ServeConfig().address == "127.0.0.1"  # loopback unless the user names an address


def test_default_model_name_is_the_run_name():
    assert default_model_name("export/line1-512x512-fp16.onnx") == "line1"
    assert default_model_name("e/line 1-512x512-fp16-trt10.3.0-orin.engine") == "line_1"
    assert default_model_name("model.onnx") == "model"


def threshold(value: float) -> Threshold:
    return Threshold(value=value, calibration=Calibration(method="manual", n_images=0, date=utc_now_iso(), source="test"))


def test_served_outputs_are_the_graph_outputs_plus_the_verdict(tmp_path):
    images = random_images(5)
    scores = expected_outputs(images)["image_score"]
    cut = float(np.sort(scores)[2])
    calibrated = write_artifact(tmp_path / "cal", image_threshold=threshold(cut))
    with Inspector.open(calibrated, backend="ort-cpu") as inspector:
        served = verdict_outputs(inspector, images, inspector.infer(images))
    assert {name: value.shape for name, value in served.items()} == {
        "anomaly_map": (5, 1, 16, 16), "image_score": (5, 1), "category": (5, 1), "category_distance": (5, 1),
        "is_anomalous": (5, 1), "threshold": (5, 1),
    }  # fmt: skip
    assert served["category"].dtype == np.int64 and served["category"][:, 0].tolist() == expected_outputs(images)["category"].tolist()
    np.testing.assert_allclose(served["image_score"][:, 0], scores, atol=1e-6)
    assert served["is_anomalous"][:, 0].tolist() == [bool(score >= cut) for score in scores]
    assert served["is_anomalous"].dtype == np.bool_ and np.all(served["threshold"] == np.float32(cut))
    uncalibrated = write_artifact(tmp_path / "raw")
    with Inspector.open(uncalibrated, backend="ort-cpu") as inspector:
        served = verdict_outputs(inspector, images, inspector.infer(images))
    assert np.all(np.isnan(served["threshold"])) and not served["is_anomalous"].any()  # no threshold: no verdict


# --- against a real Triton Inference Server ---------------------------------------------------------

MODEL = "line1"
CLIENTS = 4
REQUESTS_PER_CLIENT = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One ``recon-inspect serve`` for the module: tiny fp32 graph, threshold set, batches up to 4."""
    require_pytriton()
    folder = tmp_path_factory.mktemp("serve")
    images = random_images(16, seed=3)
    cut = float(np.median(expected_outputs(images)["image_score"]))
    artifact = write_artifact(folder, name="line1-16x16-fp32.onnx", max_batch=8, image_threshold=threshold(cut))
    # A long queue delay with a batch limit the 4 clients fill: batches form reliably and the test stays fast.
    with serve_process(
        artifact, folder / "serve.log", MODEL, "--max-batch", "4", "--max-queue-delay-us", "200000", "--backend", "ort-cpu"
    ) as server:
        yield server, artifact
    assert server.process.returncode == 0, server.output()[-3000:]
    assert "server stopped" in server.output()


def local_verdicts(artifact, images):
    with Inspector.open(artifact, backend="ort-cpu") as inspector:
        return inspector.inspect(list(images))


def infer_remote(client_module, url, images):
    client = client_module.InferenceServerClient(url)
    try:
        tensor = client_module.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(MODEL, [tensor])
        return {name: result.as_numpy(name) for name in ("anomaly_map", "image_score", "is_anomalous", "threshold")}
    finally:
        client.close()


def test_the_server_describes_the_graph_outputs_plus_the_verdict(served):
    import tritonclient.http as httpclient

    server, _ = served
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        metadata = client.get_model_metadata(MODEL)
    finally:
        client.close()
    assert [(tensor["name"], tensor["datatype"], tensor["shape"]) for tensor in metadata["inputs"]] == [
        ("images", "UINT8", [-1, 16, 16, 3])
    ]
    assert [(tensor["name"], tensor["datatype"], tensor["shape"]) for tensor in metadata["outputs"]] == [
        ("anomaly_map", "FP32", [-1, 1, 16, 16]),
        ("image_score", "FP32", [-1, 1]),
        ("category", "INT64", [-1, 1]),
        ("category_distance", "FP32", [-1, 1]),
        ("is_anomalous", "BOOL", [-1, 1]),
        ("threshold", "FP32", [-1, 1]),
    ]
    log = server.output()
    assert "Pointing the Triton server at this Python's own" in log or "LD_LIBRARY_PATH already starts" in log
    assert f"http://127.0.0.1:{server.http_port}" in log  # loopback


def test_concurrent_clients_get_the_local_inspectors_verdicts_in_batches(served):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server, artifact = served
    metrics_before = _inference_counts(server)
    results: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}
    errors = []

    def client(index: int) -> None:
        module, url = (grpcclient, server.grpc_url) if index % 2 else (httpclient, server.http_url)
        try:
            for request in range(REQUESTS_PER_CLIENT):
                images = random_images(1 + request % 2, seed=100 * index + request)  # 1 or 2 frames per request
                results[index, request] = images, infer_remote(module, url, images)
        except Exception as error:  # reported below with the client's index
            errors.append((index, repr(error)))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT

    for images, remote in results.values():
        local = local_verdicts(artifact, images)
        np.testing.assert_allclose(remote["image_score"][:, 0], [v.image_score for v in local], rtol=0, atol=1e-6)
        np.testing.assert_allclose(remote["anomaly_map"][:, 0], np.stack([v.anomaly_map for v in local]), atol=1e-6)
        assert remote["is_anomalous"][:, 0].tolist() == [v.is_anomalous for v in local]
        assert remote["threshold"][:, 0].tolist() == pytest.approx([v.threshold for v in local], rel=1e-6)

    frames, executions = (after - before for after, before in zip(_inference_counts(server), metrics_before))
    assert frames == sum(len(images) for images, _ in results.values())
    assert executions < frames / 1.5, (frames, executions)  # Triton merged requests: mean batch > 1.5 frames


def _inference_counts(server) -> tuple[float, float]:
    """Triton's Prometheus counters for the model: (frames inferred, model executions = batches)."""
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts = []
    for metric in ("nv_inference_count", "nv_inference_exec_count"):
        samples = [value for labels, value in prometheus_samples(text, metric) if labels.get("model") == MODEL]
        assert samples, f"{metric} missing from {server.metrics_url}"
        counts.append(sum(samples))
    return counts[0], counts[1]


def test_a_port_in_use_is_one_sentence_and_exit_2(served, tmp_path):
    server, artifact = served
    with pytest.raises(AssertionError, match="exited with 2"):
        with serve_process(artifact, tmp_path / "clash.log", MODEL, "--http-port", str(server.http_port)):
            pass
    lines = [line for line in (tmp_path / "clash.log").read_text().splitlines() if line and not line.startswith("Pointing")]
    assert lines == [f"Cannot listen on 127.0.0.1:{server.http_port} (--http-port): Address already in use; choose a free port."]


def test_serve_without_pytriton_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pytriton(name, *args, **kwargs):
        if name.startswith("pytriton"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pytriton)
    from reconad.runtime.serve import serve_artifact

    with pytest.raises(ReconadError, match=r"pip install 'reconad\[serve\]'"):
        serve_artifact(write_artifact(tmp_path), ServeConfig())


# --- the inspection loop on a server (recon-inspect run --server) -------------------------------------


def write_folder(folder: Path, count: int, seed: int) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(random_images(count, seed=seed)):
        cv2.imwrite(str(folder / f"frame{index:04d}.png"), image[..., ::-1])  # RGB -> BGR for OpenCV
    return folder


def verdict_lines(out: Path) -> dict[str, dict]:
    import json

    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines() if line.strip()]
    by_file = {line["file"]: line for line in lines}
    assert len(by_file) == len(lines), "a frame has two verdict lines"
    return by_file


def local_run(folder: Path, artifact: Path, out: Path) -> dict[str, dict]:
    from reconad.runtime.line.config import InspectConfig
    from reconad.runtime.line.session import inspect_stream

    inspect_stream(str(folder), artifact, InspectConfig(out=out, overlays="none", stats_interval_s=0), report=lambda _: None)
    return verdict_lines(out)


def assert_same_verdicts(remote: dict[str, dict], local: dict[str, dict]) -> None:
    assert sorted(remote) == sorted(local)
    for name, line in remote.items():
        assert line["image_score"] == pytest.approx(local[name]["image_score"], abs=1e-6), name
        assert line["is_anomalous"] == local[name]["is_anomalous"] and line["threshold"] == pytest.approx(
            local[name]["threshold"], rel=1e-6
        ), (name, line, local[name])


def run_command(source: Path, server_url: str, out: Path, *extra: str) -> list[str]:
    import sys

    return [
        sys.executable, "-c", "from reconad.runtime.cli import app; app(prog_name='recon-inspect')", "run", str(source),
        "--server", server_url, "--out", str(out), "--overlays", "none", "--stats-interval-s", "0", *extra,
    ]  # fmt: skip


def test_four_loops_on_one_server_get_the_local_verdicts(served, tmp_path):
    import subprocess

    server, artifact = served
    folders = [write_folder(tmp_path / f"camera{index}", 10, seed=50 + index) for index in range(4)]
    urls = [f"grpc://{server.grpc_url}/{MODEL}", f"http://{server.http_url}/{MODEL}"] * 2
    runs = [
        subprocess.Popen(run_command(folder, url, tmp_path / f"out{index}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index, (folder, url) in enumerate(zip(folders, urls))
    ]
    outputs = [run.communicate(timeout=180)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output
        assert "10 frames inspected on triton-" in output, output
    for index, folder in enumerate(folders):
        assert_same_verdicts(verdict_lines(tmp_path / f"out{index}"), local_run(folder, artifact, tmp_path / f"local{index}"))


def test_a_server_killed_mid_run_and_restarted_loses_no_verdict(tmp_path):
    import json
    import subprocess
    import time

    from tests.triton_servers import ServeProcess, wait_until

    require_pytriton()
    images = random_images(8, seed=9)
    cut = float(np.median(expected_outputs(images)["image_score"]))
    artifact = write_artifact(tmp_path / "model", name="line1-16x16-fp32.onnx", max_batch=8, image_threshold=threshold(cut))
    folder = write_folder(tmp_path / "camera", 300, seed=11)
    first = ServeProcess(artifact, tmp_path / "first.log", "--backend", "ort-cpu")
    second = None
    try:
        first.wait_ready(MODEL)
        out = tmp_path / "out"
        run = subprocess.Popen(
            run_command(folder, f"grpc://{first.grpc_url}/{MODEL}", out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        verdicts = out / "verdicts.jsonl"
        wait_until(lambda: verdicts.is_file() and verdicts.read_text().count("\n") >= 20, 120, run, "recon-inspect run")
        first.kill()
        written_when_killed = verdicts.read_text().count("\n")
        time.sleep(1.0)
        assert run.poll() is None, "the loop died with its server"
        second = ServeProcess(artifact, tmp_path / "second.log", "--backend", "ort-cpu", ports=first.ports)
        second.wait_ready(MODEL)
        output = run.communicate(timeout=180)[0]
    finally:
        for server in (first, second):
            if server is not None and server.process.poll() is None:
                server.stop()
    assert run.returncode == 0, output
    assert written_when_killed < 300, "the run ended before the server was killed: nothing was tested"
    assert "Retrying." in output and "answers again after" in output, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"]["server_lost"] >= 1 and summary["counters"]["inspected"] == 300, summary
    assert_same_verdicts(verdict_lines(out), local_run(folder, artifact, tmp_path / "local"))


def test_run_refuses_a_bad_server_url_in_one_line():
    from typer.testing import CliRunner

    from reconad.runtime.cli import app

    result = CliRunner().invoke(app, ["run", "folder", "--server", "tcp://host/model"])
    assert result.exit_code == 2 and "--server must look like grpc://HOST:PORT/MODEL" in result.output
    both = CliRunner().invoke(app, ["run", "folder", "--server", "grpc://h:1/m", "--model", "x.onnx"])
    assert both.exit_code == 2 and "either --model ARTIFACT or --server URL" in both.output


def test_an_unknown_model_is_refused_and_a_dead_server_is_unavailable(served, tmp_path):
    from typer.testing import CliRunner

    from reconad.runtime.cli import app
    from reconad.runtime.remote import RemoteInspector, ServerUnavailableError
    from tests.triton_servers import free_ports

    server, _ = served
    for url in (f"grpc://{server.grpc_url}/nope", f"http://{server.http_url}/nope"):
        with pytest.raises(ReconadError, match="refused the request") as caught:
            RemoteInspector.open(url)
        assert not isinstance(caught.value, ServerUnavailableError)
    (port,) = free_ports(1)
    for protocol in ("grpc", "http"):
        with pytest.raises(ServerUnavailableError, match="is unreachable"):
            RemoteInspector.open(f"{protocol}://127.0.0.1:{port}/{MODEL}")
    folder = write_folder(tmp_path / "camera", 1, seed=0)
    result = CliRunner().invoke(app, ["run", str(folder), "--server", f"grpc://127.0.0.1:{port}/{MODEL}"])
    assert result.exit_code == 3 and result.output.count("\n") == 1 and "is unreachable" in result.output, result.output


def test_without_the_libpython_fix_the_model_fails_to_initialise_in_one_sentence(tmp_path, monkeypatch):
    """The trap itself, on a real server: PyTriton's stub on the system's libpython with this Python's stdlib.
    Where this interpreter is the system's own build there is no trap to show."""
    require_pytriton()
    import reconad.runtime.serve as serve
    from tests.triton_servers import free_ports

    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="pytriton-"))  # short: PyTriton puts AF_UNIX sockets in it
    monkeypatch.setattr("pytriton.constants.PYTRITON_HOME", home)  # read per workspace
    monkeypatch.setattr(serve, "stub_library_fix", lambda *args, **kwargs: serve.StubLibraryFix(None, "no fix"))
    http_port, grpc_port, metrics_port = free_ports(3)
    config = ServeConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, log_file=tmp_path / "t.log")
    inspector = Inspector.open(write_artifact(tmp_path), backend="ort-cpu")
    server = serve.InspectorServer(inspector, config, "line1")
    try:
        server.start()
    except ReconadError as error:
        message = str(error)
    else:
        server.stop()
        pytest.skip("this Python's libpython is the one the stub loads anyway: no trap here")
    finally:
        inspector.close()
        remove_shared_memory(os.getpid())  # the stub died before it could release them
        shutil.rmtree(home, ignore_errors=True)
    assert message.startswith("The Triton model failed to initialise (AttributeError: "), message
    assert message.count("\n") == 0 and message.endswith(").")


def test_a_failed_start_is_one_sentence_with_the_static_python_hint():
    from reconad.runtime.serve import StubLibraryFix, _start_failure

    log = (
        "load failed for model 'line1': version 1 is at UNAVAILABLE state: Internal: TritonModelException: Model "
        "initialize error: Traceback (most recent call last):\\n  File \"model.py\", line 419, in initialize\\n"
        "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'\\n\\nAt:\\n  model.py(454): initialize\\n"
    )
    static = StubLibraryFix(None, "This Python (/x/python) is statically linked, so ... python3.11.")
    message = _start_failure(RuntimeError(log), static)
    assert message == (
        "The Triton model failed to initialise (AttributeError: '_thread.RLock' object has no attribute "
        "'_recursion_count'); this Python (/x/python) is statically linked, so ... python3.11."
    )
    cut_short = "[400] load failed for model 'line1': Internal: Model initialize error: Traceback (most recent call last):"
    assert _start_failure(RuntimeError(cut_short), StubLibraryFix(Path("/lib"), "fixed")) == (
        "The Triton model failed to initialise ([400] load failed for model 'line1': Internal: Model initialize error)."
    )
    assert _start_failure(TimeoutError("Triton Inference Server is not ready after timeout."), static) == (
        "The Triton server failed to start: Triton Inference Server is not ready after timeout."
    )


def test_server_urls():
    from reconad.runtime.remote import ServerAddress, parse_server_url

    assert parse_server_url("grpc://10.0.0.5:8001/line1") == ServerAddress("grpc", "10.0.0.5", 8001, "line1", "")
    assert parse_server_url("http://gpu-server:8000/line1/3/") == ServerAddress("http", "gpu-server", 8000, "line1", "3")
    assert str(parse_server_url("grpc://[::1]:8001/line1")) == "grpc://[::1]:8001/line1"
    for bad in ("grpc://host/line1", "https://host:8000/line1", "grpc://host:8001/", "grpc://host:70000/m", "line1"):
        with pytest.raises(ReconadError, match="--server"):
            parse_server_url(bad)
