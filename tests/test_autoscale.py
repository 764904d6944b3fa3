"""The replica autoscaling policy (cluster/autoscale.py) on a virtual clock."""
from __future__ import annotations

from cluster.autoscale import Observation, ScalePolicy, ScaleState, scale

POLICY = ScalePolicy(up_p99=1.0, up_utilization=0.6, down_p99=0.5, down_utilization=0.2,
                     up_after=3, down_after=4, cooldown_s=10.0)


def obs(rate: float, p99_s: float = 0.01, replicas: int = 1, lo: int = 1, hi: int = 3):
    return Observation(rate=rate, p99_s=p99_s, replicas=replicas, cost_s=0.01, slo_s=0.2,
                       min_replicas=lo, max_replicas=hi)


def run(state, observations, start=0.0, step=1.0):
    """Feed observations one per `step` seconds; returns (state, wanted after each)."""
    out = []
    for i, o in enumerate(observations):
        state, wanted = scale(state, o, POLICY, start + i * step)
        out.append(wanted)
    return state, out


def test_a_hot_task_gains_a_replica_after_a_streak_and_not_before():
    _, wanted = run(ScaleState(1), [obs(rate=80)] * 3)              # utilization 0.8 > 0.6
    assert wanted == [1, 1, 2]
    _, wanted = run(ScaleState(1), [obs(80), obs(10), obs(80), obs(80)])   # streak broken
    assert wanted == [1, 1, 1, 1]


def test_latency_above_the_slo_is_hot_too():
    _, wanted = run(ScaleState(1), [obs(rate=5, p99_s=0.5)] * 3)
    assert wanted == [1, 1, 2]


def test_cooldown_spaces_changes_and_the_limit_holds():
    state, wanted = run(ScaleState(1), [obs(rate=200, replicas=r) for r in (1, 1, 1, 2, 2, 2)])
    assert wanted == [1, 1, 2, 2, 2, 2]                             # 10 s cooldown from t=2
    state, wanted = run(state, [obs(rate=200, replicas=2)] * 3, start=12)
    assert wanted == [3, 3, 3]                                      # up again, then max 3
    _, wanted = run(state, [obs(rate=900, replicas=3)] * 20, start=30)
    assert set(wanted) == {3}


def test_a_task_still_starting_its_replicas_gets_no_verdict():
    state, wanted = run(ScaleState(2), [obs(rate=500, replicas=1, hi=3)] * 5)
    assert wanted == [2] * 5 and state.hot == 0


def test_a_cold_task_loses_replicas_down_to_its_minimum():
    state, wanted = run(ScaleState(3), [obs(rate=0, replicas=3)] * 4)
    assert wanted == [3, 3, 3, 2]
    state, wanted = run(state, [obs(rate=0, replicas=2)] * 20, start=20)
    assert wanted[-1] == 1 and min(wanted) == 1
    _, wanted = run(state, [obs(rate=0, replicas=1)] * 20, start=60)
    assert set(wanted) == {1}


def test_a_busy_task_is_not_cold_and_a_quiet_one_with_a_slow_tail_is_not_either():
    _, wanted = run(ScaleState(2), [obs(rate=30, replicas=2)] * 10)   # 0.3 on one replica
    assert set(wanted) == {2}
    _, wanted = run(ScaleState(2), [obs(rate=5, p99_s=0.15, replicas=2)] * 10)  # p99 0.75 SLO
    assert set(wanted) == {2}


def test_changed_limits_are_followed_at_once():
    _, wanted = run(ScaleState(1), [obs(rate=0, lo=2, hi=4)])
    assert wanted == [2]
    _, wanted = run(ScaleState(5), [obs(rate=0, replicas=5, lo=1, hi=3)])
    assert wanted == [3]
