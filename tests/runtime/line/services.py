"""Real services for the line's tests, started on loopback by the tests themselves: an MQTT broker
(mosquitto, else amqtt) and an RTSP server (GStreamer's rtsp-server in a child process).

Each can be killed mid-run (SIGKILL, as a crash or a pulled cable) and started again on the same port.
When the program is not installed, ``require_*`` skips the test with a reason naming the package;
``.ci/services.sh`` installs them all for CI.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
RTSP_SERVER_SCRIPT = Path(__file__).with_name("rtsp_test_server.py")
DEBIAN_MQTT = "apt-get install mosquitto (or pip install amqtt)"
DEBIAN_RTSP = (
    "apt-get install gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-ugly python3-gi "
    "(see .ci/services.sh)"
)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(condition, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


class ChildService:
    """A program run as our child process; ``start`` waits until ``ready()``; ``kill`` is SIGKILL."""

    name = "service"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self.starts = 0
        self._log_offset = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return is_listening(self.port)

    def start(self, timeout_s: float = 15.0) -> ChildService:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()  # ready() looks only at what this start writes
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        finally:
            log.close()
        self.starts += 1
        if not wait_until(lambda: self.ready() or self.process.poll() is not None, timeout_s) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.name} did not start on port {self.port}: {self.log()[-2000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL: the service vanishes without closing anything cleanly."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        self.kill()
        # The same port: a client reconnecting to the address it knows must find the service again.
        wait_until(lambda: not is_listening(self.port), timeout_s=5)
        self.start()

    def log(self, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset if since_start else 0)
            return log.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# MQTT ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate the CA and server certificate with the openssl command (EC P-256, valid 2 days)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make test certificates: apt-get install openssl")
    folder.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        [openssl, "req", "-x509", *key, "-keyout", str(folder / "ca.key"), "-out", str(files.ca_cert),
         "-days", "2", "-subj", "/CN=reconad test CA"],
        [openssl, "req", *key, "-keyout", str(files.server_key), "-out", str(folder / "server.csr"),
         "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(files.ca_cert),
         "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-out", str(files.server_cert), "-days", "2",
         "-extfile", str(folder / "san.ext")],
    ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True, timeout=30)
    return files


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (path for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(path, os.X_OK)), None
    )


def _amqtt() -> str | None:
    return shutil.which("amqtt") or next(
        (str(path) for path in [Path(sys.executable).with_name("amqtt")] if os.access(path, os.X_OK)), None
    )


class MosquittoBroker(ChildService):
    """Eclipse Mosquitto with a generated config: loopback only, no persistence, optional users and TLS."""

    name = "mosquitto"

    def __init__(self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: TlsFiles | None = None) -> None:
        super().__init__(workdir, port)
        self.users, self.tls = users, tls
        self.executable = _mosquitto()
        lines = [f"listener {self.port} {LOOPBACK}", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto drops to user 'mosquitto', who cannot read tmp_path
        if users:
            password_file = self.workdir / "passwords"
            password_file.write_text("")
            for user, password in users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b",
                                str(password_file), user, password], check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += [f"cafile {tls.ca_cert}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}"]
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [self.executable, "-c", str(self.config_path)]


class AmqttBroker(ChildService):
    """amqtt (PyPI), anonymous only: the fallback where mosquitto is not installed."""

    name = "amqtt"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.executable = _amqtt()
        self.users, self.tls = None, None
        self.config_path = self.workdir / "amqtt.yaml"
        self.config_path.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: {LOOPBACK}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )

    def command(self) -> list[str]:
        return [self.executable, "-c", str(self.config_path)]


def require_broker(workdir: Path, users: dict[str, str] | None = None, tls: bool = False) -> ChildService:
    """A started broker on a free loopback port; skips when none is installed (users/TLS need mosquitto)."""
    if _mosquitto() is not None:
        files = make_tls_files(workdir / "tls") if tls else None
        return MosquittoBroker(workdir, users=users, tls=files).start()
    if users or tls:
        pytest.skip("MQTT authentication and TLS tests need mosquitto: apt-get install mosquitto")
    if _amqtt() is not None:
        return AmqttBroker(workdir).start()
    pytest.skip(f"needs an MQTT broker: {DEBIAN_MQTT}")


class Subscriber:
    """A paho-mqtt client subscribed to ``topic`` that keeps every message it receives."""

    def __init__(self, port: int, topic: str, *, qos: int = 1, tls: TlsFiles | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{free_port()}")
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls.ca_cert))
        self.client.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(topic, qos)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect_async(LOOPBACK, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"the test subscriber could not subscribe to {topic} on port {port}")

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(message)

    def resubscribed(self, timeout_s: float = 10.0) -> bool:
        """After a broker restart: wait until the subscription is back."""
        self._subscribed.clear()
        return self._subscribed.wait(timeout_s)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [message.payload for message in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# RTSP ------------------------------------------------------------------------------------------------


@functools.cache
def gst_python() -> str | None:
    """An interpreter that can run GStreamer's RTSP server with an H.264 encoder: ours, else Debian's."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
        "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
        "assert all(Gst.ElementFactory.find(name) for name in ('x264enc', 'rtph264pay', 'videotestsrc'))"
    )
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        if not os.access(python, os.X_OK):
            continue
        try:
            if subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0:
                return python
        except subprocess.TimeoutExpired:
            continue
    return None


