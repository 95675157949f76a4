"""Where files live: local paths and object-store URIs behind one small set of calls.

A *location* is a local path (``str`` or :class:`~pathlib.Path`) or a URI of an object
store: ``s3://``, ``gs://``, ``az://`` (also ``abfs://``), or ``http(s)://`` (read-only).
Local paths go through :mod:`os` and :mod:`pathlib` exactly as before; URIs through
`fsspec <https://filesystem-spec.readthedocs.io>`_ (``s3fs``, ``gcsfs``, ``adlfs`` for the
stores, installed by the ``cloud`` extra), never through a client of our own. Rasters
are opened by GDAL, which reads the same URIs itself (:func:`gdal_path`).

An object store has no rename and no folders: a "folder" is a key prefix, and an object
appears whole or not at all when its one PUT completes. So an output is written to a
local temporary and then either renamed into place (a local path) or uploaded in one
PUT (a URI), create-only where asked: S3's ``If-None-Match: *``, which makes a second
writer of the same key fail with :class:`FileExistsError` instead of replacing the
first one's object (:func:`write_once`, :func:`write_bytes`).

Credentials and endpoints come from the environment and the stores' own config files
(``AWS_ACCESS_KEY_ID``, ``~/.aws/credentials``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT_NAME``...), never from arguments: nothing here takes or logs a
secret. An S3-compatible endpoint set for GDAL (``AWS_S3_ENDPOINT=host:port``, with
``AWS_HTTPS=NO`` for plain HTTP) is used by ``s3fs`` too, unless ``AWS_ENDPOINT_URL`` says
otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# long: one concept, every call that touches a location, local or in a store (each call
# dispatches on the two); split by verb, the dispatch and its error mapping would repeat
from superdml.core import atomic
from superdml.core.atomic import TEMP_TAG, atomic_write, remove, temp_path
from superdml.core.cache import ProcessCache
from superdml.core.errors import InputError, MissingInputError, SuperDMLError

__all__ = [
    "READ_ONLY_SCHEMES",
    "SCHEMES",
    "Location",
    "arrow_source",
    "cache_dir",
    "delete",
    "delete_tree",
    "exists",
    "filesystem",
    "gdal_env",
    "gdal_path",
    "info",
    "is_uri",
    "isdir",
    "isfile",
    "join",
    "list_files",
    "listdir",
    "local_copy",
    "location",
    "makedirs",
    "name",
    "open_input",
    "parent",
    "read_bytes",
    "read_text",
    "resolve",
    "scratch_dir",
    "stem",
    "upload",
    "upload_tree",
    "write_bytes",
    "write_json",
    "write_once",
    "write_text",
]

Location = str | os.PathLike[str]
"""A local path or a URI (see the module docstring)."""

SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "http", "https")
"""URI schemes taken wherever a path is."""
READ_ONLY_SCHEMES = ("http", "https")
"""Schemes that are read, never written."""

_SESSIONS: ProcessCache[Any] = ProcessCache(size=8)
"""rasterio sessions by scheme (:func:`gdal_env`)."""
#: the package each scheme's fsspec backend comes from (the ``cloud`` extra installs them)
_BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "http": "aiohttp", "https": "aiohttp"}  # fmt: skip


def is_uri(loc: Location) -> bool:
    """Whether `loc` is a URI of an object store (not a local path)."""
    if isinstance(loc, os.PathLike):
        return False
    scheme, sep, _ = str(loc).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def location(loc: Location) -> Path | str:
    """Return `loc` as a :class:`Path` (local) or a URI without a trailing ``/``."""
    if is_uri(loc):
        scheme, _, rest = str(loc).partition("://")
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return Path(loc)


def resolve(loc: Location) -> str:
    """Return `loc` as recorded in manifests: an absolute local path, or the URI."""
    return str(location(loc)) if is_uri(loc) else str(Path(loc).resolve())


def join(loc: Location, *names: str) -> Path | str:
    """Return `loc` / `names` (``/``-separated names, as in a key)."""
    if is_uri(loc):
        return posixpath.join(str(location(loc)), *names)
    return Path(loc).joinpath(*names)


def name(loc: Location) -> str:
    """Return the last component of `loc` (a file or folder name, a key's last part)."""
    if is_uri(loc):
        return posixpath.basename(str(location(loc)))
    return Path(loc).name


def stem(loc: Location) -> str:
    """Return :func:`name` without its last suffix."""
    return Path(name(loc)).stem


def parent(loc: Location) -> Path | str:
    """Return the folder (or prefix) holding `loc`."""
    if is_uri(loc):
        return posixpath.dirname(str(location(loc)))
    return Path(loc).parent


# ---------------------------------------------------------------------- the stores


def _endpoint(protocol: str) -> dict[str, Any]:
    """``s3fs`` options for the S3 endpoint the environment names for GDAL, if any."""
    if protocol != "s3" or os.environ.get(
        "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL")
    ):
        return {}  # botocore reads AWS_ENDPOINT_URL(_S3) itself
    host = os.environ.get("AWS_S3_ENDPOINT")
    if not host:
        return {}
    scheme = (
        "http" if os.environ.get("AWS_HTTPS", "YES").upper() in ("NO", "FALSE", "OFF") else "https"
    )
    return {"endpoint_url": host if "://" in host else f"{scheme}://{host}"}


