"""tgo: the Transformer Geometry Observatory.

Measures the spectral geometry of a Vision Transformer's representations (effective rank, stable
rank, participation ratio, spectral entropy, flatness, anisotropy, ...) at every site and token
view, every epoch, and tracks it in MLflow. See docs/METRICS.md for the definitions.
"""

import logging as _logging

__version__ = "0.1.0"  # the one place of the version (pyproject.toml reads it)

# tgo's modules log what they do (runs started, epochs, failed trials) to the "tgo" logger; the
# command line shows it ("tgo: ..." on stdout). In Python, show it with logging.basicConfig(level=logging.INFO).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name: str):
    """`tgo.GeometryMonitor`, imported when first used (`import tgo` stays light)."""
    if name == "GeometryMonitor":
        from tgo.monitor import GeometryMonitor

        return GeometryMonitor
    raise AttributeError(f"module 'tgo' has no attribute {name!r}")
