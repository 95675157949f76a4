"""Class schemes: codes, names and colors of the classes, read and written in one place.

A class scheme (:class:`ClassScheme`) gives every class a code (its value in label
rasters), a color and an optional description, plus the codes of ``unknown`` and of
nodata. This module is the one reader and writer of its two forms: the YAML scheme file
people write (``--classes``, a crop folder's ``classes.yaml``; :func:`read_scheme`,
:func:`write_scheme`) and the JSON form stored in checkpoints, references and
``label.json`` (:meth:`ClassScheme.to_dict`, :meth:`ClassScheme.from_dict`).
Class names in a scheme pass :func:`~superdml.raster.class_names.check_class_name`.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import yaml

from superdml.core import storage
from superdml.core.errors import InputError, input_error, require_file
from superdml.raster.class_names import UNKNOWN, check_class_names

#: The scheme file at the root of a crop folder (``superdml crops`` writes it; people may).
SCHEME_FILE = "classes.yaml"
MAX_CODE = 65535  # uint16, the widest label raster
UNKNOWN_COLOR = (128, 128, 128)
_HEX = re.compile(r"#([0-9a-fA-F]{6})")


@dataclass(frozen=True)
class ClassEntry:
    """One class of a scheme.

    Attributes
    ----------
    code : int
        Its value in label rasters, in 0..65535.
    name : str
        A folder name (see :func:`~superdml.raster.class_names.check_class_name`).
    color : tuple of 3 int
        RGB, 0..255.
    description : str or None
    """

    code: int
    name: str
    color: tuple[int, int, int]
    description: str | None = None


@dataclass(frozen=True)
class ClassScheme:
    """A classification scheme: codes, names, colors, plus the unknown and nodata codes.

    Attributes
    ----------
    entries : tuple of ClassEntry
        Sorted by code; codes and names (ignoring case) distinct.
    unknown : int
        Code of ``unknown`` (a superpixel too far from every reference), not a class code.
    nodata : int
        Code of pixels without a superpixel or prediction, not a class code.
    """

    entries: tuple[ClassEntry, ...]
    unknown: int
    nodata: int = 0

    @property
    def names(self) -> list[str]:
        """Class names by code."""
        return [e.name for e in self.entries]

    @property
    def codes(self) -> dict[str, int]:
        """Code of each class name."""
        return {e.name: e.code for e in self.entries}

    @property
    def dtype(self) -> str:
        """``"uint8"`` when every code (unknown and nodata too) fits, else ``"uint16"``."""
        top = max([self.unknown, self.nodata, *(e.code for e in self.entries)])
        return "uint8" if top <= 255 else "uint16"

    def codes_of(self, names: list[str] | tuple[str, ...]) -> np.ndarray:
        """Return the (N,) int64 codes of `names` (``unknown`` included).

        Raises
        ------
        KeyError
            For a name that is neither a class of the scheme nor ``unknown``.
        """
        codes = {**self.codes, UNKNOWN: self.unknown}
        return np.asarray([codes[n] for n in names], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in checkpoints, references and ``label.json``."""
        return {
            "classes": [
                {"code": e.code, "name": e.name, "color": _hex(e.color)}
                | ({"description": e.description} if e.description else {})
                for e in self.entries
            ],
            "unknown": self.unknown,
            "nodata": self.nodata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike[str]) -> ClassScheme:
        """Inverse of :meth:`to_dict`, checked as a scheme file is; errors name `source`."""
        try:
            raw = {int(c["code"]): dict(c) for c in data["classes"]}
            return make_scheme(raw, source, data.get("unknown"), int(data.get("nodata", 0)))
        except InputError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(source, f"malformed class scheme ({err!r})") from None

    def check_compatible(
        self, other: ClassScheme, source: str | os.PathLike[str], other_source: str
    ) -> None:
        """Refuse a code or name that means something else in `other`.

        Raises
        ------
        InputError
            ``<source>: code 3 is 'water' here but 'lake' in <other_source>``.
        """
        mine, theirs = self.codes, other.codes
        by_code = {e.code: e.name for e in other.entries}
        for e in self.entries:
            if e.code in by_code and by_code[e.code] != e.name:
                raise input_error(
                    source,
                    f"code {e.code} is {e.name!r} here but {by_code[e.code]!r} in "
                    f"{other_source}: keep the codes of the classes (or retrain)",
                )
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                raise input_error(
                    source,
                    f"class {name!r} has code {mine[name]} here but {theirs[name]} in "
                    f"{other_source}: keep the codes of the classes (or retrain)",
                )

    def covering(self, names: list[str], source: str | os.PathLike[str]) -> ClassScheme:
        """Return the scheme when it names every class of `names`; else raise.

        Raises
        ------
        InputError
            ``<source>: class folder 'x' is not in the class scheme: add it``.
        """
        known = self.codes
        for name in names:
            if name not in known:
                raise input_error(
                    source,
                    f"class folder {name!r} is not in the class scheme "
                    f"({', '.join(known) or 'empty'}): add it",
                )
        return self

    def with_classes(self, added: Mapping[int, str], source: str | os.PathLike[str]) -> ClassScheme:
        """Return the scheme plus the classes ``code -> name`` of `added` (colors chosen).

        Raises
        ------
        InputError
            Naming `source`, when an added code or name is already in the scheme.
        """
        raw: dict[int, Mapping[str, Any]] = {
            e.code: {"name": e.name, "color": _hex(e.color), "description": e.description}
            for e in self.entries
        }
        for code, name in added.items():
            if code in raw:
                raise input_error(source, f"code {code} is already {raw[code]['name']!r}")
            raw[code] = {"name": name}
        unknown = None if self.unknown in added else self.unknown
        return make_scheme(raw, source, unknown, self.nodata)

    def extended(self, names: list[str]) -> ClassScheme:
        """Return the scheme plus `names` it lacks, on free codes after the highest one.

        Classes already in the scheme keep their codes and colors (retraining with an
        added class keeps the codes of the others).
        """
        taken = {e.code for e in self.entries} | {self.unknown, self.nodata}
        added: dict[int, str] = {}
        code = max([0, *(e.code for e in self.entries)])
        for name in (n for n in names if n not in self.codes):
            code += 1
            while code in taken:
                code += 1
            added[code] = name
        return self.with_classes(added, "class scheme") if added else self


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


