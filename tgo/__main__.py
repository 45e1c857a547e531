import sys

from tgo.cli import main

sys.exit(main())
