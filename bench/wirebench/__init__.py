"""The pieces of bench/wire.py, one job per module:

    plan.py           iteration plans (full / --quick), goals, shared constants
    samples.py        a representative instance of every message; message equality with arrays
    codec.py          1. codec cost per message (encode, decode, both)
    children.py       the child processes (echo peers, the importer) and their launcher
    roundtrip.py      2. ipc:// round trips between two processes (small, 1 MiB)
    region_import.py  3. the 100 MB region import through the handle plane (both sides)
    report.py         goals, the markdown tables and the run's metadata

bench/wire.py is the entry point (and the child processes' entry point: `--child ROLE ...`).
"""
