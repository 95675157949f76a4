"""Building typed configs from YAML: keys and types checked, one line per error.

:func:`load_config` builds a config dataclass from a YAML file plus ``key=value``
overrides and rejects unknown keys and wrong types with a
:class:`~superdml.core.errors.ConfigError` that names the file, the key, the value and what
was expected. :mod:`superdml.config.schema` holds the dataclasses and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from superdml.core.errors import ConfigError, did_you_mean

C = TypeVar("C")


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``ConfigError("key: got value, expected ...")`` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for option in get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            if origin is tuple and isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            else:
                raise bad
        item_type = get_args(tp)[0]
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a mapping, checking keys and types.

    Raises
    ------
    ConfigError
        On an unknown key (with a close match suggested), a wrong type or a value out
        of range; the message names the key.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            hint = did_you_mean(key, names, prefix)
            raise ConfigError(f"unknown key {prefix + str(key)!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a mapping")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (``bands=[1,2]``, ``lr=1e-3``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: {err}") from None


def load_config(
    path: str | os.PathLike[str] | None,
    cls: type[C],
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """Load `cls` from a YAML file (or its defaults when `path` is None) plus overrides.

    Parameters
    ----------
    path : path or None
        YAML mapping of the config's keys; nested configs as nested mappings.
    cls : dataclass type
        The stage config to build.
    overrides : mapping, optional
        ``{"dotted.key": value}`` applied on top of the file; None values are ignored
        so CLI options that were not given leave the file's value.

    Raises
    ------
    ConfigError
        Naming the file (when there is one) and the key on any unreadable file,
        unknown key or bad value.
    """
    source = os.fspath(path) if path is not None else ""
    data: dict[str, Any] = {}
    if path is not None:
        from superdml.core import storage
        from superdml.core.errors import SuperDMLError

        try:
            text = storage.read_text(path)
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config ({err.strerror})") from None
        except SuperDMLError as err:  # a URI: missing object, access denied
            raise ConfigError(f"{source}: cannot read config ({err})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, key, value)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        if path is None:
            raise
        raise ConfigError(f"{source}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a plain (YAML/JSON-serializable) dict of a config dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def config_hash(config: Any) -> str:
    """Return a short SHA-256 of the config's canonical JSON form."""
    blob = json.dumps(config_to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_config(config: Any, path: str | os.PathLike[str]) -> None:
    """Write the effective config as YAML next to a stage's outputs (whole: a path or URI)."""
    from superdml.core import storage

    storage.write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
