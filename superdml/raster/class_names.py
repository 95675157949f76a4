r"""Class names: the check every entry point applies before a name becomes a folder.

Class names come from data (a ``--classes`` YAML, a label raster's ``class_names`` tag,
a label run's ``label.json``) and become folders (``OUT/<class>/...``). A name is used
as it is, never rewritten, so it must be one ordinary path component:

- a string, not empty, without leading or trailing whitespace;
- no ``/`` or ``\`` and no control character;
- not starting with ``.`` (``.`` and ``..`` walk the tree; training skips hidden folders);
- at most 255 bytes in UTF-8 (the usual file name limit);
- not ``unknown`` (what labeling calls a superpixel too far from every reference) or
  ``unlabeled`` (the folder of crops without a class), in any letter case;
- distinct from the other names of the same source, ignoring letter case (folders that
  differ only in case are one folder on macOS and Windows).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping

from superdml.core.errors import input_error

#: What labeling calls a superpixel too far from every reference.
UNKNOWN = "unknown"
#: The folder of crops without a class (``superdml crops`` without a label raster).
UNLABELED = "unlabeled"
RESERVED = frozenset({UNKNOWN, UNLABELED})
MAX_BYTES = 255


def _problem(name: str) -> str | None:
    """Why `name` is not a folder name, or None when it is one."""
    if not name:
        return "it is empty"
    if name != name.strip():
        return "it has leading or trailing whitespace"
    if "/" in name or "\\" in name:
        return "it contains '/' or '\\'"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it contains a control character"
    if name.startswith("."):
        return "it starts with '.'"
    if len(name.encode("utf-8")) > MAX_BYTES:
        return f"it is longer than {MAX_BYTES} bytes"
    if name.casefold() in RESERVED:
        return f"{UNKNOWN!r} and {UNLABELED!r} are reserved"
    return None


def check_class_name(name: object, source: str | os.PathLike[str], where: str) -> str:
    r"""Return `name` when it can be a class folder name; else raise naming `source`.

    Parameters
    ----------
    name : object
        The class name as read (YAML values and JSON items may be of any type).
    source : path
        The file the name came from, named in the error.
    where : str
        Which entry of `source` it is, e.g. ``"for value 3"``.

    Returns
    -------
    str
        `name`, unchanged.

    Raises
    ------
    InputError
        ``<source>: class name '../x' for value 3 is not a folder name (it contains
        '/' or '\')``.
    """
    if not isinstance(name, str):
        raise input_error(
            source, f"class name {name!r} {where} is not a string (got {type(name).__name__})"
        )
    problem = _problem(name)
    if problem is not None:
        raise input_error(source, f"class name {name!r} {where} is not a folder name ({problem})")
    return name


def check_class_names(
    names: Mapping[int, object], source: str | os.PathLike[str], key: str = "value"
) -> dict[int, str]:
    """Check every name of a mapping id -> class name, and that no two names clash.

    Parameters
    ----------
    names : mapping of int to object
        Class value (or class id) -> name as read.
    source : path
        The file the names came from, named in the error.
    key : str
        What the ids are called in the error (``"value"`` of a label raster,
        ``"class id"`` of a label run).

    Returns
    -------
    dict of int to str
        The same mapping, every name checked.

    Raises
    ------
    InputError
        At the first bad name, or the first two ids whose names are equal ignoring case.
    """
    checked: dict[int, str] = {}
    seen: dict[str, int] = {}
    for value, name in names.items():
        checked[value] = check_class_name(name, source, f"for {key} {value}")
        first = seen.setdefault(checked[value].casefold(), value)
        if first != value:
            raise input_error(
                source,
                f"{key}s {first} and {value} have the same class name "
                f"({checked[first]!r}, {checked[value]!r}): class names must be distinct",
            )
    return checked
