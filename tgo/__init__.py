"""tgo: the Transformer Geometry Observatory.

Measures the spectral geometry of a Vision Transformer's representations (effective rank, stable
rank, participation ratio, spectral entropy, flatness, anisotropy, ...) at every site and token
view, every epoch, and tracks it in MLflow. See docs/METRICS.md for the definitions.
"""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# tgo's modules log what they do (runs started, epochs, failed trials) to the "tgo" logger; the
# command line shows it ("tgo: ..." on stdout). In Python, show it with logging.basicConfig(level=logging.INFO).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# tgo draws its own progress bars; MLflow's per-download bars would interleave with them.
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
