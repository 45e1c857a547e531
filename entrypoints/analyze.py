"""MLflow entry point `analyze`: `tgo analyze` with the MLproject parameters.

Thin by design: argparse (tgo.cli) -> tgo.analysis.analyze. Under `mlflow run` the analysis is
logged into the run MLflow opened (MLFLOW_RUN_ID), made a child of the training run.
"""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
