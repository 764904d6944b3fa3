"""Benchmarks (run as scripts: `python bench/NAME.py`, or `fmplex bench NAME`). A package too, so
tests import the one workload generator: `from bench.workload import WorkloadSpec, generate`."""
