"""Progress bars that follow the logging level (silent under ``--quiet``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

logger = logging.getLogger("superdml")


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar, disabled when INFO logging is off."""
    return iter(
        tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            disable=not logger.isEnabledFor(logging.INFO),
            leave=False,
            dynamic_ncols=True,
        )
    )


def progress_bar(total: int, desc: str = "", unit: str = "it") -> tqdm:
    """Return a manual tqdm bar (``update``/``set_postfix_str``) following the log level."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not logger.isEnabledFor(logging.INFO),
        leave=False,
        dynamic_ncols=True,
    )