def filesystem(loc: Location) -> tuple[Any, str]:
    """Return the fsspec filesystem of a URI and the path within it.

    Listings are not cached: other processes (workers) write into the same prefixes.

    Raises
    ------
    SuperDMLError
        When the store's fsspec backend is not installed (the ``cloud`` extra).
    """
    import fsspec

    uri = str(location(loc))
    protocol = uri.partition("://")[0]
    options: dict[str, Any] = {"use_listings_cache": False, **_endpoint(protocol)}
    if protocol in READ_ONLY_SCHEMES:
        options = {}
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError:
        raise SuperDMLError(
            f"{uri}: reading {protocol}:// needs the {_BACKENDS[protocol]} package: "
            "pip install 'superdml[cloud]'"
        ) from None
    return fs, uri if protocol in READ_ONLY_SCHEMES else fs._strip_protocol(uri)


@contextlib.contextmanager
def _errors(loc: Location, what: str) -> Iterator[None]:
    """Turn a store's missing-object and access errors into our one-line errors."""
    try:
        yield
    except FileNotFoundError:
        raise MissingInputError(f"{loc}: no such {what}") from None
    except PermissionError as err:
        raise InputError(
            f"{loc}: access denied ({err}): check the credentials in the environment "
            "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*) or the store's config"
        ) from None


def _writable(loc: Location) -> None:
    if is_uri(loc) and str(loc).partition("://")[0].lower() in READ_ONLY_SCHEMES:
        raise InputError(f"{loc}: http(s) locations are read-only: write to a path or a bucket")


# ------------------------------------------------------------------------- reading


def exists(loc: Location) -> bool:
    """Whether a file, object or non-empty prefix is at `loc`."""
    if not is_uri(loc):
        return os.path.exists(loc)
    fs, path = filesystem(loc)
    with _errors(loc, "object"):
        return bool(fs.exists(path))


def isfile(loc: Location) -> bool:
    """Whether `loc` is a file (an object)."""
    if not is_uri(loc):
        return os.path.isfile(loc)
    fs, path = filesystem(loc)
    with _errors(loc, "object"):
        return bool(fs.isfile(path))


def isdir(loc: Location) -> bool:
    """Whether `loc` is a folder (a prefix holding at least one object, or a bucket)."""
    if not is_uri(loc):
        return os.path.isdir(loc)
    fs, path = filesystem(loc)
    with _errors(loc, "prefix"):
        return bool(fs.isdir(path))


def info(loc: Location) -> dict[str, Any]:
    """Return ``{"size": bytes, "version": token}`` of a file; the token changes with its content.

    The token is the object's ETag (a content hash the store keeps), or a local file's
    mtime in nanoseconds.

    Raises
    ------
    MissingInputError
    """
    if not is_uri(loc):
        try:
            st = os.stat(loc)
        except FileNotFoundError:
            raise MissingInputError(f"{loc}: no such file") from None
        return {"size": st.st_size, "version": str(st.st_mtime_ns)}
    fs, path = filesystem(loc)
    with _errors(loc, "object"):
        found = fs.info(path)
    version = next(
        (str(found[k]).strip('"') for k in ("ETag", "etag", "md5Hash", "LastModified", "mtime")
         if found.get(k)),
        "",
    )  # fmt: skip
    return {"size": int(found.get("size") or 0), "version": version}


def read_bytes(loc: Location, start: int | None = None, end: int | None = None) -> bytes:
    """Return the bytes of a file (``[start, end)`` of them when given).

    Raises
    ------
    MissingInputError
    """
    if not is_uri(loc):
        try:
            with open(loc, "rb") as stream:
                if start is None:
                    return stream.read()
                stream.seek(start)
                return stream.read(None if end is None else end - start)
        except FileNotFoundError:
            raise MissingInputError(f"{loc}: no such file") from None
    fs, path = filesystem(loc)
    with _errors(loc, "object"):
        if start is None:
            return bytes(fs.cat_file(path))
        return bytes(fs.cat_file(path, start=start, end=end))


