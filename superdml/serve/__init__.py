"""The review page: sort crops in the browser, the map beside them, retrain from the page.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "decisions": [
            "Sorter",
            "move_no_replace",
        ],
        "folder": [
            "ServedFolder",
            "open_folder",
        ],
        "journal": [
            "Decision",
            "JOURNAL",
            "Journal",
            "live_batches",
            "read_journal",
        ],
        "queue": [
            "CropQueue",
            "PENDING",
            "SKIPPED",
            "SORTED",
            "read_queue",
        ],
        "retrain": [
            "Retrain",
            "snapshot",
        ],
        "security": [
            "TokenGuard",
            "confined",
            "new_token",
        ],
        "server": [
            "ServeOptions",
            "open_session",
            "serve",
        ],
        "similar": [
            "nearest",
        ],
        "tiles": [
            "class_colors",
            "image_tile",
            "label_tile",
            "max_zoom",
            "outline",
            "tile_window",
        ],
    },
)
