"""The cluster layer on a real local Ray cluster of three hosts (n0 the head, n1, n2): each host a
Ray node with its own real fmplexd (tiny checkpoints, plus the real all-MiniLM-L6-v2 for the
autoscaling test), the controller and the agents Ray actors, clients resolving through the
controller's service and calling task endpoints over tcp:// + CURVE on loopback. One cluster for
the module (about 20 s to start); the tests run in file order and each leaves three hosts up.
Waits are on the controller's snapshots, the clients' counters and the daemons' replies, never
fixed sleeps; every process is checked gone at the end.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from cluster.autoscale import ScalePolicy
from fmplex.cli import main as fmplex_cli
from ipc.errors import DaemonUnavailable, Unauthorized, UnknownTask
from ipc.messages import ClusterDeploy, ClusterStatus, ListTasks
from testkit.cluster_load import TEXTS, TaskLoad, references
from testkit.launch import short_tmpdir, write_spec
from testkit.raycluster import LocalCluster, keypair, leftovers   # sets Ray's environment
from testkit.tiny import write_random_lora, write_tiny

HOSTS = ["n0", "n1", "n2"]
SCALING = ScalePolicy(up_p99=1.0, up_utilization=0.6, down_p99=0.5, down_utilization=0.2,
                      up_after=12, down_after=6, cooldown_s=3.0)    # ticks of 0.25 s
DAEMON = "batch_target_ms = 0\ntoken_budget = 512"   # batches fixed, not sized at start by a
                                                      # measurement a loaded machine skews
HEAVY_COST_MS = 30.0                # device time of a ~110-token MiniLM request, one thread


@pytest.fixture(scope="module")
def lc(tiny_bert, minilm_path):
    small = write_tiny(short_tmpdir("fmx-small-"), "bert", seed=3)
    every = {"default": tiny_bert, "heavy": minilm_path}
    hosts = LocalCluster(HOSTS, every, daemon_config=DAEMON, host_backbones={
        "n0": {**every, "small": small}, "n2": {**every, "small": small}})
    try:
        hosts.start()
        hosts.start_controller(scaling=SCALING, cost_ms=(("heavy", HEAVY_COST_MS),))
        hosts.wait(lambda s: s.ready, 60, "the controller heard every host")
        hosts.specs = short_tmpdir("fmx-specs-")
        yield hosts
    finally:
        left = hosts.close()
        shutil.rmtree(small, ignore_errors=True)
        shutil.rmtree(getattr(hosts, "specs", ""), ignore_errors=True)
        assert left == [] and leftovers() == [], left


def deploy(lc, name: str, backbone: str = "default", seed: int = 0, rate: float = 2.0,
           **kw) -> str:
    """Deploy a text-embedding task with its own random LoRA (so its outputs are its own)."""
    hidden = 384 if backbone == "heavy" else 32
    lora = write_random_lora(os.path.join(lc.specs, f"{name}-lora"), 4, [0, 1], hidden, seed=seed,
                             std=0.1)
    keys = ", ".join(f'"{k}"' for k in (lc.client_keys[0], lc.operator_keys[0]))
    path = write_spec(lc.specs, name, f'pipeline = "text-embedding"\nbackbone = "{backbone}"\n'
                                      f'[extension]\nadapter = "{os.path.basename(lora)}"\n'
                                      f'[endpoint]\nauthorized_keys = [{keys}]')
    with open(path) as f:
        msg = ClusterDeploy(ref=1, spec=f.read(), spec_dir=lc.specs, rate=rate, **kw)
    assert lc.operator().request(msg, 10).message == f"task {name} accepted"
    return name


def serving(names):
    return lambda s: all(s.placement.get(n) for n in names)


def task_pids(lc) -> dict[tuple[str, str], int]:
    """(host, task) -> pid of every task process, as each host's fmplexd reports it."""
    out = {}
    for host, d in lc.daemons.items():
        with d.client() as c:
            out.update({(host, t.name): t.pid for t in c.control(ListTasks(ref=1)).tasks})
    return out


SPREAD = [f"spread{i}" for i in range(6)]
SMALL = ["small0", "small1"]


