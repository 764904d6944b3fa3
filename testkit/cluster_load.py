"""Steady load on cluster tasks through the routing client, every outcome counted once: the
workload of the cluster tests and of `python -m bench.cluster_chaos`.

    load = TaskLoad(lambda: lc.client(timeout_s=8), "t0", reference=refs["t0"], rate=10)
    load.start(); ...; load.stop.set(); load.join()
    load.sent == load.answered + load.wrong + load.hung + sum(load.errors.values())

Each call sends one of TEXTS and compares the embedding with the task's reference answer (taken
before any fault: a row of another task or a stale version would not match). Outcomes: answered
(correct), wrong, hung (RequestTimeout: no reply within the deadline), errors by code (typed).
"""
from __future__ import annotations

import collections
import random
import threading
import time

import numpy as np

from ipc.errors import FmplexError, RequestTimeout

TEXTS = ["the quick brown fox", "a host dies, its tasks move", "hello world",
         "every request gets exactly one reply", "requests never travel through ray"]


class TaskLoad(threading.Thread):
    def __init__(self, client, task: str, reference: np.ndarray | None, rate: float,
                 deadline_s: float = 8.0, seed: int = 0, texts: list[str] = TEXTS):
        """client(): a new cluster Client (one per thread); reference: the embedding of each
        text (None: only replies are counted, not compared); rate: calls per second, as Poisson
        arrivals (open loop while replies come faster than the next arrival, else back to back;
        many threads do not fire in step)."""
        super().__init__(daemon=True)
        self.client, self.task, self.reference, self.period = client, task, reference, 1 / rate
        self.deadline_s, self.texts = deadline_s, texts
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.sent = self.answered = self.wrong = self.hung = 0
        self.errors: collections.Counter = collections.Counter()
        self.latencies: list[tuple[float, float]] = []     # (monotonic sent, seconds) answered
        self.failures: list[tuple[float, str]] = []        # (monotonic sent, code)

    def run(self) -> None:
        with self.client() as c:
            next_t = time.monotonic() + self.rng.expovariate(1 / self.period)
            self.stop.wait(max(0.0, next_t - time.monotonic()))
            while not self.stop.is_set():
                i = self.rng.randrange(len(self.texts))
                self.sent += 1
                start = time.monotonic()
                try:
                    got = c.infer(self.task, [self.texts[i]], timeout_s=self.deadline_s)
                    if self.reference is None or np.allclose(got.embeddings[0], self.reference[i],
                                                              atol=1e-4):
                        self.answered += 1
                        self.latencies.append((start, time.monotonic() - start))
                    else:
                        self.wrong += 1
                except RequestTimeout:
                    self.hung += 1
                    self.failures.append((start, "hung"))
                except FmplexError as e:
                    self.errors[e.code.value] += 1
                    self.failures.append((start, e.code.value))
                next_t = max(next_t + self.rng.expovariate(1 / self.period), time.monotonic())
                self.stop.wait(max(0.0, next_t - time.monotonic()))

    @property
    def counted(self) -> int:
        return self.answered + self.wrong + self.hung + sum(self.errors.values())

    def answered_since(self, t: float) -> int:
        return sum(1 for s, _ in list(self.latencies) if s >= t)

    def p99(self, since: float = 0.0, until: float = float("inf")) -> float:
        lat = [x for s, x in list(self.latencies) if since <= s < until]
        return float(np.percentile(lat, 99)) if lat else float("nan")


def references(client, tasks: list[str], texts: list[str] = TEXTS) -> dict[str, np.ndarray]:
    """Each task's embeddings of the texts, before any fault."""
    with client() as c:
        return {t: c.infer(t, texts).embeddings for t in tasks}
