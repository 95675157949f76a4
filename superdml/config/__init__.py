"""Typed stage configs, their loading and validation, and the shipped configs and pipelines.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "schema": [
            "AugmentConfig",
            "Backbone",
            "CropsConfig",
            "EmbedConfig",
            "IndexConfig",
            "LabelConfig",
            "MaskMode",
            "Normalization",
            "Precision",
            "ReviewConfig",
            "SegmentBackend",
            "SegmentConfig",
            "SegmentDevice",
            "TTA",
            "TrainConfig",
            "UnknownRule",
            "VoteConfig",
            "VoteRule",
            "Weighting",
            "check",
            "config_hash",
            "config_to_dict",
            "dump_config",
            "from_dict",
            "load_config",
            "parse_override",
        ],
        "checks": [
            "is_count",
        ],
        "shipped": [
            "configs_dir",
            "copy_shipped",
            "loss_config_path",
            "pipeline_names",
            "pipeline_path",
            "resolve_pipeline",
        ],
    },
)
