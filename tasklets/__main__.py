"""`python -m tasklets ...` is the `fmplex` CLI (the supervisor starts task processes this way)."""
import sys

from tasklets.cli import main

sys.exit(main())
