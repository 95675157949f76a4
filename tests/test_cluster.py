"""map_tasks without a client: in order, or on threads (superdml.core.cluster)."""

import threading
import time

import pytest

from superdml.core.cluster import SHAPES, make_client, map_tasks, stage_clients
from superdml.core.errors import InputError


def square_slowly(x):
    time.sleep(0.01 * (x % 3))  # results finish out of order
    return x * x, threading.current_thread().name


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_in_call_order(threads):
    seen = []
    out = map_tasks(square_slowly, [(x,) for x in range(10)], threads=threads,
                    on_result=lambda i, r: seen.append(i))  # fmt: skip
    assert [r[0] for r in out] == [x * x for x in range(10)]
    assert sorted(seen) == list(range(10))
    names = {r[1] for r in out}
    assert len(names) == (1 if threads == 1 else threads)


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


@pytest.mark.slow
def test_stage_clients_make_one_client_per_shape_on_first_use():
    with stage_clients() as client_for:
        assert client_for("label") is None  # labeling runs in this process
    with stage_clients(workers=1) as client_for:
        client = client_for("cpu")
        assert len(client.nthreads()) == 1
        assert client_for("label") is client  # --workers: every stage shares it
    assert client.status == "closed"
    with pytest.raises(InputError, match="give one, not both"):
        with stage_clients(workers=1, scheduler="tcp://127.0.0.1:1"):
            pass
