"""MLflow entry point `study`: `tgo study` with the MLproject parameters (thin: tgo.cli -> tgo.study.study)."""

import sys

from tgo.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
