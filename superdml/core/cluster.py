"""Where a stage's tasks run (this process, a local cluster, a scheduler), and a map over them.

``make_client`` attaches to a running scheduler, starts a local cluster of the workers
asked for, or by default gives the stage's :data:`SHAPES`: in this process, or an
:class:`OnDemandCluster` that starts a local cluster only for a raster where it pays
(:func:`cluster_pays`), so that whatever a user runs without options takes the fastest
shape for the raster in front of it.
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
    """Return the number of cores this process may run on.

    Where the OS has no affinity call (macOS), all of the machine's cores.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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
#: stages (segment, crops) run one single-threaded process per core, when a cluster
#: pays (:func:`cluster_pays`; else in this process). Labeling runs in
#: this process, tile after tile, its model on every core: measured side by side on the
#: same mosaic it labeled 1.5-2x faster than one worker process of 2 task threads (which
#: overlapped cropping with embedding) or two of 1, since on 2 cores cropping a tile
#: while the other is embedded takes cores from the forward.
SHAPES: dict[Stage, Shape] = {"cpu": Shape(None, 1), "label": Shape(0, 1)}


#: The default shape's rule (:func:`cluster_pays`): a local cluster is started only for
#: a map of at least this many tasks per core, on a machine of more than
#: :data:`IN_PROCESS_CORES` cores.
CLUSTER_TASKS_PER_CORE = 4
#: Up to this many cores a stage's default is to run in this process, whatever the
#: raster's size (measured on 2 cores: ``benchmarks/README.md``, "Default shape").
IN_PROCESS_CORES = 2


def cluster_pays(n_tasks: int, cores: int | None = None) -> bool:
    """Whether a local cluster beats this process for a map of `n_tasks` tile tasks.

    In process, a stage runs its tiles on threads (its compiled kernels and GDAL release
    the GIL), so it already keeps every core busy; a local cluster adds a fixed cost,
    paid before the first tile: worker processes that import the stage (numpy, numba,
    GDAL, pyarrow), load numba's cached kernels, and stop again at the end. Measured on
    2 cores (``benchmarks/README.md``, "Default shape"), the whole ``superdml segment``
    command on real photos: with ``--workers 2`` (the old default, a local cluster of 2
    workers) 14.6 MP (6 tiles) took 1.7 to 3.3 times as long as in process, and 67 MP
    (8192^2, 16 tiles) 1.96 times: the cluster does not catch up with more tiles, since
    two tile threads in process already keep both cores busy.
    So the rule: in process on up to :data:`IN_PROCESS_CORES` cores, whatever the size;
    on more cores (where the Python parts of many tile threads would contend for the
    GIL; unmeasured here) a cluster once the map has :data:`CLUSTER_TASKS_PER_CORE`
    tasks per core, enough to spread its start-up over.

    Parameters
    ----------
    n_tasks : int
        Tasks of the map (tiles).
    cores : int, optional
        Cores this process may use (default: :func:`default_workers`).
    """
    cores = default_workers() if cores is None else cores
    return cores > IN_PROCESS_CORES and n_tasks >= CLUSTER_TASKS_PER_CORE * cores


class OnDemandCluster:
    """The default local cluster of a stage: started by the first map that pays for it.

    A stage given one asks :func:`resolve_client` for its map of tasks: it gets None
    (run in this process) while :func:`cluster_pays` says no, else the client of a local
    cluster of the stage's :class:`Shape`, started then and kept for later maps until
    the :func:`make_client` block ends.
    """

    def __init__(self, shape: Shape, stack: contextlib.ExitStack) -> None:
        self.shape = shape
        self._stack = stack
        self._client: Any = None

    def client_for(self, n_tasks: int) -> Any:
        """Return the client for a map of `n_tasks` tasks, or None to run them in process."""
        if self._client is None and cluster_pays(n_tasks):
            n = self.shape.processes or default_workers()
            logger.info("%d tasks: starting a local cluster of %d workers", n_tasks, n)
            self._client = self._stack.enter_context(_local_client(n, self.shape.threads))
        return self._client


def resolve_client(client: Any, n_tasks: int) -> Any:
    """Return where a map of `n_tasks` tasks runs (None: in this process).

    `client` itself, except an :class:`OnDemandCluster`: its client when a cluster pays.
    """
    if isinstance(client, OnDemandCluster):
        return client.client_for(n_tasks)
    return client


