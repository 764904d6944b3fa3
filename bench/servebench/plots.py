"""The three PNG plots written to --out: latency vs offered load (p50 and p99 per system, one
panel per alpha), SLO attainment vs SLO scale at the headline load, and tasks hosted within the
memory budget. plot(out, results) reads serve.json's results and returns the paths it wrote."""
from __future__ import annotations

import os

import numpy as np

from bench.servebench.plan import SLO_SCALES, SYSTEMS


def plot(out: str, results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"fmplex": "tab:blue", "co-located": "tab:orange", "partitioned": "tab:green"}
    alphas = results["plan"]["alphas"]
    paths = []

    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for sysname in SYSTEMS:
            runs = [r for r in results["systems"][sysname]["runs"] if r["alpha"] == alpha]
            x = [r["offered_rps"] for r in runs]
            for key, style in (("p99_ms", "-o"), ("p50_ms", "--.")):
                y = [r[key] if r[key] is not None else np.nan for r in runs]
                ax.plot(x, y, style, color=colors[sysname], label=f"{sysname} {key[:3]}")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"alpha = {alpha:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Latency vs offered load ({results['plan']['n_tasks']} tasks)")
    fig.tight_layout()
    paths.append(_save(fig, out, "latency_vs_load.png"))

    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    head = results["headline"]["load_fraction"]
    for ax, alpha in zip(axes[0], alphas):
        for sysname in SYSTEMS:
            run = next(r for r in results["systems"][sysname]["runs"]
                       if r["alpha"] == alpha and r["load_fraction"] == head)
            ax.plot(SLO_SCALES, [run["slo_attainment"][str(s)] for s in SLO_SCALES], "-o",
                    color=colors[sysname], label=sysname)
        ax.set_xlabel("SLO scale s (x batch-1 latency on a dedicated instance)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"alpha = {alpha:g}, load {head:.0%} of fmplex saturation")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out, "slo_attainment.png"))

    fig, ax = plt.subplots(figsize=(5, 4))
    cap = results["capacity"]
    hosted = [cap[s]["hosted"] for s in SYSTEMS]
    bars = ax.bar(SYSTEMS, hosted, color=[colors[s] for s in SYSTEMS])
    for b, s in zip(bars, SYSTEMS):
        ax.annotate(f"{cap[s]['hosted']}" + ("" if cap[s]["verified"] else " (extrap.)"),
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel("tasks hosted")
    ax.set_title(f"Tasks within {results['plan']['budget_gib']:g} GiB (PSS)")
    fig.tight_layout()
    paths.append(_save(fig, out, "capacity.png"))
    return paths


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
