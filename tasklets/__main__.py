"""`python -m tasklets SPEC [--run-dir DIR]`: run one task process (what fmplexd's supervisor
execs when it does not fork from the task zygote; `fmplex task run SPEC` is the same)."""
import argparse
import sys

from tasklets.process import main

ap = argparse.ArgumentParser(prog="python -m tasklets", description=__doc__.splitlines()[0])
ap.add_argument("spec", help="the task's spec (TOML)")
ap.add_argument("--run-dir", default=None, help="the daemon's run directory")
ap.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
args = ap.parse_args()
sys.exit(main(args.spec, args.run_dir))