#: matplotlib's ``tab20`` colors as 8-bit RGB (a constant: importing matplotlib for them
#: took a fifth of a second of every export).
TAB20: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)  # fmt: skip


def palette(n: int, avoid: set[tuple[int, int, int]] | None = None) -> list[tuple[int, int, int]]:
    """Return `n` distinct RGB colors: tab20 first, then golden-angle hues, minus `avoid`."""
    avoid = avoid or set()
    colors: list[tuple[int, int, int]] = []
    i = 0
    while len(colors) < n:
        if i < len(TAB20):
            color = TAB20[i]
        else:
            hsv = colorsys.hsv_to_rgb(((i - 20) * 0.618034) % 1, 0.65, 0.9)
            color = cast(tuple[int, int, int], tuple(int(round(255 * c)) for c in hsv))
        if color not in avoid and color not in colors:
            colors.append(color)
        i += 1
    return colors


def _color(value: object, source: str | os.PathLike[str], code: int) -> tuple[int, int, int]:
    if isinstance(value, str) and (match := _HEX.fullmatch(value.strip())):
        h = match[1]
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    raise input_error(
        source, f'color {value!r} for code {code} is not a color (expected "#rrggbb", quoted)'
    )


def _code(value: object, source: str | os.PathLike[str], what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_CODE:
        raise input_error(source, f"{what} {value!r} is not an integer in 0..{MAX_CODE}")
    return value


def make_scheme(
    raw: Mapping[int, Mapping[str, Any]],
    source: str | os.PathLike[str],
    unknown: int | None = None,
    nodata: int = 0,
    colormap: Mapping[int, tuple[int, ...]] | None = None,
) -> ClassScheme:
    """Build and check a scheme from entries ``code -> {"name", "color"?, "description"?}``.

    Colors missing from an entry come from `colormap` (a label raster's color table),
    else from :func:`palette` (distinct from the given colors). Without `unknown`, it is
    255 (254 when nodata is 255) when every class code is below 254, else 65535 (65534).

    Raises
    ------
    InputError
        Naming `source`: a code outside 0..65535, a bad name, two codes with the same
        name, a color that is not a color, or unknown / nodata equal to a class code.
    """
    for code in raw:
        _code(code, source, "code")
    nodata = _code(nodata, source, "nodata code")
    names = check_class_names({c: e.get("name") for c, e in raw.items()}, source, "code")
    given = {c: _color(e["color"], source, c) if "color" in e else None for c, e in raw.items()}
    for c in raw:
        if given[c] is None and colormap is not None and c in colormap:
            given[c] = cast(tuple[int, int, int], tuple(int(v) for v in colormap[c][:3]))
    fill = iter(palette(sum(v is None for v in given.values()), {v for v in given.values() if v}))
    entries = []
    for c in sorted(raw):
        description = raw[c].get("description")
        if description is not None and not isinstance(description, str):
            raise input_error(source, f"description of code {c} is not a string")
        entries.append(ClassEntry(c, names[c], given[c] or next(fill), description or None))
    if unknown is None:
        top = 255 if max([0, *raw]) < 254 else MAX_CODE
        unknown = top if top != nodata else top - 1
    unknown = _code(unknown, source, "unknown code")
    for what, code in (("unknown", unknown), ("nodata", nodata)):
        if code in raw:
            raise input_error(
                source, f"{what} code {code} is also the code of {names[code]!r}: choose another"
            )
    if unknown == nodata:
        raise input_error(source, f"unknown and nodata have the same code {unknown}")
    return ClassScheme(tuple(entries), unknown, nodata)


def default_scheme(names: list[str]) -> ClassScheme:
    """Codes 1..N in sorted name order and distinct palette colors."""
    return make_scheme({i: {"name": n} for i, n in enumerate(sorted(names), 1)}, "class names")


class _CodeTwice(yaml.YAMLError):
    """A mapping key given twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping key given twice (two names on one code)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _CodeTwice(
                    f"code {key!r} is given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_scheme(
    path: str | os.PathLike[str],
    colormap: Mapping[int, tuple[int, ...]] | None = None,
    nodata: int = 0,
) -> ClassScheme:
    """Read a scheme file (``--classes``, ``classes.yaml``).

    The file is a YAML mapping ``code: name`` or ``code: {name: ..., color: "#rrggbb",
    description: ...}``, plus optional ``unknown: <code>`` and ``nodata: <code>``.

    Parameters
    ----------
    path : path
    colormap : mapping of int to RGB(A), optional
        Colors for codes the file gives no color (a label raster's color table).
    nodata : int
        The nodata code when the file gives none.

    Raises
    ------
    MissingInputError
        When `path` is not a file.
    InputError
        One line naming `path`: not YAML, a code given twice, not a mapping, or a bad
        entry (see :func:`make_scheme`).
    """
    require_file(path, "class scheme")
    try:
        loaded = yaml.load(storage.read_text(path), Loader=_UniqueKeyLoader)  # noqa: S506  # a SafeLoader subclass
    except _CodeTwice as err:
        raise input_error(path, f"{err}: one name per code") from None
    except yaml.YAMLError as err:
        raise input_error(path, f"not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(loaded, dict):
        raise input_error(path, "expected a YAML mapping of class code -> name")
    unknown, nodata = loaded.pop("unknown", None), loaded.pop("nodata", nodata)
    raw: dict[int, Mapping[str, Any]] = {}
    for code, entry in loaded.items():
        if type(code) is not int:
            raise input_error(
                path, f"key {code!r} is not a class code (an integer), 'unknown' or 'nodata'"
            )
        if isinstance(entry, dict):
            extra = set(entry) - {"name", "color", "description"}
            if extra:
                raise input_error(
                    path, f"code {code}: unknown key {sorted(map(str, extra))[0]!r} "
                    "(expected name, color, description)"
                )  # fmt: skip
            raw[code] = entry
        else:
            raw[code] = {"name": entry}
    return make_scheme(raw, path, unknown, nodata, colormap)


def write_scheme(path: str | os.PathLike[str], scheme: ClassScheme) -> None:
    """Write `scheme` as a scheme file that :func:`read_scheme` reads back, whole."""
    lines = ["# class code: name, color (and description); see superdml's README"]
    for e in scheme.entries:
        fields = [f"name: {json.dumps(e.name)}", f'color: "{_hex(e.color)}"']
        if e.description:
            fields.append(f"description: {json.dumps(e.description)}")
        lines.append(f"{e.code}: {{{', '.join(fields)}}}")
    lines += [f"unknown: {scheme.unknown}", f"nodata: {scheme.nodata}"]
    storage.write_text(path, "\n".join(lines) + "\n")


def folder_scheme(
    root: str | os.PathLike[str], names: list[str], base: ClassScheme | None = None
) -> ClassScheme:
    """Return the scheme of a labeled crop folder with class folders `names`.

    ``root/classes.yaml`` when present (it must name every class folder); else `base`
    (a checkpoint's scheme) extended by the new classes; else :func:`default_scheme`.

    Raises
    ------
    InputError
        A bad ``classes.yaml``, or a class folder it does not name.
    """
    path = storage.join(root, SCHEME_FILE)
    if storage.isfile(path):
        return read_scheme(path).covering(names, path)
    if base is not None:
        return base.extended(names)
    return default_scheme(names)