def read_text(loc: Location) -> str:
    """Return the UTF-8 text of a file."""
    return read_bytes(loc).decode()


def listdir(loc: Location) -> list[str]:
    """Return the names of the entries directly in a folder (or under a prefix), sorted.

    Empty when `loc` does not exist.
    """
    if not is_uri(loc):
        return sorted(os.listdir(loc)) if os.path.isdir(loc) else []
    fs, path = filesystem(loc)
    with _errors(loc, "prefix"):
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
    return sorted(n for n in names if n and str(posixpath.join(path, n)) != path)


def list_files(loc: Location) -> list[str]:
    """Return every file under a folder (or prefix) as a relative ``/``-separated name, sorted.

    Empty when `loc` does not exist or is a file.
    """
    if not is_uri(loc):
        root = Path(loc)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
    fs, path = filesystem(loc)
    with _errors(loc, "prefix"):
        if not fs.isdir(path):
            return []
        found = fs.find(path)
    prefix = path.rstrip("/") + "/"
    return sorted(str(p)[len(prefix) :] for p in found if str(p).startswith(prefix))


@contextlib.contextmanager
def open_input(loc: Location) -> Iterator[Any]:
    """Yield `loc` opened for reading bytes, with seeks (ranges of an object)."""
    if not is_uri(loc):
        with open(loc, "rb") as stream:
            yield stream
        return
    fs, path = filesystem(loc)
    with _errors(loc, "object"), fs.open(path, "rb") as stream:
        yield stream


def arrow_source(loc: Location) -> tuple[str, Any]:
    """Return ``(path, filesystem)`` for pyarrow's readers (``filesystem=None`` locally)."""
    if not is_uri(loc):
        return str(loc), None
    fs, path = filesystem(loc)
    return path, fs


def gdal_env(loc: Location) -> contextlib.AbstractContextManager[Any]:
    """Return the rasterio environment to open `loc` in: its store's session, or none.

    One rasterio session per store and process: rasterio would make one per open (for
    S3 a boto3 session, a tenth of a second of CPU for each window a tile task reads).
    Credentials are still resolved by boto3 (or GDAL), from the environment and config
    files. A local path needs none (rasterio's own).
    """
    if not is_uri(loc):
        return contextlib.nullcontext()
    import rasterio
    from rasterio.session import Session

    scheme = str(loc).partition("://")[0].lower()
    session = _SESSIONS.get(scheme, lambda: Session.from_path(str(loc)))
    return rasterio.Env.from_defaults(session=session)


def gdal_path(loc: Location) -> str:
    """Return what ``rasterio.open`` takes for `loc`: the path, or the URI.

    rasterio maps ``s3://``, ``gs://``, ``az://`` and ``https://`` to GDAL's ``/vsis3/``,
    ``/vsigs/``, ``/vsiaz/`` and ``/vsicurl/``; GDAL reads its credentials and endpoint
    from the environment.
    """
    return str(location(loc))


# ------------------------------------------------------------------------- writing


def makedirs(loc: Location) -> None:
    """Create the folder `loc` and its parents if missing (a bucket's prefix needs none)."""
    if not is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


