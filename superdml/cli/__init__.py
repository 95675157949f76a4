"""The command line: commands generated from the stage registry, pipelines, the demo.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "commands": [
            "cli",
            "cluster_options",
            "demo_command",
            "device_option",
            "infer_command",
            "init_command",
            "main",
            "run_command",
        ],
    },
)
