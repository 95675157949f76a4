"""Foundations of every stage.

Errors, file ownership, atomic writes and locks, storage (paths and URIs), provenance,
progress, devices, per-process caches, GDAL's read settings and the task runner (with
its worker plugin).

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
            "OLD_TAG",
            "TEMP_TAG",
            "aside_path",
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
        "gdal_settings": [
            "READ_SETTINGS",
            "REMOTE_OPEN_SETTINGS",
            "REMOTE_PREFIXES",
            "apply_read_settings",
            "is_remote",
            "read_settings",
        ],
        "worker_plugin": [
            "WorkerSettings",
        ],
        "storage": [
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
        ],
    },
)
