"""MLflow entry point `sweep`: `tgo sweep` with the MLproject parameters (thin: tgo.cli -> tgo.sweep.sweep)."""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