@contextlib.contextmanager
def make_client(
    workers: int | None = None,
    scheduler: str | None = None,
    stage: Stage = "cpu",
) -> Iterator[Any]:
    """Yield where a stage runs its tasks: a dask client, an :class:`OnDemandCluster` or None.

    Parameters
    ----------
    workers : int, optional
        Worker processes of a local cluster, started now; 0 runs everything in this
        process (the client is None). By default, the stage's :data:`SHAPES`: None for a
        stage that runs in this process, else an :class:`OnDemandCluster` that each map
        of tasks resolves (:func:`resolve_client`) by the raster in front of it.
    scheduler : str, optional
        Address of a running ``dask scheduler`` (``tcp://host:8786``) to attach to.
        Its workers, like those of a local cluster, get this process's GDAL read
        settings (:mod:`superdml.core.gdal_settings`) through a worker plugin.
    stage : {"cpu", "label"}
        Whose :class:`Shape` the local cluster takes.
    """
    _check_options(workers, scheduler)
    if scheduler is not None:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s")
        except OSError as err:
            raise InputError(f"{scheduler}: cannot reach the dask scheduler ({err})") from None
        with client:
            yield _set_up_workers(client)
        return
    shape = SHAPES[stage]
    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: expected at least 0")
    if workers == 0 or (workers is None and shape.processes == 0):
        yield None
    elif workers is None:
        with contextlib.ExitStack() as stack:
            yield OnDemandCluster(shape, stack)
    else:
        with _local_client(workers, shape.threads) as client:
            yield client


@contextlib.contextmanager
def _local_client(workers: int, threads: int) -> Iterator[Any]:
    """Start a ``distributed.LocalCluster`` of `workers` processes of `threads` threads."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield _set_up_workers(client)


def _set_up_workers(client: Any) -> Any:
    """Register :class:`~superdml.core.worker_plugin.WorkerSettings` on `client`'s workers.

    Every worker, present and future, gets this process's GDAL read settings before
    its first task; credentials stay with each worker's environment and files.
    """
    from superdml.core.worker_plugin import WorkerSettings

    client.register_plugin(WorkerSettings())
    return client


def _check_options(workers: int | None, scheduler: str | None) -> None:
    if scheduler is not None and workers is not None:
        raise InputError("--workers and --scheduler: give one, not both")


@contextlib.contextmanager
def stage_clients(
    workers: int | None = None, scheduler: str | None = None
) -> Iterator[Callable[[Stage], Any]]:
    """Yield ``client_for(stage)``: the client of each stage shape, for runs of several stages.

    Each is made by :func:`make_client` when a stage of its shape first asks for it,
    shared by the later stages of the same shape, and closed on exit; so a pipeline
    labels in its own process (the ``label`` shape) while segment and export share one
    :class:`OnDemandCluster`, started by the first raster that pays for it. With
    `workers` or `scheduler`, every stage shares one client.
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
    count: Callable[[T], int] | None = None,
    count_unit: str = "items",
    threads: int = 1,
    on_result: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Run ``func(*args)`` for every tuple in `calls`; return results in call order.

    Parameters
    ----------
    func : callable
        A module-level (picklable) function.
    calls : sequence of tuple
        Positional arguments of each call: paths, windows, small parameters.
    client : distributed.Client or OnDemandCluster, optional
        Where to run (:func:`resolve_client`); in this process when None. On a client,
        at most twice its worker threads are submitted and not yet collected, so memory
        stays flat however many tasks there are.
    desc, unit : str
        Progress bar label and unit.
    count : callable, optional
        Items in a result (superpixels of a tile), shown as a rate on the bar.
    count_unit : str
        Name of those items.
    threads : int
        Without a client: tasks run on this many threads of this process, one task per
        thread in flight (worth it where tasks release the GIL: compiled kernels, GDAL).
        An error stops the submission, waits for the running tasks and is raised.
    on_result : callable, optional
        Called as ``on_result(i, result)`` in this thread as each result arrives (in any
        order), while later tasks run: to write a tile's output as soon as it is done.
    """
    client = resolve_client(client, len(calls))
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
    limit = 2 * max(1, sum(client.nthreads().values()))
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
