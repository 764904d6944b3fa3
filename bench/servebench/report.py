"""The markdown tables (per run, memory and capacity, daemon profile, goals) and the goals'
verdicts, all computed from serve.json's results. Each *_table returns (header, rows) for
bench/common.py's print_table; markdown_table renders one to a string (for the doc)."""
from __future__ import annotations

import io
from contextlib import redirect_stdout

from bench import common
from bench.servebench.plan import (GOAL_CAPACITY_RATIO, GOAL_P99_VS_COLOCATED,
                                   GOAL_P99_VS_PARTITIONED, HEADLINE_ALPHA, SYSTEMS, Plan)


def fmt_ms(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def tables(results: dict) -> tuple[list, list, list, list]:
    """(header, rows) of the per-run table and of the goals table."""
    head = ["alpha", "load", "offered req/s", "system", "throughput req/s", "p50 ms", "p90 ms",
            "p99 ms", "SLO@2x", "SLO@5x", "SLO@10x", "failed"]
    rows = []
    for alpha in results["plan"]["alphas"]:
        for frac in results["plan"]["load_fractions"]:
            for sysname in SYSTEMS:
                r = next(r for r in results["systems"][sysname]["runs"]
                         if r["alpha"] == alpha and r["load_fraction"] == frac)
                slo = r["slo_attainment"]
                if r.get("skipped"):
                    rows.append([f"{alpha:g}", f"{frac:.0%}", f"{r['offered_rps']:.1f}", sysname,
                                 "overloaded", "-", "-", "-", "0%", "0%", "0%", "not run"])
                    continue
                rows.append([f"{alpha:g}", f"{frac:.0%}", f"{r['offered_rps']:.1f}", sysname,
                             f"{r['throughput_rps']:.1f}", fmt_ms(r["p50_ms"]), fmt_ms(r["p90_ms"]),
                             fmt_ms(r["p99_ms"]), f"{slo['2']:.0%}", f"{slo['5']:.0%}",
                             f"{slo['10']:.0%}", r["failed"]])
    g = results["goals"]
    ghead = ["goal", "measured", "target", "result"]
    grows = [
        [f"p99 fmplex / co-located (alpha {g['alpha']:g}, load {g['load_fraction']:.0%})",
         g["p99_vs_colocated_shown"], f"<= {GOAL_P99_VS_COLOCATED}", g["p99_vs_colocated_result"]],
        [f"p99 fmplex / partitioned (alpha {g['alpha']:g}, load {g['load_fraction']:.0%})",
         g["p99_vs_partitioned_shown"], f"<= {GOAL_P99_VS_PARTITIONED}",
         g["p99_vs_partitioned_result"]],
        *[[f"p99 fmplex / co-located (alpha {r['alpha']:g}, load {r['load_fraction']:.0%})",
           "-" if r["vs_colocated"] is None else f"{r['vs_colocated']:.3f}",
           f"<= {load_goal(r['load_fraction']):g}",
           "-" if r["vs_colocated"] is None else
           common.verdict(r["vs_colocated"] <= load_goal(r["load_fraction"]))]
          for r in g["p99_ratios_all_points"]
          if r["alpha"] == g["alpha"] and r["load_fraction"] != g["load_fraction"]],
        [f"tasks hosted in {results['plan']['budget_gib']:g} GiB: fmplex / co-located",
         f"{g['capacity_fmplex']} / {g['capacity_colocated']} = {g['capacity_ratio']:.1f}x",
         f">= {GOAL_CAPACITY_RATIO:g}x", g["capacity_result"]],
    ]
    return head, rows, ghead, grows


def load_goal(load_fraction: float) -> float:
    """The p99 ratio against co-location fmplex must meet at a load: 1.0 below 40% (batching has
    little to gain there, isolation must cost nothing), GOAL_P99_VS_COLOCATED from 40% up."""
    return 1.0 if load_fraction < 0.4 else GOAL_P99_VS_COLOCATED


def judge_p99(f, b, goal: float) -> tuple[float | None, str, str]:
    """(ratio, shown, verdict) of fmplex's p99 against a baseline's. A p99 of None means more
    than 1% of that system's requests failed (or its point was not run, being overloaded at a
    lower load): fmplex then passes if its own p99 exists."""
    if f is None:
        return None, "fmplex failed > 1% of requests", common.verdict(False)
    if b is None:
        return None, f"{f:.0f} ms / overloaded (> 1% failed)", common.verdict(True)
    return f / b, f"{f:.0f} / {b:.0f} ms = {f / b:.3f}", common.verdict(f / b <= goal)


def goals(results: dict, plan: Plan) -> dict:
    alpha = HEADLINE_ALPHA if HEADLINE_ALPHA in plan.alphas else plan.alphas[0]

    def p99(name):
        return next(r["p99_ms"] for r in results["systems"][name]["runs"]
                    if r["alpha"] == alpha and r["load_fraction"] == plan.headline_load)

    f, c, p = p99("fmplex"), p99("co-located"), p99("partitioned")
    vs_c, shown_c, ok_c = judge_p99(f, c, GOAL_P99_VS_COLOCATED)
    vs_p, shown_p, ok_p = judge_p99(f, p, GOAL_P99_VS_PARTITIONED)
    cap = results["capacity"]
    ratio = cap["fmplex"]["hosted"] / max(1, cap["co-located"]["hosted"])
    return {"alpha": alpha, "load_fraction": plan.headline_load,
            "p99_ms": {"fmplex": f, "co-located": c, "partitioned": p},
            "p99_vs_colocated": vs_c, "p99_vs_colocated_shown": shown_c,
            "p99_vs_colocated_result": ok_c,
            "p99_vs_partitioned": vs_p, "p99_vs_partitioned_shown": shown_p,
            "p99_vs_partitioned_result": ok_p,
            "capacity_fmplex": cap["fmplex"]["hosted"], "capacity_colocated": cap["co-located"]["hosted"],
            "capacity_ratio": ratio,
            "capacity_result": common.verdict(ratio >= GOAL_CAPACITY_RATIO),
            "p99_ratios_all_points": [
                {"alpha": r["alpha"], "load_fraction": r["load_fraction"],
                 "vs_colocated": _safe_ratio(r["p99_ms"], _p99_at(results, "co-located", r)),
                 "vs_partitioned": _safe_ratio(r["p99_ms"], _p99_at(results, "partitioned", r))}
                for r in results["systems"]["fmplex"]["runs"]]}


def _p99_at(results, name, ref):
    return next(r["p99_ms"] for r in results["systems"][name]["runs"]
                if r["alpha"] == ref["alpha"] and r["load_fraction"] == ref["load_fraction"])


def _safe_ratio(a, b):
    return None if a is None or b is None else round(a / b, 4)


def markdown_table(header, rows) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        common.print_table(header, rows)
    return buf.getvalue()


def capacity_table(results: dict):
    head = ["system", "PSS at N tasks (MiB)", "fixed MiB", "per task MiB", "tasks in budget",
            "how"]
    rows = []
    for s in SYSTEMS:
        c = results["capacity"][s]
        mem = results["systems"][s]["memory"]["total_mib"]
        how = (f"verified: {c['hosted']} running, {c.get('answered', '?')} answered, "
               f"{c.get('verified_total_mib', 0):.0f} MiB" if c["verified"] else "extrapolated")
        rows.append([s, f"{mem:.0f}", f"{c['fixed_mib']:.0f}", f"{c['per_task_mib']:.1f}",
                     c["hosted"], how])
    return head, rows


def profile_table(prof: dict):
    head = ["scenario", "batches", "req/batch", "tokens/batch", "collect %", "form %", "pack %",
            "forward %", "outputs %", "deliver %", "ms/batch"]
    rows = []
    for name, p in prof["scenarios"].items():
        sh = p["share"]
        rows.append([name, p["batches"], f"{p['requests_per_batch']:.1f}",
                     f"{p['tokens_per_batch']:.0f}", *(f"{100 * sh[k]:.1f}" for k in
                                                        ("collect", "form", "pack", "forward",
                                                         "outputs", "deliver")),
                     f"{p['ms_per_batch']:.1f}"])
    return head, rows
