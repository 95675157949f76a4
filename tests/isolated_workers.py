"""Dask workers that share no disk with the test process, as on Kubernetes or Coiled.

:func:`isolated_cluster` runs a scheduler in this process and starts ``dask worker``
processes that each live in a temporary folder of their own (working directory,
``TMPDIR``, ``HOME``, superdml's cache and scratch folders) and are denied the test
process's temporary root, where every test file lives:

- where the kernel lets an unprivileged process make a user and mount namespace
  (``unshare --user --map-root-user --mount``: Linux, as in CI), that root is covered by
  an empty ``tmpfs`` in the worker's own view of the file system, so no open of a client
  file can succeed, whoever makes it: Python, GDAL, pyarrow or FAISS. A container or a
  separate machine is what this stands for; it costs nothing here;
- everywhere, a preload (:mod:`worker_preload`) makes Python's opens and listings there
  raise :class:`PermissionError` (an audit hook, which C libraries bypass);
- and :func:`local_paths` finds, in the task specs the scheduler received (recorded by
  :class:`TaskSpecs`), any argument that is a local path rather than a URI.

The workers inherit this process's environment, so the S3 emulator's endpoint and
credentials (:mod:`s3`) reach them as a pod's environment would; they import superdml
and the test modules from this checkout.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from processes import child_env

PRELOAD = Path(__file__).with_name("worker_preload.py")


def can_unshare() -> bool:
    """Whether this process may start a command in a user and mount namespace of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


class TaskSpecs(SchedulerPlugin):
    """Keep the spec (function and arguments) of every task the scheduler is given."""

    def __init__(self) -> None:
        self.specs: list[Any] = []

    def update_graph(self, scheduler: Any, *, tasks: list, **kwargs: Any) -> None:
        for key in tasks:
            state = scheduler.tasks.get(key)
            if state is not None:
                self.specs.append(state.run_spec)


def _leaves(obj: Any, depth: int = 0) -> Iterator[Any]:
    """Yield the strings and paths inside a task spec (its arguments, their fields...)."""
    if depth > 12 or obj is None or isinstance(obj, int | float | bool | bytes | type):
        return
    if isinstance(obj, str | os.PathLike):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(key, depth + 1)
            yield from _leaves(value, depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for item in obj:
            yield from _leaves(item, depth + 1)
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, field.name), depth + 1)
    elif hasattr(obj, "__slots__") or hasattr(obj, "__dict__"):
        names = [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
        names += list(getattr(obj, "__dict__", {}))
        for name in names:
            if not callable(value := getattr(obj, name, None)):
                yield from _leaves(value, depth + 1)


def local_paths(specs: list[Any], root: Path) -> list[str]:
    """Return the arguments of `specs` that are paths under `root` (this process's files)."""
    root_text = str(root.resolve())
    return sorted({str(leaf) for spec in specs for leaf in _leaves(spec) if root_text in str(leaf)})


@contextmanager
def isolated_cluster(deny: Path, workers: int = 2) -> Iterator[tuple[str, TaskSpecs]]:
    """Yield the address of a scheduler whose `workers` workers are denied `deny`.

    Also yields the :class:`TaskSpecs` of every task submitted meanwhile.
    """
    from distributed import Client, LocalCluster

    deny = deny.resolve()
    homes = [Path(tempfile.mkdtemp(prefix="superdml-worker-")) for _ in range(workers)]
    if any(deny in home.parents for home in homes):
        raise RuntimeError(f"the workers' folders {homes[0]} lie under the denied {deny}")
    specs = TaskSpecs()
    prefix = (
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         'mount -t tmpfs -o size=1m,mode=0555 tmpfs "$SUPERDML_TEST_DENY" && exec "$@"', "sh"]
        if can_unshare() else []
    )  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    with LocalCluster(n_workers=0, dashboard_address=None, host="127.0.0.1") as cluster:
        cluster.scheduler.add_plugin(specs)
        try:
            for i, home in enumerate(homes):
                env = child_env(
                    PRELOAD.parent, HOME=str(home), TMPDIR=str(home / "tmp"),
                    SUPERDML_CACHE=str(home / "cache"), SUPERDML_SCRATCH=str(home / "tmp"),
                    SUPERDML_TEST_DENY=str(deny),
                )  # fmt: skip
                (home / "tmp").mkdir()
                command = [
                    sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                    "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"isolated-{i}",
                    "--local-directory", str(home / "dask"), "--preload", str(PRELOAD),
                ]  # fmt: skip
                procs.append(subprocess.Popen([*prefix, *command], cwd=home, env=env))
            with Client(cluster) as client:
                client.wait_for_workers(workers, timeout=180)
            yield cluster.scheduler_address, specs
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for home in homes:
                shutil.rmtree(home, ignore_errors=True)
