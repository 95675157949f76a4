"""Error classes that the CLI turns into one line and exit code 2.

Each subclass also derives from the matching builtin (as rasterio's ``errors`` module
does), so library users can catch ``ValueError`` or ``FileNotFoundError`` as usual.
Anything that is not a :class:`SuperDMLError` is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class SuperDMLError(Exception):
    """Base class of every error caused by input, configuration or environment."""


class InputError(SuperDMLError, ValueError):
    """An input file or argument is unusable (wrong bands, corrupt, empty, mismatched)."""


class MissingInputError(SuperDMLError, FileNotFoundError):
    """An input file or folder does not exist."""


class ConfigError(SuperDMLError, ValueError):
    """A configuration value or key is invalid."""


class CheckpointError(SuperDMLError, ValueError):
    """A checkpoint is not one of ours, of another format version, or does not fit."""


class OutputLockedError(SuperDMLError, BlockingIOError):
    """Another superdml run holds the lock of the output folder."""


def did_you_mean(word: object, choices: Iterable[str], prefix: str = "") -> str:
    """Return `` (did you mean 'x'?)`` naming the choice closest to `word`, or ``""``.

    Every message about an unknown name (config key, loss, stage, option, pipeline)
    suggests its fix through this one helper.

    Parameters
    ----------
    word : object
        What was given (compared as ``str``).
    choices : iterable of str
        The accepted names.
    prefix : str
        Written before the suggested name (the dotted path of a nested config key).
    """
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def input_error(path: str | os.PathLike[str], problem: str) -> InputError:
    """Return an :class:`InputError` whose message is ``<path>: <problem>``."""
    return InputError(f"{os.fspath(path)}: {problem}")


def require_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """Raise :class:`MissingInputError` naming `path` unless it is an existing file.

    `path` may be a URI (:mod:`superdml.core.storage`): an object is a file there.
    """
    from superdml.core import storage  # it raises these errors: imported when used

    if not storage.isfile(path):
        problem = "is a folder, expected a file" if storage.isdir(path) else "no such file"
        raise MissingInputError(f"{os.fspath(path)}: {problem} ({what})")


def require_dir(path: str | os.PathLike[str], what: str = "folder") -> None:
    """Raise :class:`MissingInputError` naming `path` unless it is an existing folder.

    `path` may be a URI (:mod:`superdml.core.storage`): a prefix holding objects is a
    folder there.
    """
    from superdml.core import storage

    if not storage.isdir(path):
        problem = "is a file, expected a folder" if storage.isfile(path) else "no such folder"
        raise MissingInputError(f"{os.fspath(path)}: {problem} ({what})")
