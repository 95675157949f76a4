"""Stages after training: index references, label rasters, infer crop folders, export, review.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "export": [
            "COG_OPTIONS",
            "ExportResult",
            "GDAL_CONFIG",
            "GTIFF_OPTIONS",
            "RasterFormat",
            "WINDOW",
            "check_complete",
            "color_table",
            "label_tags",
            "qgis_style",
            "read_predictions",
            "summarize",
            "write_label_rasters",
        ],
        "index": [
            "IndexResult",
            "build_index",
            "reference_from_folder",
        ],
        "infer": [
            "InferResult",
            "Neighbour",
            "plot_neighbours",
        ],
        "polygons": [
            "POLYGON_SCHEMA",
            "VectorFormat",
            "write_polygons",
        ],
        "predictions": [
            "EMBEDDINGS",
            "IdTable",
            "LabelRun",
            "MANIFEST",
            "PARTS",
            "PART_FILES",
            "RasterParts",
            "embeddings_path",
            "load_label_run",
            "lookup",
            "part_is_current",
            "part_path",
            "part_provenance",
            "predictions_schema",
            "remove_stale_parts",
        ],
        "review": [
            "POOL_FACTOR",
            "REVIEW_FILES",
            "REVIEW_YAML",
            "ReviewResult",
            "pick_diverse",
            "pick_lowest",
        ],
        "stage": [
            "LabelResult",
            "label",
            "predict",
            "task_threads",
        ],
    },
)
