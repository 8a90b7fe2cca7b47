"""The URL an RTSP output prints: a host name and addresses for a wildcard bind, read from this machine's
kernel, and a real RTSP output on every interface watched by a client through one of them."""

import ipaddress
import json
import socket
import subprocess
import sys

import numpy as np

from reconad.runtime.line.addresses import client_url, local_addresses
from reconad.runtime.line.outputs import open_output
from tests.runtime.fakes import write_video
from tests.runtime.line.services import free_port, require_ffmpeg_rtsp_client, require_gst_outputs
from tests.runtime.line.test_outputs import Feeder, _non_loopback_address, halves, read_frames
from tests.runtime.onnx_graphs import write_artifact


def test_a_wildcard_bind_names_this_machine_and_its_addresses():
    url, note = client_url("0.0.0.0", 8554, "/inspect", hostname="line1", addresses=("192.168.1.5", "10.0.0.7"))
    assert url == "rtsp://line1:8554/inspect"
    assert note == ("listening on all interfaces, also rtsp://192.168.1.5:8554/inspect, rtsp://10.0.0.7:8554/inspect; "
                    "watch with ffplay or VLC")
    assert client_url("::", 8554, "/inspect", hostname="line1", addresses=())[1] == (
        "listening on all interfaces; watch with ffplay or VLC")
    # a machine that calls itself localhost is named by its first address instead
    assert client_url("0.0.0.0", 8554, "/x", hostname="localhost", addresses=("192.168.1.5",))[0] == "rtsp://192.168.1.5:8554/x"
    assert "0.0.0.0" not in "".join(client_url("0.0.0.0", 8554, "/x", hostname="line1", addresses=("192.168.1.5",)))


def test_a_named_address_is_the_url_and_loopback_says_this_machine_only():
    assert client_url("192.168.1.5", 8554, "/inspect") == ("rtsp://192.168.1.5:8554/inspect", "watch with ffplay or VLC")
    assert client_url("fe80::1", 8554, "/inspect")[0] == "rtsp://[fe80::1]:8554/inspect"
    for host in ("127.0.0.1", "localhost", "::1"):
        assert client_url(host, 8554, "/inspect")[1] == "reachable from this machine only; watch with ffplay or VLC"


def test_local_addresses_come_from_the_kernel_without_loopback():
    addresses = local_addresses()
    assert all(not ipaddress.ip_address(address).is_loopback for address in addresses)
    routed = _non_loopback_address()  # the source address the kernel routes from
    if routed is not None:
        assert routed in addresses


def test_an_rtsp_output_on_every_interface_is_watched_through_the_address_it_names():
    require_gst_outputs()
    require_ffmpeg_rtsp_client()
    port = free_port()
    output = open_output(f"rtsp://0.0.0.0:{port}/inspect", fps=15)
    feeder = Feeder(output, halves())
    try:
        assert output.url == f"rtsp://{socket.gethostname()}:{port}/inspect"
        assert output.note.startswith("listening on all interfaces") and "0.0.0.0" not in output.note
        for address in local_addresses():
            assert f"rtsp://{address}:{port}/inspect" in output.note
        address = (local_addresses() or ("127.0.0.1",))[0]
        assert len(read_frames(f"rtsp://{address}:{port}/inspect", 3)) == 3
    finally:
        feeder.stop()
        output.close()


def test_a_run_streaming_on_every_interface_prints_and_records_a_url_a_client_can_open(tmp_path):
    require_gst_outputs()
    port = free_port()
    artifact = write_artifact(tmp_path / "model")
    video = write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 40 * n, np.uint8) for n in range(3)])
    command = [sys.executable, "-c", "from reconad.runtime.cli import app; app()", "run", str(video),
               "--model", str(artifact), "--no-threshold", "--backend", "ort-cpu", "--out", str(tmp_path / "out"),
               "--output", f"rtsp://0.0.0.0:{port}/inspect", "--max-frames", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    url = f"rtsp://{socket.gethostname()}:{port}/inspect"
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("streaming to")]
    assert line.startswith(f"streaming to {url} (listening on all interfaces") and "0.0.0.0" not in line
    assert line.endswith("; watch with ffplay or VLC)")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["outputs"][0]["url"] == url
