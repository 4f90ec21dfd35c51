"""`python -m vitplasticity`: the same command line as the `vitplasticity` script."""

import sys

from vitplasticity.cli import main

sys.exit(main())
