"""Raster I/O: windows, tiles, reads and writes, class schemes, overviews, STAC mosaics.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "class_names": [
            "MAX_BYTES",
            "RESERVED",
            "UNKNOWN",
            "UNLABELED",
            "check_class_name",
            "check_class_names",
        ],
        "classes": [
            "ClassEntry",
            "ClassScheme",
            "MAX_CODE",
            "SCHEME_FILE",
            "TAB20",
            "UNKNOWN_COLOR",
            "default_scheme",
            "folder_scheme",
            "make_scheme",
            "palette",
            "read_scheme",
            "write_scheme",
        ],
        "io": [
            "BLOCK_SIZE",
            "RasterInfo",
            "Tile",
            "band_ranges",
            "check_bands",
            "geotiff_profile",
            "iter_blocks",
            "open_raster",
            "raster_info",
            "read_window",
            "tile_grid",
        ],
        "label_rasters": [
            "check_label_overlap",
            "read_class_nodata",
            "read_label_scheme",
            "read_labels_on_grid",
        ],
        "overviews": [
            "downsample_mean",
            "downsample_mode",
            "halved_shape",
            "overview_factors",
        ],
        "stac": [
            "ASSET_FRAGMENT",
            "DEFAULT_ASSETS",
            "is_stac",
            "raster_fingerprint",
            "split_asset",
            "stac_vrt",
        ],
        "staged": [
            "StagedRaster",
        ],
    },
)
