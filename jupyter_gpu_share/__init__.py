"""jupyter-gpu-share: rent and share GPUs from inside Jupyter."""

from ._version import __version__

__all__ = ["__version__"]
