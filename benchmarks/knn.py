"""kNN search throughput: the reference index's search against a plain GEMM + top-k.

A part of ``benchmarks/run.py``; each function runs in a fresh process.

``search``: queries per second of :meth:`superdml.search.reference.ReferenceIndex.search` (what
``label`` calls per tile: ``torch.mm`` + ``topk`` for a flat index on the CPU; FAISS GPU or
torch on CUDA)
over ``refs`` random unit vectors of 128 dimensions, k = 10, ``queries`` queries in
tiles of ``tile`` rows (the superpixels of a 1024 px tile at region size 32).

``gemm``: the same shapes as ``torch.mm(queries, refs.T)`` + ``topk`` on the device,
the references already there, one product per tile.
"""

from __future__ import annotations

import time
from typing import Any

DIM, K = 128, 10


def _data(spec: dict[str, Any]) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    refs = rng.standard_normal((spec["refs"], DIM), dtype=np.float32)
    queries = rng.standard_normal((spec["queries"], DIM), dtype=np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return refs, queries


def search(spec: dict[str, Any]) -> dict[str, Any]:
    """Queries/s of ``ReferenceIndex.search`` on ``spec["device"]``."""
    import numpy as np

    from superdml.search.reference import ReferenceIndex

    refs, queries = _data(spec)
    n = len(refs)
    labels = np.arange(n, dtype=np.int64) % 8
    files = [f"c{i % 8}/{i}.png" for i in range(n)]
    index = ReferenceIndex.build(refs, labels, [f"c{i}" for i in range(8)], files, "0" * 64)
    index.search(queries[: spec["tile"]], K, spec["device"])  # warm-up (and the GPU copy)
    start = time.perf_counter()
    for i in range(0, len(queries), spec["tile"]):
        index.search(queries[i : i + spec["tile"]], K, spec["device"])
    return {"throughput": len(queries) / (time.perf_counter() - start), "kind": index.index_type}


def gemm(spec: dict[str, Any]) -> dict[str, Any]:
    """Queries/s of ``torch.mm`` + ``topk`` of the same shapes on ``spec["device"]``."""
    import torch

    refs, queries = _data(spec)
    device = torch.device(spec["device"])
    ref_t, query_t = torch.from_numpy(refs).to(device), torch.from_numpy(queries)

    def run(rows: torch.Tensor) -> None:
        sims, ids = torch.mm(rows.to(device), ref_t.T).topk(K, dim=1)
        sims.cpu(), ids.cpu()

    run(query_t[: spec["tile"]])
    start = time.perf_counter()
    for i in range(0, len(queries), spec["tile"]):
        run(query_t[i : i + spec["tile"]])
    return {"throughput": len(queries) / (time.perf_counter() - start)}
