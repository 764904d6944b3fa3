"""Chaos run: 16 tasks under steady load while a random task process is killed (SIGKILL) every 2 s.

    python -m bench.chaos [--quick] [--out DIR] [--tasks 16] [--seconds 60] [--kill-every 2]
                          [--rate 4] [--tiny]

Every task is a supervised text-embedding task with its own random LoRA adapter, so its outputs
are its own: each answer is compared with the reference answer taken before the chaos (a row of
another task, or a stale version, would not match). One client thread per task sends requests at a
steady rate, each with a 5 s deadline and a client timeout of deadline + 3 s. Per task it counts:
sent; answered (correct); errors by type; wrong outputs (must be 0); hung = no reply of any kind
by the client timeout (must be 0); lost = sent - answered - errors - wrong - hung (must be 0).
For each kill it measures detection (kill -> the daemon logs the session's end) and restart
(kill -> the task is READY again, from a Health long-poll). Table printed last; JSON under --out.
"""
from __future__ import annotations

import collections
import datetime
import os
import random
import re
import signal
import threading
import time

from bench import common
import numpy as np

from testkit.tiny import write_random_lora, write_tiny
from ipc.errors import FmplexError, RequestTimeout
from ipc.messages import Deploy, Health, ListTasks
from testkit.launch import DaemonProcess, short_tmpdir

DEADLINE_MS = 5000
TEXTS = ["the quick brown fox", "chaos engineering on a shared backbone", "hello world",
         "every request gets exactly one reply", "a task dies, the others do not notice"]


class TaskLoad(threading.Thread):
    """Steady requests to one task; every outcome counted."""

    def __init__(self, daemon: DaemonProcess, name: str, rate: float, reference, stop, seed):
        super().__init__(daemon=True)
        self.d, self.name, self.period, self.reference, self.stop = daemon, name, 1 / rate, reference, stop
        self.rng = random.Random(seed)
        self.sent = self.answered = self.wrong = self.hung = 0
        self.errors = collections.Counter()

    def run(self) -> None:
        with self.d.client(timeout_s=DEADLINE_MS / 1e3 + 3) as c:
            next_t = time.monotonic()
            while not self.stop.is_set():
                i = self.rng.randrange(len(TEXTS))
                self.sent += 1
                try:
                    got = c.infer(self.name, [TEXTS[i]], timeout_s=DEADLINE_MS / 1e3).embeddings[0]
                    if np.allclose(got, self.reference[i], atol=1e-4):
                        self.answered += 1
                    else:
                        self.wrong += 1
                except RequestTimeout:
                    self.hung += 1
                except FmplexError as e:
                    self.errors[e.code.value] += 1
                next_t = max(next_t + self.period, time.monotonic())
                self.stop.wait(max(0.0, next_t - time.monotonic()))


def deploy_tasks(d: DaemonProcess, n: int, work: str, hidden: int, layers: int) -> list[str]:
    names = []
    with d.client(timeout_s=180) as c:
        for i in range(n):
            name = f"chaos{i:02d}"
            lora = write_random_lora(os.path.join(work, f"{name}-lora"), 4 + i % 4,
                                     list(range(layers)), hidden, seed=i, std=0.1)
            spec = os.path.join(work, f"{name}.toml")
            with open(spec, "w") as f:
                f.write(f'name = "{name}"\npipeline = "text-embedding"\n[extension]\n'
                        f'adapter = "{lora}"\n')
            with open(spec) as f:
                c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=spec))
            names.append(name)
    return names


def killer(d: DaemonProcess, names: list[str], every: float, stop, kills: list, seed: int) -> None:
    """Every `every` seconds, on a fixed schedule, SIGKILL a random task that is up."""
    rng, watchers = random.Random(seed), []
    with d.client(timeout_s=60) as c:
        next_t = time.monotonic() + every
        while not stop.wait(max(0.0, next_t - time.monotonic())):
            next_t += every
            pids = {t.name: t.pid for t in c.control(ListTasks(ref=c.ref())).tasks}
            up = [n for n in names if pids.get(n)]
            if not up:
                continue
            name = rng.choice(up)
            kill = {"task": name, "pid": pids[name], "wall": time.time(), "restart_s": None}
            os.kill(kill["pid"], signal.SIGKILL)
            kills.append(kill)
            watchers.append(threading.Thread(target=_time_restart, args=(d, kill, time.monotonic())))
            watchers[-1].start()
    for w in watchers:
        w.join(60)


