"""kNN search and the kNN vote: the labeling rule of ``label``, ``infer`` and ``evaluate``.

:func:`search` finds the k most similar references of each query by exact inner product
(:func:`search_chunks` yields the same results chunk by chunk, so a caller can reduce
them without holding all neighbours). Embeddings are L2-normalized float32, so inner
product is cosine similarity. Two backends do the search:

``faiss``
    A ``faiss.IndexFlatIP`` over the reference embeddings, or the ``faiss.Index`` given
    as references (IVF, GPU, ...), searched chunk by chunk of queries.
``torch``
    Chunked ``torch.mm`` + ``topk`` on the device of the reference tensor (a GPU without
    a working FAISS GPU build, or the CPU, where it is about 3 times FAISS's flat search,
    ``benchmarks/knn.py``).

Both are exact and give the same results up to the order of exactly tied similarities
and float rounding. :mod:`superdml.search.vote` turns the neighbours' classes into
labels, scores and margins.

This module depends on numpy, torch and FAISS only, not on checkpoints, data or models,
so metrics can use it without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, get_args

import faiss
import numpy as np
import torch
from torch import Tensor

from superdml.config.checks import is_count
from superdml.config.schema import check
from superdml.core.errors import InputError

__all__ = [
    "TORCH_BLOCK_ELEMENTS",
    "Backend",
    "search",
    "search_chunks",
]

Backend = Literal["auto", "faiss", "torch"]


#: Largest (queries x references) similarity block the torch backend forms at once.
TORCH_BLOCK_ELEMENTS = 1 << 26

#: Queries per chunk of each backend when `chunk_size` is not given.
_DEFAULT_CHUNK = {"faiss": 65536, "torch": 4096}

#: ``find(start, stop, k)``: (sims, ids) of queries ``start:stop``, padded to k columns.
_Find = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------ search


def _as_matrix(array: np.ndarray | Tensor, name: str) -> np.ndarray:
    """Return `array` as a C-contiguous (N, D) float32 ndarray, or raise InputError."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{name}: got a {array.dtype} array of shape {array.shape}, "
            "expected an (N, D) float array"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _as_tensor(array: np.ndarray | Tensor, name: str) -> Tensor:
    """Return `array` as an (N, D) float32 tensor (on its device), or raise InputError."""
    if isinstance(array, Tensor):
        if array.ndim != 2 or not array.is_floating_point():
            raise InputError(
                f"{name}: got a {array.dtype} tensor of shape {tuple(array.shape)}, "
                "expected an (N, D) float tensor"
            )
        return array.float()
    matrix = _as_matrix(array, name)
    return torch.from_numpy(matrix) if matrix.flags.writeable else torch.tensor(matrix)


def _check_sizes(query_dim: int, reference_dim: int) -> None:
    if query_dim != reference_dim:
        raise InputError(
            f"query: got embeddings of size {query_dim}, the references have size {reference_dim}"
        )


