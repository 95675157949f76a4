"""Nearest-neighbour search, the one labeling vote, and the reference format.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "knn": [
            "Backend",
            "TORCH_BLOCK_ELEMENTS",
            "search",
            "search_chunks",
        ],
        "vote": [
            "EXACT_MATCH",
            "KnnVote",
            "UNKNOWN_LABEL",
            "apply_unknown",
            "balance_weights",
            "calibrate_thresholds",
            "knn_vote",
        ],
        "reference": [
            "IndexType",
            "ReferenceIndex",
            "content_sha256",
            "load_reference",
        ],
        "reference_files": [
            "CONFIG_YAML",
            "Calibration",
            "FILE_STATS_NPY",
            "REFERENCE_FILES",
            "REFERENCE_JSON",
            "StoredReference",
            "check_replaceable",
            "damaged",
            "read_reference",
            "reference_scheme",
            "write_reference",
        ],
        "faiss_index": [
            "NORM_TOLERANCE",
            "gpu_faiss_index",
            "make_faiss_index",
            "reference_problem",
            "search_device",
        ],
    },
)