def scratch_dir() -> Path:
    """Return the local folder for temporaries of uploads (``SUPERDML_SCRATCH`` or the tmp dir)."""
    folder = Path(os.environ.get("SUPERDML_SCRATCH") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def upload(local: Location, loc: Location, create_only: bool = False) -> None:
    """Copy the local file `local` to `loc` in one PUT (a local `loc`: copy and rename).

    Raises
    ------
    FileExistsError
        With `create_only`, when an object (or file) is already at `loc`.
    """
    _writable(loc)
    if not is_uri(loc):
        makedirs(parent(loc))
        with _local_create(loc, create_only) as tmp:
            shutil.copyfile(local, tmp)
        return
    fs, path = filesystem(loc)
    with _errors(loc, "bucket"):
        fs.put_file(os.fspath(local), path, mode="create" if create_only else "overwrite")


@contextlib.contextmanager
def _local_create(loc: Location, create_only: bool) -> Iterator[Path]:
    """:func:`~superdml.core.atomic.atomic_write`; with `create_only`, a link that refuses a file.

    ``os.link`` is atomic and fails on an existing name, as a create-only PUT does.
    """
    if not create_only:
        with atomic_write(loc) as tmp:
            yield tmp
        return
    final = Path(loc)
    tmp = temp_path(final)
    remove(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.link(tmp, final)
    finally:
        remove(tmp)


@contextlib.contextmanager
def write_once(
    loc: Location, create_only: bool = False, keep_suffix: bool = False
) -> Iterator[Path]:
    """Yield a local temporary path; when the body succeeds, what it wrote there becomes `loc`.

    Locally this is :func:`~superdml.core.atomic.atomic_write` (rename into place); for a
    URI the file is written on local scratch space (:func:`scratch_dir`) and uploaded in
    one PUT, so the object appears whole or not at all. A failing body leaves nothing.

    Parameters
    ----------
    loc : location
    create_only : bool
        Refuse to replace an existing object (S3: ``If-None-Match: *``).
    keep_suffix : bool
        The temporary keeps `loc`'s suffix (writers that insist on one: GeoPackage).

    Raises
    ------
    FileExistsError
        With `create_only`, when `loc` already exists (nothing is replaced).
    """
    _writable(loc)
    if not is_uri(loc):
        makedirs(parent(loc))
        with _local_create(loc, True) if create_only else atomic_write(loc, keep_suffix) as tmp:
            yield tmp
        return
    folder = Path(tempfile.mkdtemp(prefix=f"upload{TEMP_TAG}{os.getpid()}.", dir=scratch_dir()))
    try:
        tmp = folder / name(loc)
        yield tmp
        upload(tmp, loc, create_only)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def upload_tree(local: Location, loc: Location, last: str | None = None) -> list[str]:
    """Upload every file under the local folder `local` to the prefix `loc`, one PUT each.

    The file named `last` (relative) goes last: a folder whose manifest lists and hashes
    the others (a reference's ``reference.json``) is then never newer than its parts.
    Returns the relative names uploaded.
    """
    names = sorted(list_files(local), key=lambda rel: (rel == last, rel))
    for rel in names:
        upload(join(local, rel), join(loc, rel))
    return names


def write_bytes(loc: Location, data: bytes, create_only: bool = False) -> None:
    """Write `data` to `loc` whole (see :func:`write_once`)."""
    _writable(loc)
    if not is_uri(loc):
        with write_once(loc, create_only) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(loc)
    with _errors(loc, "bucket"):
        fs.pipe_file(path, data, mode="create" if create_only else "overwrite")


def write_text(loc: Location, text: str, create_only: bool = False) -> None:
    """Write UTF-8 `text` to `loc` whole (see :func:`write_once`)."""
    write_bytes(loc, text.encode(), create_only)


def write_json(loc: Location, obj: Any) -> None:
    """Write `obj` as :func:`superdml.core.atomic.write_json` does, to a path or a URI."""
    if not is_uri(loc):
        atomic.write_json(loc, obj)
        return
    write_text(loc, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete(loc: Location) -> None:
    """Delete one file or object if it exists (the caller knows it is ours)."""
    _writable(loc)
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    with _errors(loc, "object"), contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def delete_tree(loc: Location) -> None:
    """Delete a folder, or every object under a prefix (the caller knows they are ours)."""
    _writable(loc)
    if not is_uri(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = filesystem(loc)
    keys = [posixpath.join(path, rel) for rel in list_files(loc)]
    if keys:
        with _errors(loc, "prefix"):
            fs.rm(keys)


# ------------------------------------------------------------------ local copies


def cache_dir() -> Path:
    """Return the folder of local copies (``SUPERDML_CACHE``, else ``~/.cache/superdml``)."""
    root = os.environ.get("SUPERDML_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "superdml"
    )
    return Path(root) / "objects"


def local_copy(loc: Location) -> Path:
    """Return a local path holding the file or folder at `loc`: itself, or a cached copy.

    A URI is downloaded once into :func:`cache_dir`, under a key of the URI and the
    size and version (ETag) of every object it holds, so a changed object is fetched
    again and an unchanged one never twice. Each copy is complete before it is visible
    (renamed into place; one that another process completed first is kept), so
    processes sharing the cache never read half of one, nor lose one they read.

    Raises
    ------
    MissingInputError
        When nothing is at `loc`.
    """
    if not is_uri(loc):
        if not os.path.exists(loc):
            raise MissingInputError(f"{loc}: no such file or folder")
        return Path(loc)
    uri = str(location(loc))
    if isfile(uri):
        listing = {"": info(uri)}
    else:
        listing = {rel: info(join(uri, rel)) for rel in list_files(uri)}
        if not listing:
            raise MissingInputError(f"{uri}: no such object or prefix")
    key = hashlib.sha256(json.dumps([uri, listing], sort_keys=True).encode()).hexdigest()[:32]
    target = cache_dir() / key / name(uri)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    remove(tmp)
    try:
        if "" in listing:
            tmp.write_bytes(read_bytes(uri))
        else:
            for rel in listing:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(read_bytes(join(uri, rel)))
        os.rename(tmp, target)  # a folder another process put there first stays (ENOTEMPTY)
    except OSError:
        if not target.exists():
            raise
    finally:
        remove(tmp)
    return target
