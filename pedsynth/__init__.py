"""pedsynth: training data for text-based person retrieval, built with Prefect."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pedsynth")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
