"""The review page: sort crops in the browser, the map beside them, retrain from the page.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "decisions": ["Sorter", "move_no_replace"],
        "folder": ["ServedFolder", "open_folder"],
        "journal": ["JOURNAL", "Decision", "Journal", "live_batches", "read_journal"],
        "queue": ["PENDING", "SKIPPED", "SORTED", "CropQueue", "read_queue"],
        "retrain": ["Retrain", "snapshot"],
        "security": ["TokenGuard", "confined", "new_token"],
        "server": ["ServeOptions", "open_session", "serve"],
        "similar": ["CropEmbeddings", "nearest"],
        "tiles": ["class_colors", "image_tile", "label_tile", "max_zoom", "outline", "tile_window"],
    },
)
