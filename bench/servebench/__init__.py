"""The pieces of bench/serve.py, one job per module:

    plan.py           the plan (full / --quick), goals, shared constants, the workload's description
    tasks.py          the benchmark's tasks (LoRA + linear head on disk) and the TaskBank
    fmplex_system.py  fmplex under test: the real daemon and its task processes
    placement.py      where a baseline instance runs: Placement, partition(), the CFS-quota cgroup
    baselines.py      the baselines: one bench/baseline.py process per task
    zmq_client.py     the load driver's async client for the baseline processes
    driver.py         the load driver: open-loop runs, bursts, warm-up, probes, settling
    metrics.py        percentiles, SLO attainment, summaries, PSS, leftover processes, line fits
    phases.py         the batch-1 SLO reference and the alpha x load sweep on one system
    capacity.py       tasks hosted within the memory budget (fit, extrapolate, verify)
    plots.py          the three PNG plots
    report.py         the markdown tables and the goals' verdicts
    doc.py            the generated section of docs/benchmarks.md, its analysis, and notes

bench/serve.py is the entry point (arguments and the order of the phases).
"""
