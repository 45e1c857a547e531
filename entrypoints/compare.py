"""MLflow entry point `compare`: `tgo compare` with the MLproject parameters.

Thin by design: argparse (tgo.cli) -> tgo.compare.compare. Under `mlflow run` the comparison is
logged into the run MLflow opened (MLFLOW_RUN_ID), which links both compared runs.
"""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
