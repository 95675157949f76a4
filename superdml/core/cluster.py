"""Dask clients from options, and a bounded map over tasks.

``make_client`` gives a local cluster shaped for the stage (:data:`SHAPES`), or attaches
to a running scheduler.
``map_tasks`` runs one function over many argument tuples on that client, keeping at
most a few tasks in flight so memory stays flat however many tiles there are; without a
client it runs them in this process, in order or on a few threads.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from superdml.core.errors import InputError
from superdml.core.progress import progress_bar

T = TypeVar("T")

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Return the number of cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass(frozen=True)
class Shape:
    """The local cluster of a stage.

    Attributes
    ----------
    processes : int or None
        Worker processes; one per core when None, none (run in this process) when 0.
    threads : int
        Task threads per process.
    """

    processes: int | None
    threads: int


Stage = Literal["cpu", "label"]

#: Local cluster shapes, from measurements on 2 cores (``benchmarks/README.md``). CPU
#: stages (segment, crops) run one single-threaded process per core. Labeling runs in
#: this process, tile after tile, its model on every core: measured side by side on the
#: same mosaic it labeled 1.5-2x faster than one worker process of 2 task threads (which
#: overlapped cropping with embedding) or two of 1, since on 2 cores cropping a tile
#: while the other is embedded takes cores from the forward.
SHAPES: dict[Stage, Shape] = {"cpu": Shape(None, 1), "label": Shape(0, 1)}


@contextlib.contextmanager
def make_client(
    workers: int | None = None,
    scheduler: str | None = None,
    stage: Stage = "cpu",
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: attached to `scheduler`, else a local cluster.

    Parameters
    ----------
    workers : int, optional
        Worker processes of the local cluster (default: the stage's :data:`SHAPES`); 0
        runs everything in this process without a cluster (the client is None).
    scheduler : str, optional
        Address of a running ``dask scheduler`` (``tcp://host:8786``) to attach to.
    stage : {"cpu", "label"}
        Whose :class:`Shape` the local cluster takes.
    """
    from distributed import Client, LocalCluster

    _check_options(workers, scheduler)
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as err:
            raise InputError(f"{scheduler}: cannot reach the dask scheduler ({err})") from None
        with client:
            yield client
        return
    shape = SHAPES[stage]
    n = shape.processes if workers is None else workers
    if n is not None and n < 0:
        raise InputError(f"--workers {n}: expected at least 0")
    if n == 0:
        yield None
        return
    with (
        LocalCluster(
            n_workers=n or default_workers(),
            threads_per_worker=shape.threads,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _check_options(workers: int | None, scheduler: str | None) -> None:
    if scheduler is not None and workers is not None:
        raise InputError("--workers and --scheduler: give one, not both")


@contextlib.contextmanager
def stage_clients(
    workers: int | None = None, scheduler: str | None = None
) -> Iterator[Callable[[Stage], Any]]:
    """Yield ``client_for(stage)``: the client of each stage shape, for runs of several stages.

    Each client is made by :func:`make_client` when a stage of its shape first asks for
    it, shared by the later stages of the same shape, and closed on exit; so a pipeline
    labels in its own process (the ``label`` shape) while segment and export share one
    local cluster. With `workers` or `scheduler`, every stage shares one client.
    """
    _check_options(workers, scheduler)
    made: dict[object, Any] = {}
    with contextlib.ExitStack() as stack:

        def client_for(stage: Stage) -> Any:
            key = SHAPES[stage] if workers is None and scheduler is None else "given"
            if key not in made:
                made[key] = stack.enter_context(make_client(workers, scheduler, stage))
            return made[key]

        yield client_for


def map_tasks(
    func: Callable[..., T],
    calls: Sequence[tuple[Any, ...]],
    client: Any = None,
    desc: str = "",
    unit: str = "tile",
    max_in_flight: int | None = None,
    on_result: Callable[[int, T], None] | None = None,
    count: Callable[[T], int] | None = None,
    count_unit: str = "items",
    threads: int = 1,
) -> list[T]:
    """Run ``func(*args)`` for every tuple in `calls`; return results in call order.

    Parameters
    ----------
    func : callable
        A module-level (picklable) function.
    calls : sequence of tuple
        Positional arguments of each call: paths, windows, small parameters.
    client : distributed.Client, optional
        Where to run; in this process, in order, when None.
    desc, unit : str
        Progress bar label and unit.
    max_in_flight : int, optional
        Tasks submitted but not yet collected (default: twice the worker threads).
    on_result : callable, optional
        ``on_result(index, result)`` called as each result arrives (in completion
        order), for streaming writes.
    count : callable, optional
        Items in a result (superpixels of a tile), shown as a rate on the bar.
    count_unit : str
        Name of those items.
    threads : int
        Without a client: tasks run on this many threads of this process, one task per
        thread in flight (worth it where tasks release the GIL: compiled kernels, GDAL).
        An error stops the submission, waits for the running tasks and is raised.
    """
    results: list[Any] = [None] * len(calls)
    bar = progress_bar(len(calls), desc=desc, unit=unit)
    start, items = time.perf_counter(), 0

    def collect(i: int, result: Any) -> None:
        nonlocal items
        results[i] = result
        if on_result is not None:
            on_result(i, result)
        if count is not None:
            items += count(result)
            rate = items / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} {count_unit}/s", refresh=False)
        bar.update(1)

    if client is None and threads > 1:
        _map_on_threads(func, calls, threads, collect)
        bar.close()
        return results
    if client is None:
        for i, args in enumerate(calls):
            collect(i, func(*args))
        bar.close()
        return results

    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    limit = max_in_flight or 2 * max(1, sum(client.nthreads().values()))
    pending = iter(range(len(calls)))
    futures: dict[Any, int] = {}

    def submit_next() -> None:
        i = next(pending, None)
        if i is not None:
            future = client.submit(func, *calls[i], pure=False, key=f"{func.__name__}-{token}-{i}")
            futures[future] = i
            queue.add(future)

    queue = as_completed()
    for _ in range(min(limit, len(calls))):
        submit_next()
    for future in queue:
        i = futures.pop(future)
        result = future.result()
        future.release()
        collect(i, result)
        submit_next()
    bar.close()
    return results


def _map_on_threads(
    func: Callable[..., T],
    calls: Sequence[tuple[Any, ...]],
    threads: int,
    collect: Callable[[int, T], None],
) -> None:
    """Run the calls on `threads` threads, at most one in flight per thread."""
    pending = iter(range(len(calls)))
    with ThreadPoolExecutor(threads, thread_name_prefix="superdml-task") as pool:
        running: dict[Future[T], int] = {}
        try:
            for first in itertools.islice(pending, threads):
                running[pool.submit(func, *calls[first])] = first
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    collect(running.pop(future), future.result())
                    following = next(pending, None)
                    if following is not None:
                        running[pool.submit(func, *calls[following])] = following
        finally:
            wait(running)  # an error: let the running tasks finish their writes
