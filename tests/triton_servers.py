"""Real Triton servers on loopback for the tests: ``recon-inspect serve`` and the stock ``tritonserver``.

Both come from the ``serve`` extra (nvidia-pytriton ships ``tritonserver``; tritonclient talks to it).
Tests skip with a reason naming the install command where they are absent. Every server is started and
stopped by the test that needs it, on free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = "pip install 'reconad[serve]'"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90  # a loaded 2-core CI machine; ~3 s when quiet


def require_tritonclient():
    return pytest.importorskip("tritonclient.http", reason=f"tritonclient is not installed ({INSTALL})")


def require_pytriton():
    require_tritonclient()
    return pytest.importorskip("pytriton.triton", reason=f"nvidia-pytriton is not installed ({INSTALL})")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_until(condition, timeout_s: float, process: subprocess.Popen | None = None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if condition():
                return
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready after {timeout_s} s")


class ServeProcess:
    """``recon-inspect serve ARTIFACT`` in a subprocess (the real CLI, the real Triton server)."""

    def __init__(self, artifact: Path, log_path: Path, *extra: str, ports: tuple[int, int, int] | None = None) -> None:
        self.http_port, self.grpc_port, self.metrics_port = ports or free_ports(3)
        self.log_path = log_path
        command = [
            sys.executable, "-c", "from reconad.runtime.cli import app; app(prog_name='recon-inspect')", "serve", str(artifact),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--log-file", str(log_path.with_suffix(".triton.log")),
            *extra,
        ]  # fmt: skip
        self._log = open(log_path, "w")
        # PyTriton's workspace (a copy of tritonserver) in a folder of ours, not ~/.cache/pytriton; short,
        # because PyTriton puts AF_UNIX sockets in it (108 characters at most)
        self.home = Path(tempfile.mkdtemp(prefix="pytriton-"))
        self._shared_before = set(Path("/dev/shm").glob("psm_*"))
        environ = {**os.environ, "PYTRITON_HOME": str(self.home)}
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=environ
        )

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, model_name: str) -> float:
        import tritonclient.http as httpclient

        started = time.monotonic()
        client = httpclient.InferenceServerClient(self.http_url)
        try:
            wait_until(  # the model is ready and serve has announced its endpoints
                lambda: client.is_model_ready(model_name) and "serving model" in self.output(),
                START_TIMEOUT_S,
                self.process,
                "recon-inspect serve",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.output()[-3000:]}") from None
        finally:
            client.close()
        return time.monotonic() - started

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.http_port, self.grpc_port, self.metrics_port)

    def kill(self) -> None:
        """SIGKILL the whole group (serve, its tritonserver and the model stub): a server that just dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self._log.close()
        remove_shared_memory(self.process.pid)
        # PyTriton's tensor store (multiprocessing shared memory, psm_*): the ones that appeared since start
        for path in set(Path("/dev/shm").glob("psm_*")) - self._shared_before:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Signal the serve process (not its group: it stops its own tritonserver) and wait for its exit."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group we started: serve and its tritonserver
                self.process.wait(10)
                remove_shared_memory(self.process.pid)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)
        return self.process.returncode


def remove_shared_memory(pid: int) -> None:
    """The Python backend's shared-memory regions of a PyTriton process that could not clean up (killed)."""
    for path in Path("/dev/shm").glob(f"pytrtion{pid}-*"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def serve_process(artifact: Path, log_path: Path, model_name: str, *extra: str) -> Iterator[ServeProcess]:
    server = ServeProcess(artifact, log_path, *extra)
    try:
        server.wait_ready(model_name)
        yield server
    finally:
        server.stop()


def stock_tritonserver() -> Path:
    """The ``tritonserver`` binary shipped in the nvidia-pytriton wheel."""
    require_pytriton()
    from pytriton.utils.distribution import get_root_module_path

    binary = get_root_module_path() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        pytest.skip(f"this nvidia-pytriton wheel ships no tritonserver binary at {binary}")
    return binary


def python_backend_dir(folder: Path) -> Path:
    """A backend directory with the wheel's Python backend and the stub for this Python (as PyTriton lays it out)."""
    from pytriton.utils.distribution import get_stub_path

    binary = stock_tritonserver()
    python = folder / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(binary.parents[1] / "backends" / "python" / name, python / name)
    shutil.copy(get_stub_path(f"{sys.version_info.major}.{sys.version_info.minor}"), python / "triton_python_backend_stub")
    return folder


def stub_environment() -> dict[str, str]:
    """The environment PyTriton gives its server, with serve's libpython fix: this venv's python first on
    PATH (the stub finds its site-packages through it), this Python's libpython and the wheel's libraries."""
    from pytriton.utils.distribution import get_libs_path

    from reconad.runtime.serve import apply_stub_library_fix, stub_library_fix

    environ = dict(os.environ)
    apply_stub_library_fix(stub_library_fix(environ=environ), environ)
    environ["LD_LIBRARY_PATH"] = f"{environ.get('LD_LIBRARY_PATH', '')}:{get_libs_path()}".lstrip(":")
    environ["PATH"] = f"{Path(sys.executable).parent}:{environ['PATH']}"
    return environ


@contextlib.contextmanager
def stock_server(repository: Path, log_path: Path, backends: Path | None = None) -> Iterator[tuple[str, str]]:
    """A stock ``tritonserver --model-repository REPO`` on loopback; yields its HTTP and gRPC ``host:port``."""
    import tritonclient.http as httpclient

    binary = stock_tritonserver()
    http_port, grpc_port, metrics_port = free_ports(3)
    backends = backends or binary.parents[1] / "backends"
    command = [
        str(binary), "--model-repository", str(repository), "--backend-directory", str(backends),
        "--http-address", LOOPBACK, "--http-port", str(http_port), "--grpc-address", LOOPBACK,
        "--grpc-port", str(grpc_port), "--metrics-address", LOOPBACK, "--metrics-port", str(metrics_port),
        "--exit-on-error=false", "--strict-readiness=false", "--exit-timeout-secs=2",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=stub_environment())
        url = f"{LOOPBACK}:{http_port}"
        client = httpclient.InferenceServerClient(url)
        try:
            wait_until(client.is_server_live, START_TIMEOUT_S, process, "tritonserver")
            yield url, f"{LOOPBACK}:{grpc_port}"
        finally:
            client.close()
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def prometheus_samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of ``metric`` in Prometheus text exposition format."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match.group(1) == metric:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            samples.append((labels, float(match.group(3))))
    return samples
