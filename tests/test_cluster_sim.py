"""The cluster simulator's engine and policies (bench/clustersim/) on hand-made traces whose
latencies are known in closed form, so the simulated claim rests on a checked engine."""
from __future__ import annotations

import numpy as np
import pytest

from bench.clustersim.engine import run_server
from bench.clustersim.fleet import BACKBONES, FLEETS, GENERATED, KV_SEQUENCES
from bench.clustersim.policies import Server, fmplex, muxserve, one_instance
from bench.clustersim.trace import SimTask, make_tasks

CPU, GPU = FLEETS["cpu"], FLEETS["gpu"]
MINILM, BERT, LLAMA = BACKBONES["minilm"], BACKBONES["bert-base"], BACKBONES["llama-7b"]


def trace(*requests):
    """{task: (times, tokens)} from (task, time, tokens) triples."""
    out: dict[str, list] = {}
    for task, t, k in requests:
        out.setdefault(task, []).append((t, k))
    return {n: (np.array([t for t, _ in v]), np.array([k for _, k in v])) for n, v in out.items()}


def task(name, backbone=MINILM):
    return SimTask(name, backbone, 1.0, 1.0)


def test_requests_waiting_together_share_one_batch():
    fixed, per_token = MINILM.cost(False)
    server = Server(0, 1.0, "backbone", 1.0, [task("a"), task("b")])
    out = run_server(server, CPU, trace(("a", 0.0, 20), ("b", 0.0, 30)))
    assert out["a"][1][0] == pytest.approx(fixed + 50 * per_token)        # one batch of both
    assert out["b"][1][0] == pytest.approx(fixed + 50 * per_token)


def test_per_task_batching_serves_tasks_in_turn_and_speed_and_lora_scale_time():
    fixed, per_token = MINILM.cost(False)
    server = Server(0, 2.0, "task", 1.5, [task("a"), task("b")])
    out = run_server(server, CPU, trace(("a", 0.0, 20), ("b", 0.0, 20)))
    one = (fixed + 20 * per_token * 1.5) / 2.0
    assert sorted([out["a"][1][0], out["b"][1][0]]) == pytest.approx([one, 2 * one])


def test_a_request_arriving_during_a_batch_waits_for_it():
    fixed, per_token = BERT.cost(False)
    server = Server(0, 1.0, "backbone", 1.0, [task("a", BERT)])
    first = fixed + 20 * per_token
    out = run_server(server, CPU, trace(("a", 0.0, 20), ("a", first / 2, 20)))
    assert out["a"][1] == pytest.approx([first, first / 2 + first])


def test_a_decoder_generates_in_iterations_and_admits_new_sequences_between_them():
    step, per_token = LLAMA.iteration()
    server = Server(0, 1.0, "backbone", 1.0, [task("a", LLAMA)])
    alone = run_server(server, GPU, trace(("a", 0.0, 128)))["a"][1][0]
    assert alone == pytest.approx(step + per_token * 129 + (GENERATED - 1) * (step + per_token))
    first = step + per_token * 129                            # its prompt and first token
    out = run_server(server, GPU, trace(("a", 0.0, 128), ("a", first / 2, 128)))["a"][1]
    joined = step + per_token * (2 + 128)                     # the second joins at iteration 2
    end1 = first + joined + (GENERATED - 2) * (step + 2 * per_token)
    assert out == pytest.approx([end1, end1 + step + per_token - first / 2])
    assert KV_SEQUENCES * LLAMA.tokens == GPU.batch_limit(LLAMA)


def test_the_policies_respect_memory_and_share_backbones():
    tasks = make_tasks(GPU, 512, 0.1, seed=3)
    for policy in (one_instance, muxserve, fmplex):
        dep = policy(GPU, tasks)
        placed = sum(len(s.tasks) for s in dep.servers)
        assert placed + dep.unplaced == len(tasks)
        for s in dep.servers:
            if dep.policy == "fmplex":
                used = sum(b.copy_bytes(True) for b in {t.backbone for t in s.tasks}) + \
                    sum(GPU.task_bytes(t.backbone) for t in s.tasks) + GPU.daemon_bytes()
            else:
                used = sum(t.backbone.instance_bytes(True) for t in s.tasks)
            assert used <= GPU.device_bytes or dep.policy == "one instance per task" and \
                len(s.tasks) == 1
    by_device: dict[int, int] = {}
    for s in one_instance(GPU, tasks).servers:                 # instances of a device, summed
        by_device[s.device] = by_device.get(s.device, 0) + s.tasks[0].backbone.instance_bytes(True)
    assert max(by_device.values()) <= GPU.device_bytes