class RtspTestServer(ChildService):
    """``rtsp://127.0.0.1:<port><path>``: a live 320x240 H.264 ball pattern at ``fps``."""

    name = "rtsp-server"

    def __init__(self, workdir: Path, port: int | None = None, path: str = "/test", fps: int = 15,
                 size: tuple[int, int] = (320, 240)) -> None:
        super().__init__(workdir, port)
        self.path, self.fps, self.size = path, fps, size
        self.python = gst_python()

    @property
    def url(self) -> str:
        return f"rtsp://{LOOPBACK}:{self.port}{self.path}"

    def command(self) -> list[str]:
        width, height = self.size
        return [self.python, str(RTSP_SERVER_SCRIPT), "--port", str(self.port), "--path", self.path,
                "--width", str(width), "--height", str(height), "--fps", str(self.fps)]

    def ready(self) -> bool:
        return f"ready {self.port}" in self.log(since_start=True)


def require_rtsp_server(workdir: Path, **options) -> RtspTestServer:
    if gst_python() is None:
        pytest.skip(f"needs GStreamer's RTSP server for Python: {DEBIAN_RTSP}")
    return RtspTestServer(workdir, **options).start()


def require_ffmpeg_rtsp_client() -> None:
    """OpenCV must read rtsp:// through FFmpeg (the pip wheels have FFmpeg, not GStreamer)."""
    import cv2

    build = cv2.getBuildInformation()
    if not any(line.strip().startswith("FFMPEG:") and "YES" in line for line in build.splitlines()):
        pytest.skip("this OpenCV cannot read RTSP: it has no FFmpeg (pip install opencv-python-headless)")


# A virtual screen ------------------------------------------------------------------------------------


class XvfbDisplay(ChildService):
    """An X server without a screen (Xvfb), so ``display://0`` has a desktop; ``grab()`` reads it back."""

    name = "xvfb"

    def __init__(self, workdir: Path, size: tuple[int, int] = (800, 600)) -> None:
        super().__init__(workdir, port=1)  # X listens on a socket file, not a TCP port
        self.size = size
        self.display: str | None = None

    def command(self) -> list[str]:
        width, height = self.size
        # -displayfd: Xvfb picks a free display itself and writes its number once it accepts connections.
        return [shutil.which("Xvfb"), "-displayfd", "1", "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"]

    def ready(self) -> bool:
        for line in self.log(since_start=True).splitlines():
            if line.strip().isdigit():
                self.display = f":{line.strip()}"
                # and a client can connect: the socket is there and accepts (a server on another display
                # number that is shutting down must not be the one answering)
                return self._accepts(Path(f"/tmp/.X11-unix/X{line.strip()}"))
        return False

    @staticmethod
    def _accepts(path: Path) -> bool:
        import socket

        if not path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                return False
        return True

    def grab(self, path: Path):
        """The whole screen as uint8 [H, W, 3] RGB, through ffmpeg's x11grab."""
        import cv2

        width, height = self.size
        subprocess.run([shutil.which("ffmpeg"), "-v", "error", "-f", "x11grab", "-video_size", f"{width}x{height}",
                        "-i", self.display, "-frames:v", "1", "-y", str(path)], check=True, capture_output=True,
                       timeout=30)
        return cv2.imread(str(path))[:, :, ::-1]


def require_xvfb(workdir: Path) -> XvfbDisplay:
    """A real X server (Xvfb) on a display number it picks free itself; skips where Xvfb is absent."""
    if shutil.which("Xvfb") is None:
        pytest.skip("needs a virtual X server: apt-get install xvfb gstreamer1.0-x")
    return XvfbDisplay(workdir).start()


def require_display(workdir: Path) -> XvfbDisplay:
    """``require_xvfb`` whose screen can be read back (ffmpeg's x11grab)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg (x11grab) to read the screen back: apt-get install ffmpeg")
    return require_xvfb(workdir)


def unused_display() -> str:
    """A ``DISPLAY`` value no X server answers on: a number with neither a socket nor a lock file."""
    for number in range(420, 1000):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            return f":{number}"
    pytest.skip("every display number from 420 to 999 is taken")


def require_gst_outputs() -> None:
    """Our process must import GStreamer (PyGObject) for RTSP and display outputs."""
    from reconad.runtime.errors import ReconadError
    from reconad.runtime.line.gst import import_gst

    try:
        import_gst("this test", rtsp_server=True)
    except ReconadError as error:
        pytest.skip(str(error))
