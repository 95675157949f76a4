"""superdml: batch labeling of superpixel image tiles with deep metric learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("superdml")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
