"""MLflow entry points `main`, `train` and `train_ddp`: `tgo train` with the MLproject parameters.

Thin by design: argparse (tgo.cli) -> tgo.config.resolve -> tgo.train.run. Under `mlflow run` the
process attaches to the run MLflow opened (MLFLOW_RUN_ID); under torchrun only rank 0 logs.
"""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