def _time_restart(d: DaemonProcess, kill: dict, t0: float) -> None:
    """Kill -> READY again with another pid (a Health long-poll, answered by the event)."""
    with d.client(timeout_s=60) as c:
        h = c.control(Health(ref=c.ref(), name=kill["task"], wait_ms=30_000, not_pid=kill["pid"]),
                      timeout_s=40)
        if h.ready:
            kill["restart_s"] = time.monotonic() - t0


def detection_times(log: str, kills: list) -> list[float]:
    """Seconds from each kill to the daemon's log line ending that pid's session."""
    out = []
    for k in kills:
        m = re.search(rf"^(\S+ \S+) fmplexd.lifecycle INFO task {k['task']} \(pid {k['pid']}\): "
                      rf"session ends", log, re.M)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append(max(0.0, t - k["wall"]))
    return out


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s per task")
    ap.add_argument("--tiny", action="store_true", help="a tiny random backbone instead of MiniLM")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.seconds, args.tiny = min(args.tasks, 6), min(args.seconds, 12), True
    out = common.out_dir(args.out, "chaos")
    work = short_tmpdir("fmx-chaos-")
    backbone, hidden, layers = ("embedded", 384, 6)
    if args.tiny:
        backbone, hidden, layers = write_tiny(os.path.join(work, "tiny")), 32, 2
    os.makedirs(daemon_dir := os.path.join(work, "daemon"))
    d = DaemonProcess(backbone, workdir=daemon_dir).start()
    try:
        names = deploy_tasks(d, args.tasks, work, hidden, layers)
        with d.client() as c:
            refs = {n: c.infer(n, TEXTS).embeddings for n in names}
        stop, kills = threading.Event(), []
        loads = [TaskLoad(d, n, args.rate, refs[n], stop, i) for i, n in enumerate(names)]
        chaos = threading.Thread(target=killer, args=(d, names, args.kill_every, stop, kills, 1))
        for t in (*loads, chaos):
            t.start()
        stop.wait(args.seconds)
        stop.set()
        for t in (*loads, chaos):
            t.join(60)
        with d.client() as c:
            restarts = {t.name: t.restarts for t in c.control(ListTasks(ref=c.ref())).tasks}
        detect = detection_times(d.log_text(), kills)
    finally:
        code = d.stop()
        d.cleanup()
    report(args, out, loads, kills, restarts, detect, code)


def report(args, out, loads, kills, restarts, detect, code) -> None:
    rows, per_task = [], {}
    for t in loads:
        lost = t.sent - t.answered - sum(t.errors.values()) - t.wrong - t.hung
        mine = [k["restart_s"] for k in kills if k["task"] == t.name and k["restart_s"] is not None]
        per_task[t.name] = {"sent": t.sent, "answered": t.answered, "errors": dict(t.errors),
                            "lost": lost, "hung": t.hung, "wrong": t.wrong, "kills": len(mine),
                            "restarts": restarts.get(t.name, 0), "restart_s": mine}
        errs = ", ".join(f"{k} {v}" for k, v in sorted(t.errors.items())) or "-"
        rows.append([t.name, t.sent, t.answered, errs, lost, t.hung, t.wrong, len(mine),
                     " ".join(f"{s:.2f}" for s in mine) or "-"])
    restart = [k["restart_s"] for k in kills if k["restart_s"] is not None]
    totals = {k: sum(p[k] for p in per_task.values()) for k in ("sent", "answered", "lost", "hung",
                                                                  "wrong")}
    ok = totals["lost"] == 0 and totals["hung"] == 0 and totals["wrong"] == 0 and code == 0
    summary = {"kills": len(kills), "daemon_exit": code, **totals,
               "detect_s_median": float(np.median(detect)) if detect else None,
               "detect_s_max": max(detect) if detect else None,
               "restart_s_median": float(np.median(restart)) if restart else None,
               "restart_s_max": max(restart) if restart else None}
    common.write_json(out, "chaos.json", {"args": vars(args), "summary": summary, "tasks": per_task,
                                          "kills": kills, "detect_s": detect})
    common.print_table(["metric", "value"], [[k, v] for k, v in summary.items()]
                       + [["lost = hung = wrong = 0, daemon exit 0", common.verdict(ok)]],
                       title="summary")
    common.print_table(["task", "sent", "answered", "errors by type", "lost", "hung", "wrong",
                        "kills", "restart s (kill -> ready)"], rows, title="per task")


if __name__ == "__main__":
    main()
