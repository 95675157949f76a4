"""Where tasks run by default, and map_tasks without a client (superdml.core.cluster)."""

import contextlib
import os
import threading
import time

import pytest

from superdml.core import cluster
from superdml.core.cluster import (
    SHAPES,
    OnDemandCluster,
    Shape,
    cluster_pays,
    make_client,
    map_tasks,
    resolve_client,
    stage_clients,
)
from superdml.core.errors import InputError


def square_slowly(x):
    time.sleep(0.01 * (x % 3))  # results finish out of order
    return x * x, threading.current_thread().name


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_in_call_order(threads):
    out = map_tasks(square_slowly, [(x,) for x in range(10)], threads=threads)
    assert [r[0] for r in out] == [x * x for x in range(10)]
    names = {r[1] for r in out}
    assert len(names) == (1 if threads == 1 else threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_on_result_sees_each_result_once_in_the_calling_thread(threads):
    seen = []
    out = map_tasks(
        square_slowly, [(x,) for x in range(6)], threads=threads,
        on_result=lambda i, r: seen.append((i, r[0], threading.current_thread().name)),
    )  # fmt: skip
    assert sorted(seen) == [(i, i * i, threading.current_thread().name) for i in range(6)]
    assert [r[0] for r in out] == [x * x for x in range(6)]


def test_error_on_a_thread_stops_the_map_after_running_tasks_finish():
    started, finished = [], []

    def task(x):
        started.append(x)
        if x == 2:
            raise KeyboardInterrupt
        time.sleep(0.05)
        finished.append(x)
        return x

    with pytest.raises(KeyboardInterrupt):
        map_tasks(task, [(x,) for x in range(8)], threads=2)
    assert max(started) <= 3  # nothing submitted after the error was seen
    assert sorted(finished) == sorted(x for x in started if x != 2)


def test_label_runs_in_this_process_unless_workers_are_asked_for():
    assert SHAPES["label"].processes == 0
    with make_client(stage="label") as client:
        assert client is None
    with make_client(workers=0) as client:
        assert client is None
    with pytest.raises(InputError, match="give one, not both"):
        with make_client(workers=1, scheduler="tcp://127.0.0.1:1"):
            pass


def test_cluster_pays_only_for_many_tiles_on_many_cores():
    for cores in (1, 2):  # measured: in process wins at every size on 2 cores
        assert not cluster_pays(10_000, cores)
    assert not cluster_pays(31, cores=8) and cluster_pays(32, cores=8)
    assert not cluster_pays(6, cores=16)  # a raster of a few tiles stays in process


def test_default_cpu_stage_runs_few_tiles_in_this_process_without_dask():
    with make_client() as where:
        assert isinstance(where, OnDemandCluster)
        assert resolve_client(where, 6) is None
        assert map_tasks(square_slowly, [(3,)], where)[0][0] == 9
    assert resolve_client(None, 10**6) is None


@pytest.mark.slow
def test_on_demand_cluster_starts_once_for_a_map_that_pays(monkeypatch):
    monkeypatch.setattr(cluster, "default_workers", lambda: 8)  # as on 8 cores
    with contextlib.ExitStack() as stack:
        where = OnDemandCluster(Shape(1, 1), stack)
        assert where.client_for(31) is None
        client = where.client_for(32)
        assert len(client.nthreads()) == 1
        assert where.client_for(1) is client  # started: later maps use it
        assert [r[0] for r in map_tasks(square_slowly, [(2,), (4,)], where)] == [4, 16]
    assert client.status == "closed"


@pytest.mark.slow
def test_stage_clients_make_one_client_per_shape_on_first_use():
    with stage_clients() as client_for:
        assert client_for("label") is None  # labeling runs in this process
        assert isinstance(client_for("cpu"), OnDemandCluster)
        assert client_for("cpu") is client_for("cpu")
    with stage_clients(workers=1) as client_for:
        client = client_for("cpu")
        assert len(client.nthreads()) == 1
        assert client_for("label") is client  # --workers: every stage shares it
    assert client.status == "closed"
    with pytest.raises(InputError, match="give one, not both"):
        with stage_clients(workers=1, scheduler="tcp://127.0.0.1:1"):
            pass


def test_default_workers_counts_the_cores_without_an_affinity_call(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cluster.default_workers() == 6
