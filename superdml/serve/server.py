"""``superdml serve``: open a crop folder, bind 127.0.0.1, print the URL with its token, serve.

:func:`open_session` does every check before anything listens (a missing folder, a
folder that is not a crop folder, a port in use: one line, exit 2 from the CLI);
:func:`serve` runs the server until interrupted.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from superdml.core.errors import InputError
from superdml.serve.app import Session, make_app
from superdml.serve.decisions import Sorter
from superdml.serve.folder import open_folder
from superdml.serve.retrain import Retrain
from superdml.serve.security import new_token

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServeOptions:
    """How ``superdml serve`` runs.

    Attributes
    ----------
    port : int
        0 picks a free one.
    retrain_dir : Path or None
        Where retrain rounds go (default: ``<folder>-retrain`` beside the crop folder).
    epochs, workers : int or None
        Of the retrain pipeline (None: its own defaults).
    device : {"auto", "cpu", "cuda"}
        Where "more like this" embeds and the retrain runs.
    checkpoint : Path or None
        The model of "more like this" (default: the label run's).
    """

    port: int = 8765
    retrain_dir: Path | None = None
    epochs: int | None = None
    workers: int | None = None
    device: str = "auto"
    checkpoint: Path | None = None


def bind(port: int) -> socket.socket:
    """Return a listening socket on 127.0.0.1:`port`.

    Raises
    ------
    InputError
        The port is in use.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # a port left in TIME_WAIT by a server just stopped is free; one listening is not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {HOST} is in use: pass another --port") from None
        raise InputError(f"cannot listen on {HOST}:{port}: {err.strerror}") from None
    sock.listen(128)
    return sock


def open_session(folder: str | Path, train_dir: str | Path, options: ServeOptions) -> Session:
    """Open the folder, its journal (rolling files forward to it) and a new token."""
    served = open_folder(folder, train_dir)
    sorter = Sorter(served.folder, served.queue, served.train_dir, served.classes)
    retrain_dir = options.retrain_dir or served.folder.with_name(served.folder.name + "-retrain")
    return Session(
        served, sorter, Retrain(Path(retrain_dir).resolve()), new_token(), options.device,
        options.epochs, options.workers, options.checkpoint,
    )  # fmt: skip


def serve(
    folder: str | Path,
    train_dir: str | Path,
    options: ServeOptions,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the review page of `folder` until interrupted (Ctrl-C).

    Parameters
    ----------
    folder : path
        A crop folder (``superdml review`` or ``superdml crops`` output).
    train_dir : path
        Where sorted crops go: ``train_dir/<class>/``.
    options : ServeOptions
    announce : callable
        Receives the line with the page's URL (token included).

    Raises
    ------
    MissingInputError, InputError
        Before listening: see :func:`~superdml.serve.folder.open_folder` and :func:`bind`.
    """
    import uvicorn

    session = open_session(folder, train_dir, options)
    sock = bind(options.port)
    port = sock.getsockname()[1]
    counts = session.served.queue.counts()
    announce(
        f"sorting {counts['pending']} crops of {session.served.folder} into "
        f"{session.served.train_dir}: http://{HOST}:{port}/?token={session.token}"
    )
    config = uvicorn.Config(make_app(session), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
