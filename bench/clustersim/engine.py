"""Discrete-event simulation of one Deployment on a trace: every request's latency.

Each server is one queue of work served one step at a time (servers of one device under static
partitioning run side by side, each at its share). Its batching groups (a task, or a backbone)
take turns, round robin among those with work (the fair share of fmplexd's scheduler, in
outline; a device multiplexed among models alike). A step of an encoder group is a batch: its
waiting requests in arrival order up to the backbone's batch limit, taking
(fixed + per_token x tokens x lora) / speed seconds (fleet.Backbone.cost), all finishing with it.
A step of a decoder group is one iteration (continuous batching, as fmplexd's generation engine):
waiting requests join the running ones while the KV pool has room (their prompts computed in that
iteration), every running sequence gets one token, the iteration takes
(weights read + per_token x (running + prompt tokens) x lora) / speed (fleet.Backbone.iteration),
and a sequence finishes after GENERATED iterations. Work-conserving; a step is never preempted.
"""
from __future__ import annotations

import collections

import numpy as np

from bench.clustersim.fleet import GENERATED, KV_SEQUENCES, Fleet
from bench.clustersim.policies import Deployment, Server


class _Group:
    """One batching group's queue and (decoders) running sequences."""

    __slots__ = ("decoder", "fixed", "per_token", "limit", "waiting", "running")

    def __init__(self, backbone, fleet: Fleet):
        self.decoder = backbone.kind == "decoder" and fleet.gpu
        cost = backbone.iteration() if self.decoder else backbone.cost(fleet.gpu)
        self.fixed, self.per_token = cost
        self.limit = fleet.batch_limit(backbone)
        self.waiting: collections.deque = collections.deque()
        self.running: list[list[int]] = []        # [request, iterations left]

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, tokens: list[int], lora: float) -> tuple[float, list[int]]:
        """(device seconds at speed 1, requests finished) of this group's next step."""
        if self.decoder:
            prompt = 0
            while self.waiting and len(self.running) < KV_SEQUENCES:
                r = self.waiting.popleft()
                self.running.append([r, GENERATED])
                prompt += tokens[r]
            seconds = self.fixed + self.per_token * (len(self.running) + prompt) * lora
            done = []
            for seq in self.running:
                seq[1] -= 1
                if seq[1] == 0:
                    done.append(seq[0])
            self.running = [s for s in self.running if s[1] > 0]
            return seconds, done
        batch, used = [], 0
        while self.waiting and (not batch or used + tokens[self.waiting[0]] <= self.limit):
            r = self.waiting.popleft()
            batch.append(r)
            used += tokens[r]
        return self.fixed + self.per_token * used * lora, batch


def run_server(server: Server, fleet: Fleet, arrivals: dict[str, tuple]) -> dict[str, tuple]:
    """task -> (arrival times, latencies) of its requests on this server."""
    parts, keys = [], {}
    for j, t in enumerate(server.tasks):
        times, tokens = arrivals[t.name]
        key = t.name if server.group_by == "task" else t.backbone.name
        g = keys.setdefault(key, (len(keys), t.backbone))[0]
        parts.append((times, tokens, np.full(len(times), g), np.full(len(times), j)))
    times, tokens, group, owner = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.argsort(times, kind="stable")
    times, tokens, group, owner = times[order], tokens[order], group[order], owner[order]
    groups = {g: _Group(b, fleet) for g, b in keys.values()}
    tl, kl, gl = times.tolist(), tokens.tolist(), group.tolist()
    finish = np.zeros(len(tl))
    turn: collections.deque = collections.deque()          # busy groups, round robin
    now, nxt, n = 0.0, 0, len(tl)
    while nxt < n or turn:
        if not turn:
            now = max(now, tl[nxt])
        while nxt < n and tl[nxt] <= now:
            g = groups[gl[nxt]]
            if not g.busy():
                turn.append(g)
            g.waiting.append(nxt)
            nxt += 1
        g = turn.popleft()
        seconds, done = g.step(kl, server.lora)
        now += seconds / server.speed
        finish[done] = now
        if g.busy():
            turn.append(g)
    latency = finish - times
    return {t.name: (times[owner == j], latency[owner == j]) for j, t in enumerate(server.tasks)}


def simulate(dep: Deployment, fleet: Fleet, arrivals: dict[str, tuple],
             warmup_s: float) -> dict[str, tuple[float, float, int]]:
    """task -> (p99 latency s of requests after warm-up, its SLO, how many) for placed tasks."""
    out = {}
    for server in dep.servers:
        slo = {t.name: t.slo_s for t in server.tasks}
        for name, (times, latency) in run_server(server, fleet, arrivals).items():
            measured = latency[times >= warmup_s]
            p99 = float(np.percentile(measured, 99)) if len(measured) else 0.0
            out[name] = (p99, slo[name], len(measured))
    return out


def within_slo(results: dict[str, tuple[float, float, int]]) -> int:
    """Tasks whose p99 met their SLO (a task without a measured request counts: none failed)."""
    return sum(1 for p99, slo, _ in results.values() if p99 <= slo)
