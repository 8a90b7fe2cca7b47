"""What device this is: the GPU as the CUDA driver reports it, and the Jetson (L4T/JetPack) release.

``probe_gpu`` asks the driver (libcuda, through ctypes) directly, so neither the engine builder nor a
device check needs a CUDA binding. Torch-free and binding-free.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconad.runtime.errors import ReconadError

TEGRA_RELEASE_FILE = Path("/etc/nv_tegra_release")  # written by L4T on every Jetson

# CUdevice_attribute values of the driver API (cuda.h); stable since CUDA 2.x/5.x.
_CU_DEVICE_ATTRIBUTE_INTEGRATED = 18
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def format_cuda_version(version: int) -> str:
    """``12020`` (the CUDA API's encoding, 1000 * major + 10 * minor) -> ``"12.2"``."""
    return f"{version // 1000}.{(version % 1000) // 10}"


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for or run on, as the CUDA driver reports it.

    Attributes:
        name: device name, e.g. ``"Orin"`` or ``"NVIDIA H200"``.
        compute_capability: ``"major.minor"``, e.g. ``"8.7"``.
        total_memory_mib: device (or, on Jetson, shared) memory.
        integrated: True for a Jetson-style integrated GPU.
        driver_cuda_version: the newest CUDA version the driver supports, e.g. ``"12.6"``.
    """

    name: str
    compute_capability: str
    total_memory_mib: int
    integrated: bool
    driver_cuda_version: str


def probe_gpu(device: int = 0, *, library_names: tuple[str, ...] = _LIBCUDA_NAMES) -> GpuInfo:
    """Ask the CUDA driver about ``device``; a one-sentence ``ReconadError`` when there is no driver or GPU."""
    library = None
    for name in library_names:
        try:
            library = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if library is None:
        raise ReconadError("No NVIDIA driver here (libcuda not found), so there is no GPU to build or run engines on.")

    def call(what: str, function: str, *arguments: Any) -> None:
        status = getattr(library, function)(*arguments)
        if status != 0:
            text = ctypes.c_char_p()
            library.cuGetErrorName(status, ctypes.byref(text))
            reason = text.value.decode() if text.value else f"error {status}"
            raise ReconadError(f"The CUDA driver could not {what}: {reason}.")

    call("initialise", "cuInit", 0)
    handle = ctypes.c_int()
    call(f"open device {device}", "cuDeviceGet", ctypes.byref(handle), device)
    name = ctypes.create_string_buffer(256)
    call("read the device name", "cuDeviceGetName", name, len(name), handle)
    values = {}
    for key, attribute in (
        ("major", _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
        ("minor", _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ("integrated", _CU_DEVICE_ATTRIBUTE_INTEGRATED),
    ):
        value = ctypes.c_int()
        call("read a device attribute", "cuDeviceGetAttribute", ctypes.byref(value), attribute, handle)
        values[key] = value.value
    total = ctypes.c_size_t()
    call("read the device memory size", "cuDeviceTotalMem_v2", ctypes.byref(total), handle)
    driver_version = ctypes.c_int()
    call("read its version", "cuDriverGetVersion", ctypes.byref(driver_version))
    return GpuInfo(
        name=name.value.decode(errors="replace").strip(),
        compute_capability=f"{values['major']}.{values['minor']}",
        total_memory_mib=total.value // (1 << 20),
        integrated=bool(values["integrated"]),
        driver_cuda_version=format_cuda_version(driver_version.value),
    )


def parse_l4t_release(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.0, GCID: ..."`` (``/etc/nv_tegra_release``) -> ``"36.4.0"``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _dpkg_version(package: str, run: Callable[..., Any]) -> str | None:
    try:
        result = run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def read_jetson_release(
    release_file: Path = TEGRA_RELEASE_FILE, run: Callable[..., Any] = subprocess.run
) -> tuple[str | None, str | None]:
    """``(jetpack, l4t)`` on a Jetson, ``(None, None)`` elsewhere.

    L4T comes from ``/etc/nv_tegra_release``, else the ``nvidia-l4t-core`` package version; JetPack
    from the ``nvidia-jetpack`` package when it is installed (it is not on minimal images).
    """
    l4t = None
    try:
        l4t = parse_l4t_release(release_file.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        pass
    if l4t is None:
        core = _dpkg_version("nvidia-l4t-core", run)
        match = re.match(r"\d+(\.\d+)+", core or "")
        l4t = match.group() if match else None
    jetpack = None
    if l4t is not None:
        match = re.match(r"\d+(\.\d+)+", _dpkg_version("nvidia-jetpack", run) or "")
        jetpack = match.group() if match else None
    return jetpack, l4t


def is_jetson(release_file: Path = TEGRA_RELEASE_FILE) -> bool:
    """Whether this is an NVIDIA Jetson (L4T writes ``/etc/nv_tegra_release``)."""
    return release_file.exists()
