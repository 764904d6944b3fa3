"""`python -m fmplex ...` is the `fmplex` command line."""
import sys

from fmplex.cli import main

sys.exit(main())