def test_tasks_spread_by_the_policy_and_answer_through_the_router(lc):
    for i, name in enumerate(SPREAD):
        deploy(lc, name, seed=i)
    for i, name in enumerate(SMALL):
        deploy(lc, name, backbone="small", seed=10 + i, rate=0.0)
    snap = lc.wait(serving(SPREAD + SMALL), 120, "every task serves")
    where = {n: snap.placement[n] for n in SPREAD + SMALL}
    assert all(len(h) == 1 for h in where.values())
    per_host = [sum(where[n] == (h,) for n in SPREAD) for h in HOSTS]
    assert per_host == [2, 2, 2], where                       # equal load hints: spread evenly
    assert {where[n][0] for n in SMALL} <= {"n0", "n2"}       # only where "small" is held
    outputs = {}
    with lc.client() as c:
        for n in SPREAD + SMALL:
            outputs[n] = c.infer(n, TEXTS).embeddings
            assert c.router.replicas(n) == list(where[n])
            with lc.daemons[where[n][0]].client() as direct:  # its host's fmplexd, over ipc://
                assert np.allclose(outputs[n], direct.infer(n, TEXTS).embeddings, atol=1e-5)
    assert not np.allclose(outputs[SPREAD[0]], outputs[SPREAD[1]], atol=1e-3)


def test_only_known_keys_resolve_and_only_operators_command(lc):
    with lc.client(timeout_s=1.5, keys=keypair()) as stranger:      # ZAP refuses its handshake
        with pytest.raises(DaemonUnavailable):
            stranger.infer(SPREAD[0], ["hi"])
    with lc.client(timeout_s=5) as c:
        with pytest.raises(UnknownTask):
            c.infer("no-such-task", ["hi"])
        with pytest.raises(Unauthorized):
            c.router.request(ClusterStatus(ref=c.router.ref()), 5)
    status = lc.operator().request(ClusterStatus(ref=1), 5)
    assert sorted(h.name for h in status.hosts) == HOSTS
    assert {t.name: t.hosts for t in status.tasks}[SPREAD[0]] == \
        list(lc.snapshot().placement[SPREAD[0]])


def test_the_cluster_cli_deploys_lists_serves_and_removes(lc, monkeypatch, capsys):
    for k, v in lc.cli_env("operator").items():
        monkeypatch.setenv(k, v)
    lora = write_random_lora(os.path.join(lc.specs, "cli-lora"), 4, [0, 1], 32, seed=5, std=0.1)
    keys = f'"{lc.client_keys[0]}", "{lc.operator_keys[0]}"'
    spec = write_spec(lc.specs, "cli0", f'pipeline = "text-embedding"\n[extension]\n'
                                        f'adapter = "{os.path.basename(lora)}"\n'
                                        f'[endpoint]\nauthorized_keys = [{keys}]')
    assert fmplex_cli(["cluster", "deploy", spec, "--rate", "1", "--wait", "60"]) == 0
    out = capsys.readouterr().out
    assert "task cli0 accepted" in out and "cli0 serves on n" in out
    assert fmplex_cli(["cluster", "status"]) == 0
    out = capsys.readouterr().out
    assert "cli0" in out and all(h in out for h in HOSTS)
    assert fmplex_cli(["cluster", "infer", "cli0", "hello world", "--json"]) == 0
    assert '"embeddings"' in capsys.readouterr().out
    host = lc.snapshot().placement["cli0"][0]
    assert fmplex_cli(["cluster", "remove", "cli0"]) == 0
    assert "removing cli0" in capsys.readouterr().out
    deadline = time.monotonic() + 30                           # drained, then removed there
    while (host, "cli0") in task_pids(lc):
        assert time.monotonic() < deadline, "cli0 still runs on its host"
        time.sleep(0.2)
    assert "cli0" not in lc.snapshot().placement


def test_a_restarted_controller_rebuilds_its_view_and_changes_nothing(lc):
    before = lc.wait(lambda s: serving(SPREAD + SMALL)(s) and s.ticks > 4, 60, "settled")
    pids = task_pids(lc)
    refs = references(lc.client, SPREAD[:3])
    loads = [TaskLoad(lambda: lc.client(timeout_s=8), n, refs[n], rate=10, seed=i)
             for i, n in enumerate(SPREAD[:3])]
    for load in loads:
        load.start()
    try:
        killed = time.monotonic()
        lc.restart_controller()                                # Ray restarts it: __init__ anew
        lc.wait(lambda s: s.pid != before.pid and s.ready, 60, "a new controller is ready")
        ready_s = time.monotonic() - killed
        after = lc.wait(lambda s: s.pid != before.pid and s.ready and s.ticks >= 8, 60,
                        "a new controller process settled")
    finally:
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(30)
    assert ready_s < 20
    assert (after.deploys, after.removes) == (0, 0)
    assert after.version == before.version
    assert after.placement == before.placement
    assert task_pids(lc) == pids
    for load in loads:                                         # clients did not notice
        assert load.sent == load.counted == load.answered > 0, (load.task, load.errors)


