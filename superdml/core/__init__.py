"""Foundations of every stage.

Errors, file ownership, atomic writes and locks, provenance, progress, devices,
per-process caches and the task runner.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "errors": [
            "CheckpointError",
            "ConfigError",
            "InputError",
            "MissingInputError",
            "OutputLockedError",
            "SuperDMLError",
            "did_you_mean",
            "input_error",
            "require_dir",
            "require_file",
        ],
        "atomic": [
            "AtomicFiles",
            "OLD_TAG",
            "TEMP_TAG",
            "aside_path",
            "atomic_files",
            "atomic_write",
            "is_temporary",
            "remove",
            "remove_stale_temporaries",
            "replace",
            "temp_path",
            "write_json",
        ],
        "ownership": [
            "LOCK",
            "MARKER",
            "check_apart",
            "check_output",
            "claim_output",
            "clear_listed",
            "foreign_files",
            "mark_output",
            "owner",
            "remove_files",
            "remove_output",
        ],
        "provenance": [
            "FULL_HASH_BYTES",
            "combine",
            "file_fingerprint",
            "fingerprint",
            "sha256_file",
            "tree_fingerprint",
        ],
        "progress": [
            "progress_bar",
        ],
        "cluster": [
            "SHAPES",
            "Shape",
            "Stage",
            "default_workers",
            "make_client",
            "map_tasks",
            "stage_clients",
        ],
        "devices": [
            "DeviceName",
            "resolve_device",
        ],
        "cache": [
            "ProcessCache",
        ],
    },
)
