"""How to build one TensorRT engine: ``BuildConfig`` and the TOML build profiles of ``engines/profiles``.

Precedence: the dataclass defaults < a profile < command-line flags. Torch-free and TensorRT-free.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from reconad.runtime.config import decode_overrides, load_toml, resolve
from reconad.runtime.errors import ReconadError

PRECISIONS = ("fp16", "fp32", "int8")
NETWORK_TYPINGS = ("auto", "strong", "weak")


def _fail(message: str) -> None:
    raise ReconadError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """How to build one engine. Precedence: these defaults < a TOML profile < command-line flags.

    Field names are the profile keys and, with dashes, the ``build-engine`` options.
    """

    precision: str = "fp16"
    workspace_mib: int = 1024  # TensorRT's scratch-memory cap; Jetsons share RAM with the CPU
    min_batch: int = 1
    opt_batch: int = 1  # the batch TensorRT tunes its kernels for: the inspection loop's usual batch
    max_batch: int = 8
    timing_cache: Path | None = None  # reused across builds: rebuilds take seconds instead of minutes
    dla_core: int | None = None  # Jetson Orin's deep-learning accelerator; unsupported layers fall back to the GPU
    version_compatible: bool = False  # the engine also runs on later TensorRT releases of the same major (8.6+)
    hardware_compatible: bool = False  # the engine runs on any Ampere-or-newer discrete GPU (8.6+)
    builder_optimization_level: int | None = None  # 0..5; None keeps TensorRT's default (3)
    network_typing: str = "auto"  # "auto": weak on 8.x, strong on 10+; "weak" is accepted before 10.12

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            _fail(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}.")
        if self.network_typing not in NETWORK_TYPINGS:
            _fail(f"network_typing must be one of {list(NETWORK_TYPINGS)}, got {self.network_typing!r}.")
        if self.workspace_mib < 1:
            _fail(f"workspace_mib must be at least 1, got {self.workspace_mib}.")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            _fail(
                "the batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, "
                f"got {self.min_batch}, {self.opt_batch}, {self.max_batch}."
            )
        if self.dla_core is not None and self.dla_core < 0:
            _fail(f"dla_core must be 0 or more, got {self.dla_core}.")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            _fail(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}.")
        if self.dla_core is not None and self.hardware_compatible:
            _fail("A DLA engine cannot be hardware compatible; drop dla_core or hardware_compatible.")
        if self.timing_cache is not None and not isinstance(self.timing_cache, Path):
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


@dataclasses.dataclass(frozen=True)
class BuildProfile:
    """A TOML build profile (``engines/profiles/*.toml``): a description plus ``BuildConfig`` fields."""

    name: str
    description: str
    overrides: dict[str, Any]


def load_build_profile(path: str | os.PathLike) -> BuildProfile:
    """Read and check a profile; unknown keys and wrong types are refused in one sentence naming the file."""
    path = Path(path)
    data = load_toml(path, "build profile")
    description = data.pop("description", "")
    overrides = decode_overrides(BuildConfig, data, f"build profile {path}")
    return BuildProfile(name=path.stem, description=str(description), overrides=overrides)


def resolve_build_config(profile: BuildProfile | None = None, **flags: Any) -> BuildConfig:
    """Defaults < profile < flags (a flag of None means "not given").

    A ``max_batch`` flag below the profile's ``opt_batch``/``min_batch`` pulls those down with it, so
    ``--max-batch 1`` works with any profile.
    """
    values: dict[str, Any] = dict(profile.overrides) if profile else {}
    given = {key: value for key, value in flags.items() if value is not None}
    if "max_batch" in given:
        defaults = BuildConfig()
        for key in ("opt_batch", "min_batch"):
            if key not in given:
                values[key] = min(values.get(key, getattr(defaults, key)), given["max_batch"])
    return resolve(BuildConfig, values, given, what="build options")