def test_a_killed_host_is_replaced_and_every_request_gets_one_reply(lc):
    snap = lc.wait(serving(SPREAD + SMALL), 30, "every task serves")
    victims = [n for n in SPREAD + SMALL if "n2" in snap.placement[n]]
    survivors = [n for n in SPREAD + SMALL if n not in victims]
    assert victims and survivors
    refs = references(lc.client, SPREAD + SMALL)
    loads = {n: TaskLoad(lambda: lc.client(timeout_s=8), n, refs[n], rate=8, seed=i)
             for i, n in enumerate(SPREAD + SMALL)}
    for load in loads.values():
        load.start()
    try:
        _until(lambda: all(x.answered >= 3 for x in loads.values()), 30, "traffic flows")
        killed = lc.kill_host("n2")
        moved = lc.wait(lambda s: all(s.placement.get(v) and "n2" not in s.placement[v]
                                      for v in victims), 30, "the lost host's tasks serve again")
        replaced_s = time.monotonic() - killed
        back = time.monotonic()
        _until(lambda: all(loads[v].answered_since(back) >= 3 for v in victims), 30,
               "the moved tasks answer")
    finally:
        for load in loads.values():
            load.stop.set()
        for load in loads.values():
            load.join(30)
    assert replaced_s < 20
    assert {moved.placement[v][0] for v in victims} <= {"n0", "n1"}
    assert {moved.placement[v][0] for v in victims if v in SMALL} <= {"n0"}   # sharing-aware
    for n, load in loads.items():
        assert not load.is_alive()
        assert load.sent == load.counted, n                   # exactly one outcome per request
        assert (load.wrong, load.hung) == (0, 0), n           # nothing hangs, nothing is wrong
        if n in survivors:
            assert not load.errors, (n, load.errors)          # survivors did not notice
        else:
            assert set(load.errors) <= {"task_unavailable", "daemon_unavailable"}, load.errors
    lc.add_host("n2")
    lc.wait(lambda s: "n2" in s.hosts, 60, "n2 is back")


HOT_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)   # ~110 tokens


def served(lc, task: str) -> dict[str, int]:
    """host -> requests its fmplexd completed for the task."""
    out = {}
    for host, d in lc.daemons.items():
        with d.client() as c:
            for t in c.control(ListTasks(ref=1)).tasks:
                if t.name == task:
                    out[host] = t.requests
    return out


def test_a_hot_task_gains_a_replica_and_a_cold_one_loses_it(lc):
    """40 requests/s of ~110 MiniLM tokens offered by 32 clients: more than one fmplexd's forward
    thread serves (about 30/s on a free core), so one replica saturates and the clients queue on
    it; two share the load. The autoscaler sees the utilization (rate x 30 ms) pass 0.6 and adds
    a replica; the clients find it within a second and spread over both (the p99 before and after
    is printed);
    when the load stops, the task is cold and loses the replica."""
    deploy(lc, "hot", backbone="heavy", seed=7, rate=0.0, slo_ms=500, max_replicas=2)
    one = lc.wait(serving(["hot"]), 60, "hot serves").placement["hot"]
    assert len(one) == 1
    loads = [TaskLoad(lambda: lc.client(timeout_s=10), "hot", None, rate=1.25, texts=[HOT_TEXT],
                      deadline_s=10, seed=i) for i in range(32)]
    for x in loads:
        x.start()
    try:
        start = time.monotonic()
        two = lc.wait(lambda s: len(s.placement.get("hot", ())) == 2, 90, "a second replica")
        scaled = time.monotonic()
        counts = served(lc, "hot")
        _until(lambda: sum(x.answered_since(scaled + 2) for x in loads) >= 200, 60,
               "traffic on two replicas")
        spread = {h: n - counts.get(h, 0) for h, n in served(lc, "hot").items()}
    finally:
        for x in loads:
            x.stop.set()
        for x in loads:
            x.join(30)
    assert set(two.placement["hot"]) > set(one)
    assert all(spread[h] > 30 for h in two.placement["hot"]), spread     # both replicas serve
    before = [lat for x in loads for s, lat in x.latencies if start + 1 <= s < scaled]
    after = [lat for x in loads for s, lat in x.latencies if s >= scaled + 2]
    assert before and after
    # The latency effect is reported, not asserted: a timed assertion fails on a loaded machine
    # (speed figures belong to benchmarks); what must hold is the scaling and the spread.
    print(f"hot task p99 on one replica {np.percentile(before, 99) * 1e3:.0f} ms, "
          f"on two {np.percentile(after, 99) * 1e3:.0f} ms")
    assert all(x.sent == x.counted and x.wrong == 0 and x.hung == 0 for x in loads)
    cold = lc.wait(lambda s: len(s.placement.get("hot", ())) == 1 and s.wanted["hot"] == 1, 60,
                   "the cold task back to one replica")
    assert set(cold.placement["hot"]) < set(two.placement["hot"])


def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
