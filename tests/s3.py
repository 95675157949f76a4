"""An S3 emulator for tests: moto's threaded server in a child process, GDAL and fsspec on it.

:func:`s3_emulator` starts ``moto``'s server on a free port of 127.0.0.1, creates
:data:`BUCKET` and points GDAL (``AWS_S3_ENDPOINT``, ``AWS_HTTPS=NO``,
``AWS_VIRTUAL_HOSTING=FALSE``) and ``s3fs`` (:mod:`superdml.core.storage` follows GDAL's
endpoint) at it through the environment, with fake credentials that no real account
has: child processes (dask workers, a ``superdml`` subprocess) inherit them.

The server runs in a process of its own, not in a thread of the test process: a
thread would need the test process's GIL to answer, and GDAL waits for the answer in
one thread while another holds the GIL (two tiles read at once): a deadlock.
The fixtures ``s3_endpoint`` (session) and ``bucket`` (a fresh prefix per test) in
``conftest.py`` use it.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BUCKET = "superdml-test"
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
"""Variables that would point elsewhere: unset while the emulator runs."""
ACCESS_KEY = "SDMLFAKEACCESSKEY0001"
SECRET_KEY = "sdml-fake-secret-7Rq2xV9wPz"  # the credential tests look for in logs
"""Fake credentials: distinctive, so a test can assert they appear in no log or file."""


def emulator_env(host: str, port: int, home: str) -> dict[str, str]:
    """The environment that points GDAL and s3fs at the emulator (and away from real AWS)."""
    return {
        "AWS_S3_ENDPOINT": f"{host}:{port}",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # no real account's files or profile: only the variables above count
        "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _serve(ports: Any) -> None:
    """The emulator's process: serve until terminated (request logs off)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    ports.put(server.get_host_and_port())
    threading.Event().wait()


@contextmanager
def s3_emulator(home: str) -> Iterator[dict[str, str]]:
    """Run the emulator with :data:`BUCKET`; yield the environment it set (restored after).

    Parameters
    ----------
    home : str
        A folder for the (empty) AWS config files the environment names.
    """
    import boto3

    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    host, port = ports.get(timeout=60)
    env = emulator_env(host, port, home)
    saved = {key: os.environ.get(key) for key in (*env, *_UNSET)}
    for key in _UNSET:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.join()
