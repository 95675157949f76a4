"""The ``compare`` pipeline stage: two runs' metrics side by side."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from superdml.core.atomic import write_json


def write_comparison(before: Mapping[str, Any], after: Mapping[str, Any], out: Path) -> None:
    """Write ``comparison.json`` and ``comparison.md``: each metric before, after, change."""
    b, a = before.get("metrics", before), after.get("metrics", after)
    rows = {
        k: {"before": b[k], "after": a[k], "change": a[k] - b[k]}
        for k in sorted(set(a) & set(b))
        if isinstance(a[k], int | float) and isinstance(b[k], int | float)
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", rows)
    lines = ["| metric | before | after | change |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {k} | {r['before']:.3f} | {r['after']:.3f} | {r['change']:+.3f} |"
        for k, r in rows.items()
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def compare(before: str | Path, after: str | Path, out: str | Path) -> Path:
    """Compare two ``metrics.json`` files (see :func:`write_comparison`).

    Parameters
    ----------
    before, after : path
        ``metrics.json`` of two ``evaluate`` runs (or a plain mapping of metrics).
    out : path
        Folder for ``comparison.json`` and ``comparison.md``.

    Returns
    -------
    Path
        ``out/comparison.md``.
    """
    out = Path(out)
    write_comparison(json.loads(Path(before).read_text()), json.loads(Path(after).read_text()), out)
    return out / "comparison.md"
