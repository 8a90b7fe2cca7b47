"""A stand-alone RTSP server for tests: GStreamer's rtsp-server serving a live H.264 test pattern.

Run as a separate process (by ``services.RtspTestServer``) so that a test can kill it mid-stream, as a
camera that loses power, and start it again on the same port. Any interpreter with PyGObject and the
GstRtspServer typelib runs it (the venv's, or Debian's /usr/bin/python3 with python3-gi); it imports
nothing of ours. Prints ``ready <port>`` on stdout once it listens.

    python rtsp_test_server.py --port 8554 --path /test --width 320 --height 240 --fps 15
"""

import argparse
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/test")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=15)
    args = parser.parse_args()

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    # A moving ball on a mid-gray field: never a flat (blank) frame, never a frozen one.
    launch = (
        f"( videotestsrc is-live=true pattern=ball background-color=0xff606060 foreground-color=0xffe0e0e0 ! "
        f"video/x-raw,format=I420,width={args.width},height={args.height},framerate={args.fps}/1 ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} ! "
        "rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.address}:{args.port}", file=sys.stderr, flush=True)
        return 1
    print(f"ready {server.get_bound_port()}", flush=True)
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
