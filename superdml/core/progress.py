"""Progress bars that follow the logging level (silent under ``--quiet``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.std import TqdmExperimentalWarning

# tqdm.auto's choice (a widget in a notebook, text elsewhere) without its asyncio
# subclass, whose import (asyncio) costs every command about 0.1 s
with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    from tqdm.autonotebook import tqdm

T = TypeVar("T")

logger = logging.getLogger("superdml")


def progress_bar(
    total: int | None, desc: str = "", unit: str = "it", iterable: Iterable[T] | None = None
) -> tqdm:
    """Return a tqdm bar, disabled when INFO logging is off (``--quiet``).

    Without `iterable` it is a manual bar (``update``, ``set_postfix_str``).
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not logger.isEnabledFor(logging.INFO),
        leave=False,
        dynamic_ncols=True,
    )


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Iterate over `iterable` with a progress bar."""
    return iter(progress_bar(total, desc, unit, iterable))
