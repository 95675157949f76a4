"""The crops stage: the crop rule, cutting crops from a segment run, and the crop-folder format.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "cut": [
            "color_band_indexes",
            "crop_tile",
            "crop_tile_with_previews",
            "read_crop_window",
        ],
        "folder": [
            "CROPS_SCHEMA",
            "CROPS_TABLE",
            "ROW_GROUP_SIZE",
            "add_crop",
            "chip_bytes",
            "clear_crops",
            "count_labels",
            "crop_file",
            "png_bytes",
            "read_crops_meta",
            "write_crops",
            "write_crops_table",
        ],
        "rule": [
            "CropRule",
            "SCALING_RULE",
            "check_context",
            "color_bands",
            "context_views",
            "extract_crops",
            "read_crop_rule",
            "to_uint8",
        ],
        "stage": [
            "CANDIDATES_SCHEMA",
            "CropsResult",
            "PENDING",
            "TILE_SIZE",
            "export_crops",
            "majority_labels",
        ],
    },
)
