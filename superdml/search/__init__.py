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
            "EXACT_MATCH",
            "KnnVote",
            "TORCH_BLOCK_ELEMENTS",
            "UNKNOWN_LABEL",
            "Weighting",
            "apply_unknown",
            "knn_vote",
            "search",
            "search_chunks",
        ],
        "reference": [
            "IndexType",
            "ReferenceIndex",
            "content_sha256",
            "load_reference",
        ],
        "reference_files": [
            "CONFIG_YAML",
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
