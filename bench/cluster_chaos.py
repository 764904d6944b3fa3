"""Cluster chaos: tasks spread over a local 3-host Ray cluster under steady load, while a host is
killed (its raylet, fmplexd and everything under them: SIGKILL) and replaced, again and again.

    python -m bench.cluster_chaos [--quick] [--out DIR] [--tasks 9] [--kills 3] [--rate 4]
                                  [--deadline 8] [--settle 4]

Hosts n0 (the head: Ray's GCS and the controller live there, so it is never killed), n1, n2, each
a Ray node with its own fmplexd on a tiny random checkpoint (testkit/raycluster.py). Every task is
a text-embedding task with its own random LoRA; one client thread per task calls it through the
cluster's routing client at a steady rate, each call with an 8 s deadline, and compares each
answer with the task's reference answer taken before any kill. Per task it counts: sent;
answered (correct); errors by type (typed: a call whose host died with it in flight, and its one
retry elsewhere failing too); wrong (must be 0); hung = no reply of any kind by the deadline (must
be 0); lost = sent - answered - errors - wrong - hung (must be 0).

A round: kill n1 or n2 (alternating), measure detection (kill -> the controller no longer counts
the host), re-placement (kill -> every task of that host serves elsewhere, in the controller's
routes) and recovery (kill -> each of those tasks answered a call sent after the kill), let
traffic run --settle s, then add a fresh host under the same name and wait until the controller
counts it ("host back": from the end of its start, fmplexd up and Ray node added).
Table printed last; JSON under --out.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from bench import common
from ipc.messages import ClusterDeploy
from testkit.cluster_load import TaskLoad, references
from testkit.launch import short_tmpdir, write_spec
from testkit.raycluster import LocalCluster      # sets Ray's environment (before Ray loads)
from testkit.tiny import write_random_lora, write_tiny

HOSTS = ["n0", "n1", "n2"]


def deploy_tasks(lc: LocalCluster, n: int, work: str) -> list[str]:
    names = []
    router = lc.operator()
    for i in range(n):
        name = f"chaos{i:02d}"
        lora = write_random_lora(os.path.join(work, f"{name}-lora"), 4 + i % 4, [0, 1], 32,
                                 seed=i, std=0.1)
        path = write_spec(work, name, f'pipeline = "text-embedding"\n[extension]\n'
                                      f'adapter = "{lora}"\n[endpoint]\n'
                                      f'authorized_keys = ["{lc.client_keys[0]}"]')
        with open(path) as f:
            router.request(ClusterDeploy(ref=router.ref(), spec=f.read(), spec_dir=work, rate=1.0),
                           30)
        names.append(name)
    router.close()
    return names


def poll(lc: LocalCluster, predicate, timeout_s: float, since: float | None = None):
    """(seconds from `since` (default: now) until predicate(snapshot) held, that snapshot), or
    (None, the last one) after timeout_s. Polls the controller every 50 ms."""
    start = time.monotonic() if since is None else since
    while True:
        snap = lc.snapshot()
        if predicate(snap):
            return round(time.monotonic() - start, 2), snap
        if time.monotonic() - start > timeout_s:
            return None, snap
        time.sleep(0.05)


def one_round(lc: LocalCluster, host: str, loads: dict[str, TaskLoad], settle_s: float) -> dict:
    before = lc.snapshot()
    victims = sorted(t for t, hs in before.placement.items() if host in hs)
    killed = lc.kill_host(host)
    detect, _ = poll(lc, lambda s: host not in s.hosts, 60, since=killed)
    replaced, snap = poll(lc, lambda s: all(s.placement.get(v) and host not in s.placement[v]
                                            for v in victims), 60, since=killed)
    recovered = {}
    deadline = time.monotonic() + 60
    while len(recovered) < len(victims) and time.monotonic() < deadline:
        for v in victims:
            ok = [s + lat for s, lat in list(loads[v].latencies) if s >= killed]   # answered at
            if v not in recovered and ok:
                recovered[v] = min(ok) - killed
        time.sleep(0.05)
    time.sleep(settle_s)          # traffic on the survivors only, before the host comes back
    lc.add_host(host)
    back, _ = poll(lc, lambda s: host in s.hosts, 120)
    answering = round(max(recovered.values()), 2) if len(recovered) == len(victims) else None
    return {"host": host, "victims": victims, "detect_s": detect, "replaced_s": replaced,
            "answering_s": answering if victims else 0.0,
            "moved_to": {v: snap.placement.get(v, ()) for v in victims}, "rejoin_s": back}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", type=int, default=9)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s per task")
    ap.add_argument("--deadline", type=float, default=8.0, help="seconds per call")
    ap.add_argument("--settle", type=float, default=4.0, help="seconds between kill and rejoin")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.kills, args.settle = min(args.tasks, 4), min(args.kills, 1), 2.0
    out = common.out_dir(args.out, "cluster_chaos")
    work = short_tmpdir("fmx-cchaos-")
    tiny = write_tiny(os.path.join(work, "tiny"))
    started = time.monotonic()
    with LocalCluster(HOSTS, {"default": tiny}) as lc:
        lc.start_controller()
        poll(lc, lambda s: s.ready, 60)
        names = deploy_tasks(lc, args.tasks, work)
        poll(lc, lambda s: all(s.placement.get(n) for n in names), 120)
        make = lambda: lc.client(timeout_s=args.deadline)          # noqa: E731
        refs = references(make, names)
        loads = {n: TaskLoad(make, n, refs[n], args.rate, args.deadline, seed=i)
                 for i, n in enumerate(names)}
        for load in loads.values():
            load.start()
        rounds = []
        try:
            for k in range(args.kills):
                rounds.append(one_round(lc, HOSTS[1 + k % 2], loads, args.settle))
        finally:
            for load in loads.values():
                load.stop.set()
            for load in loads.values():
                load.join(60)
        left = lc.close()
    shutil.rmtree(work, ignore_errors=True)
    report(args, out, loads, rounds, left, time.monotonic() - started)


def report(args, out, loads: dict[str, TaskLoad], rounds: list[dict], left: list[str],
           wall_s: float) -> None:
    per_task, rows = {}, []
    for name, t in loads.items():
        lost = t.sent - t.answered - sum(t.errors.values()) - t.wrong - t.hung
        per_task[name] = {"sent": t.sent, "answered": t.answered, "errors": dict(t.errors),
                          "lost": lost, "hung": t.hung, "wrong": t.wrong}
        rows.append([name, t.sent, t.answered, ", ".join(f"{k} {v}" for k, v in
                                                          sorted(t.errors.items())) or "-",
                     lost, t.hung, t.wrong])
    totals = {k: sum(p[k] for p in per_task.values()) for k in ("sent", "answered", "lost",
                                                               "hung", "wrong")}
    errors = sum(sum(p["errors"].values()) for p in per_task.values())
    done = [r for r in rounds if r["replaced_s"] is not None]
    ok = totals["lost"] == totals["hung"] == totals["wrong"] == 0 and len(done) == len(rounds) \
        and not left

    def stat(key, f):
        vals = [r[key] for r in rounds if r[key] is not None]
        return round(float(f(vals)), 2) if vals else None
    summary = {"kills": len(rounds), **totals, "errors": errors,
               "detect_s_median": stat("detect_s", np.median),
               "replaced_s_median": stat("replaced_s", np.median),
               "replaced_s_max": stat("replaced_s", max),
               "answering_s_max": stat("answering_s", max), "processes_left": len(left),
               "wall_s": round(wall_s, 1)}
    common.write_json(out, "cluster_chaos.json", {"args": vars(args), "summary": summary,
                                                   "tasks": per_task, "rounds": rounds,
                                                   "processes_left": left})
    common.print_table(["task", "sent", "answered", "errors by type", "lost", "hung", "wrong"],
                       rows, title="per task")
    common.print_table(["kill", "host", "tasks moved", "detected s", "re-placed s",
                        "answering again s", "host back s"],
                       [[i + 1, r["host"], len(r["victims"]), r["detect_s"], r["replaced_s"],
                         r["answering_s"], r["rejoin_s"]] for i, r in enumerate(rounds)],
                       title="kills")
    common.print_table(["metric", "value"], [[k, v] for k, v in summary.items()]
                       + [["lost = hung = wrong = 0, every kill re-placed, nothing left",
                           common.verdict(ok)]], title="summary")


if __name__ == "__main__":
    main()
