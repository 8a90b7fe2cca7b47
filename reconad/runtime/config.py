"""Typed records from JSON and TOML: one decoder for manifests, train configs, build profiles and CLI settings.

``decode`` builds a frozen dataclass from a mapping field by field and refuses, in one sentence naming
the key, unknown or missing keys and wrong types; ``resolve`` applies the precedence every setting has
(dataclass defaults < a file < command-line flags, a flag of None meaning "not given"); ``load_toml``
reads a settings file. Written here rather than taken from pydantic because the runtime must stay a
few small pure-Python modules on a Jetson; the decoder is ~100 lines over ``dataclasses`` and ``typing``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from reconad.runtime.errors import ReconadError

Record = TypeVar("Record")

_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "an object",
    Path: "a path (a string)",
}


def decode(cls: type[Record], data: Any, what: str) -> Record:
    """The dataclass ``cls`` from the mapping ``data`` (JSON or TOML), checked field by field.

    Field types understood: ``int``, ``float`` (an integer is taken), ``str``, ``bool`` (never taken
    for a number, nor a number for it), ``Path`` (from a string), ``dict``, ``tuple[T, ...]`` and
    fixed ``tuple[A, B]`` (from a list), ``dict[str, T]`` (each value checked as T), ``X | None``, and
    nested dataclasses. A missing key takes the
    field's default. The dataclass's own ``__post_init__`` checks values afterwards.

    Args:
        cls: a dataclass type.
        data: the decoded JSON/TOML value.
        what: names the record in messages, e.g. ``"manifest"`` or ``"build profile edge.toml"``.

    Raises:
        ReconadError: one sentence, e.g. ``"build profile edge.toml key max_batch must be an integer,
            got '4'"``, ``"manifest has unknown key(s) 'colour' (known: ...)"``, ``"... key
            'input_tensor.max_batch' is missing"``.
    """
    return _decode_dataclass(cls, data, what, "")


def decode_overrides(cls: type, data: Any, what: str) -> dict[str, Any]:
    """The keys of ``data`` checked and converted as ``decode`` does, without building ``cls``.

    For a layer that holds only some fields (a build profile), checked on its own before it is
    combined with others; defaults are not filled in and ``__post_init__`` does not run.
    """
    return _decode_dataclass(cls, data, what, "", partial=True)


def resolve(cls: type[Record], *layers: Mapping[str, Any] | None, what: str) -> Record:
    """``cls`` from its defaults overridden by each layer in turn (file values, then flags).

    Keys whose value is None are "not given" and leave the value below them in place, so a CLI can
    pass every option it has. Each layer is decoded with ``decode``'s checks.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({key: value for key, value in (layer or {}).items() if value is not None})
    return decode(cls, merged, what)


def load_toml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a TOML file; a missing, unreadable or invalid file is one sentence naming it (``what`` + path)."""
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the tomli backport
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ReconadError(f"Reading {what} {path} on Python 3.10 needs tomli; pip install tomli.") from None
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ReconadError(f"{what[:1].upper()}{what[1:]} {path} is not valid TOML ({error}).") from None


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 settings file's text; a missing or unreadable file is ``"Cannot read <what> <path>: <why>."``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ReconadError(f"Cannot read {what} {path}: {reason}.") from None


def encode(value: Any) -> Any:
    """A JSON-able value: dataclasses become dicts, tuples lists, paths strings; ``decode`` inverts it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: encode(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(item) for item in value]
    if isinstance(value, Mapping):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def require(condition: bool, message: str) -> None:
    """Raise ``ReconadError(message)`` unless ``condition``: the validation step of every record."""
    if not condition:
        raise ReconadError(message)


def check_choice(value: str, choices: tuple[str, ...], key: str, what: str = "manifest") -> None:
    """Refuse a value outside ``choices``: ``"<what> field <key> must be one of [...]"``."""
    require(value in choices, f"{what} field {key} must be one of {list(choices)}, got {value!r}")


def check_iso_date(value: str, key: str) -> None:
    """Refuse a date that is not ISO 8601 (the format of every date in a manifest)."""
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ReconadError(f"manifest field {key} must be an ISO 8601 date, got {value!r}") from None


def utc_now_iso() -> str:
    """The current time as an ISO 8601 UTC string (seconds), the format of every date in a manifest."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fail(message: str) -> typing.NoReturn:
    raise ReconadError(message)


def _decode_dataclass(cls: type, value: Any, what: str, key: str, *, partial: bool = False) -> Any:
    where = f"{what} key {key}" if key else what
    if not isinstance(value, Mapping):
        _fail(f"{where} must be an object, got {value!r}" if key else f"{what} must be an object")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        _fail(f"{where} has unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(fields)})")
    arguments = {}
    for name, field in fields.items():
        child = f"{key}.{name}" if key else name
        if name not in value:
            if partial or field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            _fail(f"{what} key {child!r} is missing")
        arguments[name] = _decode_value(hints[name], value[name], what, child)
    return arguments if partial else cls(**arguments)


def _decode_value(annotation: Any, value: Any, what: str, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if value is None:
            if len(options) == len(typing.get_args(annotation)):
                _fail(f"{what} key {key} must not be null")
            return None
        return _decode_value(options[0], value, what, key)
    if dataclasses.is_dataclass(annotation):
        return _decode_dataclass(annotation, value, what, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(f"{what} key {key} must be a list, got {value!r}")
        arguments = typing.get_args(annotation)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            item_types = [arguments[0]] * len(value)
        elif len(arguments) != len(value):
            _fail(f"{what} key {key} must be a list of {len(arguments)} values, got {list(value)!r}")
        else:
            item_types = list(arguments)
        return tuple(_decode_value(kind, item, what, f"{key}[{i}]") for i, (kind, item) in enumerate(zip(item_types, value)))
    if origin is dict and typing.get_args(annotation):
        if not isinstance(value, Mapping):
            _fail(f"{what} key {key} must be an object, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        if key_type is str and any(not isinstance(name, str) for name in value):
            _fail(f"{what} key {key} must have string keys")
        return {name: _decode_value(value_type, item, what, f"{key}.{name}") for name, item in value.items()}
    base = origin or annotation
    if base is Any:
        return value
    if value is None:
        _fail(f"{what} key {key} must be {_TYPE_NAMES[base]}, not null")
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        _fail(f"{what} key {key} must be {_TYPE_NAMES.get(base, base.__name__)}, got {value!r}")
    return value
