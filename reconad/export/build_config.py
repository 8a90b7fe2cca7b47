"""How to build one TensorRT engine: ``BuildConfig`` and the TOML build profiles of ``engines/profiles``.

Precedence: the dataclass defaults < a profile < command-line flags. Torch-free and TensorRT-free.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from reconad.runtime.errors import ReconadError

PRECISIONS = ("fp16", "fp32")
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


_FIELD_TYPES: dict[str, type] = {
    "precision": str,
    "workspace_mib": int,
    "min_batch": int,
    "opt_batch": int,
    "max_batch": int,
    "timing_cache": str,
    "dla_core": int,
    "version_compatible": bool,
    "hardware_compatible": bool,
    "builder_optimization_level": int,
    "network_typing": str,
}


@dataclasses.dataclass(frozen=True)
class BuildProfile:
    """A TOML build profile (``engines/profiles/*.toml``): a description plus ``BuildConfig`` fields."""

    name: str
    description: str
    overrides: dict[str, Any]


def _load_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the tomli backport
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ReconadError("Reading a build profile on Python 3.10 needs tomli; pip install tomli.") from None
    return tomllib.loads(text)


def load_build_profile(path: str | os.PathLike) -> BuildProfile:
    """Read and check a profile; unknown keys and wrong types are refused in one sentence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ReconadError(f"Cannot read build profile {path}: {error.strerror or type(error).__name__}.") from None
    try:
        data = _load_toml(text)
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise ReconadError(f"Build profile {path} is not valid TOML ({error}).") from None
    description = data.pop("description", "")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise ReconadError(f"Build profile {path} has unknown key(s) {unknown}; known: {sorted(_FIELD_TYPES)}.")
    for key, value in data.items():
        wanted = _FIELD_TYPES[key]
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ReconadError(f"Build profile {path} key {key} must be {wanted.__name__}, got {value!r}.")
    if "timing_cache" in data:
        data["timing_cache"] = Path(data["timing_cache"])
    return BuildProfile(name=path.stem, description=str(description), overrides=data)


def resolve_build_config(profile: BuildProfile | None = None, **flags: Any) -> BuildConfig:
    """Defaults < profile < flags (a flag of None means "not given").

    A ``max_batch`` flag below the profile's ``opt_batch``/``min_batch`` pulls those down with it, so
    ``--max-batch 1`` works with any profile.
    """
    values: dict[str, Any] = dict(profile.overrides) if profile else {}
    given = {key: value for key, value in flags.items() if value is not None}
    unknown = sorted(set(given) - set(_FIELD_TYPES))
    if unknown:
        raise TypeError(f"unknown build options {unknown}")
    if "max_batch" in given:
        defaults = BuildConfig()
        for key in ("opt_batch", "min_batch"):
            if key not in given:
                values[key] = min(values.get(key, getattr(defaults, key)), given["max_batch"])
    values.update(given)
    return BuildConfig(**values)
