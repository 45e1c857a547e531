"""tgo: the Transformer Geometry Observatory.

Measures the spectral geometry of a Vision Transformer's representations (effective rank, stable
rank, participation ratio, spectral entropy, flatness, anisotropy, ...) at every site and token
view, every epoch, and tracks it in MLflow. See docs/METRICS.md for the definitions.
"""

import os as _os

__version__ = "0.1.0"

# tgo draws its own progress bars; MLflow's per-download bars would interleave with them.
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
