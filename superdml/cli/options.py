"""Click parameters generated from declarations: config fields and stage parameters.

A config dataclass (:mod:`superdml.config.schema`) gives one option per field
(``region_size`` -> ``--region-size``; ``augment.hflip`` -> ``--augment-hflip``), typed
from its annotation, documented by the field's numpydoc ``Attributes`` entry and showing
the field's default. Values are not range-checked here: the dataclass does that, so a
bad value reads the same from the command line, a config file and a pipeline. A stage's
other parameters (:class:`superdml.cli.stages.Param`) become its paths and flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
import yaml
from click.core import ParameterSource

from superdml.cli.registry import Param

_HEADER = re.compile(r"^([A-Za-z_][\w, ]*) : ")
_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def field_help(cls: type) -> dict[str, str]:
    """Return ``{field: description}`` from the numpydoc ``Attributes`` sections of `cls`.

    Fields inherited from a base config class are documented there, once. An entry
    naming several fields (``hflip, vflip : bool``) documents each of them; reST markup
    (``x``, `x`, :mod:`x`) is reduced to its text.
    """
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        helps.update(_own_field_help(klass))
    return helps


def _own_field_help(cls: type) -> dict[str, str]:
    """Return ``{field: description}`` of the fields documented in `cls`'s own docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    _, found, section = doc.partition("Attributes\n----------\n")
    helps: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines() if found else []:
        header = _HEADER.match(line)
        if header:
            names = [n.strip() for n in header.group(1).split(",")]
            helps.update(dict.fromkeys(names, ""))
        elif line and not line[0].isspace():
            break  # the next section
        elif line.strip():
            for name in names:
                helps[name] = f"{helps[name]} {line.strip()}".strip()
    return {k: _ROLE.sub(r"\1", v).replace("``", "").replace("`", "") for k, v in helps.items()}


def parse_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Parse ``1,2,3`` into a tuple of 1-based band numbers (a click callback)."""
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected 1-based band numbers like 1,2,3") from None
    if not bands or min(bands) < 1:
        raise click.BadParameter(f"{value!r}: expected 1-based band numbers like 1,2,3")
    return bands


def parse_bands(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Parse ``1,2,B08`` into band numbers and band descriptions (a click callback)."""
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bands = tuple(int(v) if v.isdigit() else v for v in items)
    if not bands or any(b == 0 for b in bands):
        raise click.BadParameter(f"{value!r}: expected band numbers or descriptions like 1,2,B08")
    return bands


def _parse_mapping(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Parse a YAML mapping (``{margin: 0.2}``) (a click callback)."""
    if value is None:
        return None
    try:
        mapping = yaml.safe_load(value)
    except yaml.YAMLError:
        mapping = None
    if not isinstance(mapping, dict):
        raise click.BadParameter(f"{value!r}: expected a YAML mapping like {{margin: 0.2}}")
    return mapping


def _without_none(tp: Any) -> Any:
    """``X | None`` -> ``X``; any other type as it is."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_options(cls: type, prefix: str = "") -> list[click.Option]:
    """Return one click option per field of config dataclass `cls` (see the module doc).

    The option's Python name is the dotted key with ``__`` for ``.``
    (``augment__hflip``); :func:`given` turns it back.
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    options: list[click.Option] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = _without_none(hints[f.name])
        default = _default(f)
        if dataclasses.is_dataclass(tp):
            options += config_options(tp, key + ".")  # type: ignore[arg-type]
            continue
        flag = "--" + key.replace(".", "-").replace("_", "-")
        kwargs: dict[str, Any] = {"help": helps.get(f.name, ""), "default": default}
        if tp is bool:
            decls = [f"{flag}/--no-{flag[2:]}"]
        elif get_origin(tp) is Literal:
            decls = [flag]
            kwargs["metavar"] = "|".join(str(a) for a in get_args(tp))
        elif get_origin(tp) is tuple:
            decls = [flag]
            if str in get_args(get_args(tp)[0]):  # band numbers or descriptions
                kwargs.update(callback=parse_bands, metavar="BAND,BAND,...", default=None)
            else:
                kwargs.update(callback=parse_ints, metavar="N,N,...", default=None)
        elif get_origin(tp) is dict:
            decls = [flag]
            kwargs.update(callback=_parse_mapping, metavar="YAML", default=None)
        else:
            decls = [flag]
            kwargs["type"] = tp
        shown = kwargs["default"] is not None
        options.append(click.Option([*decls, key.replace(".", "__")], show_default=shown, **kwargs))
    return options


class LocationType(click.ParamType):
    """A local path (a :class:`Path`) or an object-store URI (a ``str``, kept as given).

    ``click.Path`` would turn ``s3://bucket/key`` into the path ``s3:/bucket/key``.
    """

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Return a URI as its string, anything else as a :class:`Path`."""
        from superdml.core import storage

        if isinstance(value, Path):
            return value
        return storage.location(value)


LOCATION = LocationType()
"""The click type of every path option: a path or a URI (:mod:`superdml.core.storage`)."""


def param_option(param: Param) -> click.Parameter:
    """Return the click argument or option of one stage parameter."""
    if param.role in ("output", "input"):
        kind: Any = LOCATION
    else:
        kind = click.Choice(param.choices) if param.choices else None
    if param.cli.isupper():  # a positional argument, shown as its metavar
        return click.Argument(
            [param.name],
            type=kind,
            nargs=-1 if param.many else 1,
            required=param.required,
            metavar=param.cli + "..." if param.many else param.cli,
        )
    flag = param.cli or "--" + param.name.replace("_", "-")
    return click.Option(
        [flag, param.name],
        type=kind,
        required=param.required,
        is_flag=param.flag,
        default=param.default,
        show_default=param.default is not None and not param.flag,
        help=param.help,
    )


def given(ctx: click.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """Return the `values` given on the command line (not defaults), with dotted keys."""
    return {
        key.replace("__", "."): value
        for key, value in values.items()
        if ctx.get_parameter_source(key) not in (ParameterSource.DEFAULT, None)
    }
