"""Content fingerprints: what an output was made from, compared before anything is reused.

The chain: source raster -> segment run (config hash + ``superpixels.parquet`` hash) ->
crops (crop rule) -> checkpoint (SHA-256) -> reference (hash over every file it loads)
-> label run -> exports. A stage reuses a result only when the fingerprints it recorded
equal those of the inputs in front of it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from superdml.core import storage
from superdml.core.atomic import is_temporary

FULL_HASH_BYTES = 64 << 20
"""Files up to this size are hashed whole; larger ones by sampled blocks."""
_SAMPLES = 64
_BLOCK = 1 << 16
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a whole file (or object: its bytes, read in 1 MiB ranges)."""
    digest = hashlib.sha256()
    if storage.is_uri(path):
        size = storage.info(path)["size"]
        for start in range(0, size, 16 * _CHUNK):
            digest.update(storage.read_bytes(path, start, min(start + 16 * _CHUNK, size)))
        return digest.hexdigest()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Return a content fingerprint of a file: its size and a hash of its bytes.

    Files up to :data:`FULL_HASH_BYTES` are hashed whole. Larger ones (mosaics of many
    GiB) add their mtime and hash ``_SAMPLES`` evenly spaced 64 KiB blocks, first and
    last included: a rewrite in place changes the mtime, and a rewrite that kept the mtime
    almost surely changes a sampled block (a GeoTIFF's header and tile index are in
    them).

    An object in a bucket gets the same fingerprint as the same file on a disk up to
    that size; a larger one has its ETag in place of the mtime (its blocks read as
    ranges).
    """
    found = storage.info(path)
    size, version = found["size"], found["version"]
    if size <= FULL_HASH_BYTES:
        return f"{size}:{sha256_file(path)}"
    digest = hashlib.sha256()
    last = size - _BLOCK
    for i in range(_SAMPLES):
        start = last * i // (_SAMPLES - 1)
        digest.update(storage.read_bytes(path, start, start + _BLOCK))
    return f"{size}:{version}:sampled:{digest.hexdigest()}"


def tree_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Return a fingerprint of every file under `folder`: relative path, size, mtime.

    Hidden entries (names starting with ``.``: our markers, locks, state) and our
    temporaries are left out, so only what people and stages put there counts. Under a
    prefix of a bucket each object's ETag stands for its mtime.
    """
    if storage.is_uri(folder):
        digest = hashlib.sha256()
        for rel in storage.list_files(folder):
            parts = rel.split("/")
            if any(p.startswith(".") or is_temporary(p) for p in parts):
                continue
            found = storage.info(storage.join(folder, rel))
            digest.update(f"{rel}:{found['size']}:{found['version']};".encode())
        return digest.hexdigest()
    folder = Path(folder)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_temporary(d))
        for name in sorted(files):
            if name.startswith(".") or is_temporary(name):
                continue
            path = Path(root) / name
            st = path.stat()
            rel = path.relative_to(folder).as_posix()
            digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Return :func:`file_fingerprint` of a file, :func:`tree_fingerprint` of a folder.

    ``missing`` when `path` does not exist.
    """
    if storage.isfile(path):
        return "file:" + file_fingerprint(path)
    if storage.isdir(path):
        return "tree:" + tree_fingerprint(path)
    return "missing"


def combine(*parts: object) -> str:
    """Return one SHA-256 over several fingerprints (their ``str``)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()
