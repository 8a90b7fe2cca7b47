"""Self-describing artifact names, for ONNX graphs and engines side by side (docs/architecture.md, "Artifacts and the manifest").

``<run>-<H>x<W>-<precision>.onnx`` from ``to-onnx`` (``<run>-<H>x<W>-fp32-ort-cpu.onnx`` with ``--target ort-cpu``);
``<run>-<H>x<W>-<precision>-trt<version>-<device>.engine`` from ``build-engine``; each with a ``.json`` manifest of
the same stem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from reconad.runtime.backends.device import GpuInfo
from reconad.runtime.backends.trt import parse_version
from reconad.runtime.manifest import Manifest

# Checkpoint file names that say nothing about the model: the run folder names the artifacts instead.
GENERIC_CHECKPOINT_STEMS = ("model", "checkpoint", "last", "best", "final")


def artifact_stem(checkpoint: str | Path, provenance: dict[str, Any]) -> str:
    """The name shared by a checkpoint's artifacts: provenance ``run_name``, else the checkpoint's file
    stem, or its folder's name when the stem is generic (``runs/weave/model.ckpt`` -> ``weave``)."""
    checkpoint = Path(checkpoint).resolve()
    name = provenance.get("run_name") if isinstance(provenance.get("run_name"), str) else None
    if not name:
        name = checkpoint.stem
        if name.lower() in GENERIC_CHECKPOINT_STEMS and checkpoint.parent.name:
            name = checkpoint.parent.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "model"


def artifact_name(stem: str, input_hw: tuple[int, int], precision: str, target: str = "tensorrt") -> str:
    """``<stem>-<H>x<W>-<precision>.onnx``, e.g. ``weave-512x512-fp16.onnx``; a graph for another target than
    ``"tensorrt"`` carries it: ``weave-512x512-fp32-ort-cpu.onnx``."""
    suffix = "" if target == "tensorrt" else f"-{target}"
    return f"{stem}-{input_hw[0]}x{input_hw[1]}-{precision}{suffix}.onnx"


def device_slug(gpu_name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"rtx-4090"``, ``"Orin"`` -> ``"orin"``."""
    words = re.sub(r"(?i)\b(nvidia|geforce|tesla|jetson)\b", " ", gpu_name).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "gpu"


def engine_file_name(run: str, input_hw: tuple[int, int], precision: str, tensorrt_version: str, gpu_name: str) -> str:
    """``<run>-<H>x<W>-<precision>-trt<major.minor.patch>-<device>.engine`` (docs/architecture.md, "Artifacts and the manifest")."""
    version = ".".join(str(part) for part in parse_version(tensorrt_version)[:3])
    height, width = input_hw
    return f"{run}-{height}x{width}-{precision}-trt{version}-{device_slug(gpu_name)}.engine"


_PRECISION_TAG = re.compile(r"(?P<sep>[.-])(?P<precision>fp16|fp32|int8)$")


def run_name(onnx_path: Path) -> str:
    """``weave-512x512-fp16.onnx`` (``export_onnx``'s naming) -> ``weave``; ``model.fp16.onnx`` -> ``model``."""
    stem = onnx_path.name.removesuffix(".onnx").removesuffix("-ort-cpu")
    stem = _PRECISION_TAG.sub("", stem)
    return re.sub(r"-\d+x\d+$", "", stem)


def sibling_onnx_path(onnx_path: Path, precision: str) -> Path:
    """The graph of the other precision beside ``onnx_path``: ``w-512x512-fp16.onnx`` <-> ``w-512x512-fp32.onnx``."""
    stem = onnx_path.name.removesuffix(".onnx")
    if _PRECISION_TAG.search(stem):
        return onnx_path.with_name(_PRECISION_TAG.sub(rf"\g<sep>{precision}", stem) + ".onnx")
    return onnx_path.with_name(f"{stem}-{precision}.onnx")


def resolve_engine_path(
    engine_path: Path | None, onnx_path: Path, manifest: Manifest, precision: str, tensorrt_version: str, gpu: GpuInfo
) -> Path:
    """``--out`` as given when it ends in ``.engine``; a folder (or nothing: the ONNX's folder) gets the
    self-describing name."""
    if engine_path is not None and engine_path.suffix == ".engine":
        return engine_path
    name = engine_file_name(run_name(onnx_path), manifest.input_hw, precision, tensorrt_version, gpu.name)
    return (onnx_path.parent if engine_path is None else engine_path) / name
