"""MLflow entry point `probe`: `tgo probe` with the MLproject parameters (checkpoints trained
anywhere, probed into the run `mlflow run` opened, or into the probe run of the same source)."""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
