#!/usr/bin/env bash
# Debian packages for the line's tests (tests/runtime/line): an MQTT broker, GStreamer's RTSP server with
# an H.264 encoder, ffprobe, an X server without a screen, and what PyGObject needs to build in the venv.
# Installs only what is missing, so a machine that has them all starts no apt-get at all. Without root
# it installs nothing and says so: the tests that need a missing program then skip with a reason.
set -euo pipefail

PACKAGES=(
    mosquitto mosquitto-clients openssl                                  # MQTT broker (test_mqtt)
    gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly
    gstreamer1.0-rtsp gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0
    python3-gi                                                           # RTSP server and outputs
    gstreamer1.0-x xvfb                                                  # display:// on a virtual screen
    ffmpeg                                                               # ffprobe reads RTSP outputs back
    libgirepository1.0-dev libcairo2-dev pkg-config gcc libc6-dev         # PyGObject builds in the venv
)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "services.sh: all ${#PACKAGES[@]} packages present."
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "services.sh: not root or no apt-get: not installing ${missing[*]}; their tests will skip."
    exit 0
fi
echo "services.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