def _faiss_find(
    queries: np.ndarray | Tensor, references: np.ndarray | Tensor | faiss.Index
) -> tuple[int, int, _Find]:
    """Return (N, M, find) searching a FAISS index (a flat one over plain embeddings)."""
    query = _as_matrix(queries, "query")
    if isinstance(references, faiss.Index):
        index = references
    else:
        reference = _as_matrix(references, "reference")
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference)
    _check_sizes(query.shape[1], index.d)

    def find(start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(query[start:stop], k)

    return len(query), int(index.ntotal), find


def _torch_find(
    queries: np.ndarray | Tensor, references: np.ndarray | Tensor | faiss.Index
) -> tuple[int, int, _Find]:
    """Return (N, M, find) computing ``torch.mm`` + ``topk`` on the references' device."""
    if isinstance(references, faiss.Index):
        raise InputError(
            "reference: the torch backend searches embeddings, got a faiss index: "
            "pass backend='faiss' or the embeddings"
        )
    reference = _as_tensor(references, "reference")
    query = _as_tensor(queries, "query").to(reference.device)
    _check_sizes(query.shape[1], reference.shape[1])

    def find(start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = query[start:stop]
        sims = np.full((len(rows), k), -np.inf, dtype=np.float32)
        ids = np.full((len(rows), k), -1, dtype=np.int64)
        found = min(k, len(reference))
        with torch.inference_mode():
            top = torch.topk(rows @ reference.T, found, dim=1)
            sims[:, :found] = top.values.cpu().numpy()
            ids[:, :found] = top.indices.cpu().numpy()
        return sims, ids

    return len(query), len(reference), find


def _drop_self(
    sims: np.ndarray, ids: np.ndarray, first_row: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own reference (by index) from its k + 1 neighbours.

    Row ``i`` of the chunk is reference ``first_row + i``. When the query's own index is
    not among its k + 1 neighbours (more than k + 1 exact duplicates tie with it), the
    last neighbour is dropped instead, which is one of the tied duplicates.
    """
    is_self = ids == np.arange(first_row, first_row + len(ids))[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)


def search_chunks(
    queries: np.ndarray | Tensor,
    references: np.ndarray | Tensor | faiss.Index,
    k: int,
    *,
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield the k nearest references of consecutive chunks of queries.

    Same arguments and results as :func:`search`, one chunk at a time, so a caller can
    reduce each chunk without holding all ``(N, k)`` neighbours. Arguments are checked
    when this is called, before the first chunk is searched.

    Returns
    -------
    chunks : iterator of (int, ndarray, ndarray)
        ``(start, sims, ids)`` per chunk: the row of `queries` where the chunk starts,
        its ``(n, k)`` float32 similarities and ``(n, k)`` int64 reference rows (-1 for
        padding), as :func:`search` returns them.
    """
    check(is_count(k), "k", k, "an integer >= 1")
    check(chunk_size is None or is_count(chunk_size), "chunk_size", chunk_size, "an integer >= 1")
    check(backend in get_args(Backend), "backend", backend, "one of auto, faiss, torch")
    if backend == "auto":
        backend = "torch" if isinstance(references, Tensor) else "faiss"
    make = _faiss_find if backend == "faiss" else _torch_find
    n, m, find = make(queries, references)
    if exclude_self and n != m:
        raise InputError(
            f"exclude_self needs the queries to be the references: got {n} queries "
            f"and {m} references"
        )
    rows = int(chunk_size or _DEFAULT_CHUNK[backend])
    if backend == "torch":
        rows = max(1, min(rows, TORCH_BLOCK_ELEMENTS // max(m, 1)))
    return _chunks(n, find, int(k), exclude_self, rows)


def _chunks(
    n: int, find: _Find, k: int, exclude_self: bool, rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, n, rows):
        sims, ids = find(start, start + rows, k + 1 if exclude_self else k)
        if exclude_self:
            sims, ids = _drop_self(sims, ids, start, k)
        sims[ids < 0] = -np.inf
        yield start, sims, ids.astype(np.int64, copy=False)


def search(
    queries: np.ndarray | Tensor,
    references: np.ndarray | Tensor | faiss.Index,
    k: int,
    *,
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most similar references of each query (exact inner product).

    Parameters
    ----------
    queries : (N, D) float ndarray or Tensor
        Query embeddings (L2-normalized for cosine similarity); cast to float32.
    references : (M, D) float ndarray or Tensor, or faiss.Index
        Reference embeddings, or (``faiss`` backend) an index whose search returns
        similarities (larger is closer), e.g. a GPU or IVF index.
    k : int
        Number of neighbours. When fewer than `k` references are available the rows
        are padded with id -1 and similarity ``-inf``.
    backend : {"auto", "faiss", "torch"}
        How to search (see the module docstring). ``auto``: ``torch`` for a Tensor of
        references (on its device), ``faiss`` otherwise. The ``torch`` backend moves
        the queries to the device of the references (keep them there between calls).
    exclude_self : bool
        The queries are the references (N == M): leave out each query's own row, by
        index, so duplicated embeddings still find each other.
    chunk_size : int, optional
        Most queries searched at once (65536 for ``faiss``, 4096 for ``torch``, whose
        blocks also stay under :data:`TORCH_BLOCK_ELEMENTS` similarities), so the full
        (N, M) similarity matrix is never formed.

    Returns
    -------
    sims : (N, k) float32 ndarray
        Similarities, most similar first.
    ids : (N, k) int64 ndarray
        Rows of the references, -1 for padding.

    Raises
    ------
    InputError
        On inputs that are not (N, D) float, mismatched sizes D, `exclude_self` with
        N != M, or a faiss index for the ``torch`` backend.
    ConfigError
        If `k` or `chunk_size` is not a positive integer, or on an unknown `backend`.
    """
    chunks = search_chunks(
        queries, references, k, backend=backend, exclude_self=exclude_self, chunk_size=chunk_size
    )
    n = len(queries)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start, chunk_sims, chunk_ids in chunks:
        sims[start : start + len(chunk_ids)] = chunk_sims
        ids[start : start + len(chunk_ids)] = chunk_ids
    return sims, ids


# -------------------------------------------------------------------------- vote
