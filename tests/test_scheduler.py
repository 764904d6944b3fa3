"""Scheduler unit tests: fairness, the lift rule, deadlines, overload, batch composition."""
import random

import pytest

from fmplexd.scheduler import DEFAULT_IDLE_CREDIT, Batch, Overloaded, Request, Scheduler


def fill(s: Scheduler, key, n, cost=32, deadline=1e9, now=0.0):
    reqs = [Request(key, cost, deadline, payload=(key, i), arrival=now) for i in range(n)]
    for r in reqs:
        s.submit(r)
    return reqs


def served(batch: Batch, key) -> int:
    return sum(r.cost for r in batch.requests if r.task == key)


@pytest.mark.parametrize("credit", [0, 4096])      # idle credit never applies under saturation
def test_weighted_shares_under_saturation_follow_weights_within_5_percent(credit):
    rng = random.Random(7)
    s = Scheduler(token_budget=512, max_requests=64, idle_credit=credit)
    weights = {"a": 1.0, "b": 2.0, "c": 4.0}
    for k, w in weights.items():
        s.add_task(k, w, queue_limit=10_000)
    tokens = dict.fromkeys(weights, 0)
    for _ in range(3000):
        for k in weights:                       # keep every queue saturated
            while s.task_stats(k)["queued"] < 20:
                s.submit(Request(k, rng.randint(8, 128), 1e9))
        b = s.form_batch(0.0)
        for k in weights:
            tokens[k] += served(b, k)
    total, wsum = sum(tokens.values()), sum(weights.values())
    for k, w in weights.items():
        share, want = tokens[k] / total, w / wsum
        assert abs(share - want) / want < 0.05, (k, share, want)


def test_sfq_bound_holds_after_every_batch():
    """|S_i/w_i - S_j/w_j| <= C_i/w_i + C_j/w_j for continuously backlogged tasks."""
    rng = random.Random(3)
    s = Scheduler(token_budget=300, max_requests=32)
    weights = {"x": 1.0, "y": 3.0, "z": 0.5}
    cmax = {"x": 50, "y": 120, "z": 200}
    for k, w in weights.items():
        s.add_task(k, w, queue_limit=1000)
    got = dict.fromkeys(weights, 0)
    for _ in range(500):
        for k in weights:
            while s.task_stats(k)["queued"] < 10:
                s.submit(Request(k, rng.randint(1, cmax[k]), 1e9))
        for r in s.form_batch(0.0).requests:
            got[r.task] += r.cost
        for i in weights:
            for j in weights:
                gap = abs(got[i] / weights[i] - got[j] / weights[j])
                assert gap <= cmax[i] / weights[i] + cmax[j] / weights[j] + 1e-9


def test_idle_task_banks_no_credit_under_the_strict_lift_rule():
    s = Scheduler(token_budget=64, max_requests=8, idle_credit=0)
    s.add_task("busy", 1.0, 10_000)
    s.add_task("late", 1.0, 10_000)
    fill(s, "busy", 400, cost=32)
    for _ in range(100):                  # busy runs alone for a while; late is idle
        s.form_batch(0.0)
    fill(s, "late", 100, cost=32)
    assert s.task_stats("late")["vtime"] >= s.task_stats("busy")["vtime"] - 32
    share = {"busy": 0, "late": 0}
    for _ in range(20):
        b = s.form_batch(0.0)
        for k in share:
            share[k] += served(b, k)
    # Equal weights: the newcomer gets about half, not everything until it "catches up".
    assert abs(share["busy"] - share["late"]) <= 64


def test_new_task_starts_at_min_backlogged_virtual_time_under_the_strict_rule():
    s = Scheduler(token_budget=32, max_requests=1, idle_credit=0)
    for k in "ab":
        s.add_task(k, 1.0, 100)
    fill(s, "a", 50, cost=32)
    fill(s, "b", 50, cost=32)
    for _ in range(20):
        s.form_batch(0.0)
    s.add_task("c", 1.0, 100)
    fill(s, "c", 1, cost=32)
    vmin = min(s.task_stats(k)["vtime"] for k in "ab")
    assert s.task_stats("c")["vtime"] == vmin


def _order_after_return(credit: float, weight: float) -> list:
    """busy runs alone for 100 batches while late idles; then late returns backlogged and both
    stay backlogged for 60 single-request batches (32 tokens each). Who was served, in order."""
    s = Scheduler(token_budget=32, max_requests=1, idle_credit=credit)
    s.add_task("busy", 1.0, 10_000)
    s.add_task("late", weight, 10_000)
    fill(s, "busy", 400, cost=32)
    for _ in range(100):
        s.form_batch(0.0)
    fill(s, "late", 100, cost=32)
    return [s.form_batch(0.0).requests[0].task for _ in range(60)]


def _first_run(order: list) -> int:
    """Tokens late got before busy was served again."""
    return 32 * order.index("busy")


@pytest.mark.parametrize("credit,weight", [(128, 1.0), (256, 2.0), (96, 0.5)])
def test_idle_credit_is_banked_up_to_its_bound_and_no_more(credit, weight):
    """A task back from a long idle spell runs ahead of its backlogged neighbour for its credit
    (tokens) more than without credit, not for all it missed; then it shares by weight again."""
    order, base = _order_after_return(credit, weight), _order_after_return(0, weight)
    extra = _first_run(order) - _first_run(base)
    assert credit - 32 <= extra <= credit + 32, (order, base)    # one request of slack
    rest = order[order.index("busy"):][-30:]                     # after the credit is spent
    assert abs(rest.count("late") / rest.count("busy") - weight) <= 0.25 * weight + 0.1, rest


def test_idle_credit_does_not_chain_over_returning_tasks():
    """Several tasks returning one after another each bank at most K below the served frontier,
    not K below the previous returner (credits measured from the heap minimum would stack)."""
    k = 64
    s = Scheduler(token_budget=32, max_requests=1, idle_credit=k)
    s.add_task("busy", 1.0, 10_000)
    fill(s, "busy", 200, cost=32)
    for _ in range(50):
        s.form_batch(0.0)
    frontier = s.task_stats("busy")["vtime"] - 32       # the start tag of its last request served
    for name in "abcdef":
        s.add_task(name, 1.0, 100)
        fill(s, name, 1, cost=32)
        assert s.task_stats(name)["vtime"] >= frontier - k - 1e-9, name


def test_bounded_idle_credit_is_the_default():
    """DESIGN.md (amended): a returning task banks DEFAULT_IDLE_CREDIT tokens, no more."""
    assert Scheduler().idle_credit == DEFAULT_IDLE_CREDIT == 512
    s = Scheduler(token_budget=32, max_requests=1)
    s.add_task("busy", 1.0, 10_000)
    s.add_task("late", 1.0, 10_000)
    fill(s, "busy", 100, cost=32)
    for _ in range(60):                   # busy runs alone; late is idle all that time
        s.form_batch(0.0)
    fill(s, "late", 1, cost=32)
    assert s.task_stats("late")["vtime"] == s.task_stats("busy")["vtime"] - 512


def test_negative_idle_credit_is_refused():
    with pytest.raises(ValueError, match="idle_credit"):
        Scheduler(idle_credit=-1)


def test_expired_requests_are_returned_and_never_batched():
    s = Scheduler(token_budget=1000, max_requests=100)
    s.add_task("t", 1.0, 100)
    early = fill(s, "t", 3, deadline=5.0)
    late = fill(s, "t", 2, deadline=50.0)
    assert s.next_deadline() == 5.0
    b = s.form_batch(now=10.0)
    assert set(map(id, b.expired)) == set(map(id, early))
    assert set(map(id, b.requests)) == set(map(id, late))
    assert s.task_stats("t")["expired"] == 3
    assert s.queued == 0


def test_expire_between_batches_frees_queue_space():
    s = Scheduler()
    s.add_task("t", 1.0, 2)
    fill(s, "t", 2, deadline=1.0)
    with pytest.raises(Overloaded):
        fill(s, "t", 1)
    assert len(s.expire(2.0)) == 2
    fill(s, "t", 2, deadline=10.0)          # room again
    assert [r.payload for r in s.form_batch(3.0).requests] == [("t", 0), ("t", 1)]


def test_full_queue_raises_overloaded_at_once():
    s = Scheduler()
    s.add_task("t", 1.0, queue_limit=4)
    fill(s, "t", 4)
    with pytest.raises(Overloaded) as e:
        s.submit(Request("t", 8, 1e9))
    assert e.value.code.value == "overloaded"
    assert s.task_stats("t")["overloaded"] == 1
    assert s.task_stats("t")["queued"] == 4


def test_unknown_task_is_a_key_error():
    s = Scheduler()
    with pytest.raises(KeyError):
        s.submit(Request("nope", 1, 1e9))


def test_inter_task_batching_mixes_tasks_in_one_batch():
    s = Scheduler(token_budget=12 * 16, max_requests=64)
    for k in "abc":
        s.add_task(k, 1.0, 100)
        fill(s, k, 10, cost=16)
    b = s.form_batch(0.0)
    assert {r.task for r in b.requests} == set("abc")
    assert b.tokens == 12 * 16
    assert sorted(served(b, k) for k in "abc") == [64, 64, 64]


def test_intra_task_batching_takes_consecutive_requests_in_order():
    s = Scheduler(token_budget=256, max_requests=64)
    s.add_task("solo", 1.0, 100)
    fill(s, "solo", 20, cost=16)
    b = s.form_batch(0.0)
    assert [r.payload[1] for r in b.requests] == list(range(16))


def test_budget_respected_and_oversized_request_served_alone():
    s = Scheduler(token_budget=100, max_requests=64)
    s.add_task("t", 1.0, 100)
    big = Request("t", 500, 1e9)
    s.submit(big)
    fill(s, "t", 3, cost=40)
    b1 = s.form_batch(0.0)
    assert b1.requests == [big]            # work-conserving: never stuck behind the budget
    b2 = s.form_batch(0.0)
    assert len(b2.requests) == 2 and b2.tokens == 80


def test_max_requests_caps_a_batch():
    s = Scheduler(token_budget=10_000, max_requests=5)
    s.add_task("t", 1.0, 100)
    fill(s, "t", 12, cost=1)
    assert len(s.form_batch(0.0).requests) == 5


def test_work_conserving_never_empty_while_backlogged():
    rng = random.Random(1)
    s = Scheduler(token_budget=64, max_requests=4)
    for k in range(10):
        s.add_task(k, rng.uniform(0.1, 5), 50)
    for k in range(10):
        fill(s, k, rng.randint(0, 20), cost=rng.randint(1, 200))
    while s.queued:
        assert s.form_batch(0.0).requests
    assert not s.form_batch(0.0).requests


def test_remove_task_returns_its_queued_requests():
    s = Scheduler()
    s.add_task("a", 1.0, 100)
    s.add_task("b", 1.0, 100)
    ra = fill(s, "a", 3)
    fill(s, "b", 2)
    dropped = s.remove_task("a")
    assert set(map(id, dropped)) == set(map(id, ra))
    assert "a" not in s
    assert {r.task for r in s.form_batch(0.0).requests} == {"b"}
    assert s.queued == 0


def test_taken_requests_do_not_pile_up_in_deadline_buckets():
    """With long deadlines, served requests must not stay referenced until their deadline."""
    s = Scheduler(token_budget=64, max_requests=8)
    s.add_task("t", 1.0, 100)
    for _ in range(20_000):
        s.submit(Request("t", 8, deadline=3600.0))
        s.form_batch(0.0)
    filed = sum(len(b) for b in s._buckets.values())
    assert filed <= 2 * s.queued + 4096 + 1
    assert s.next_deadline() is None and s.queued == 0


def test_two_groups_share_one_policy_by_weight_and_price():
    """Tasks of two backbones (groups) in one scheduler: each batch holds one group's requests, and
    under saturation the device time (cost x price) follows the weights 1:3 across groups."""
    s = Scheduler(token_budget=64, max_requests=8)
    s.set_price("slow", 4.0)                      # a token of "slow" takes 4x the device time
    s.add_task("a", 1.0, 10_000, group="fast")
    s.add_task("b", 3.0, 10_000, group="slow")
    device = {"a": 0.0, "b": 0.0}
    price = {"a": 1.0, "b": 4.0}
    for _ in range(2000):
        for k in device:
            while s.task_stats(k)["queued"] < 10:
                s.submit(Request(k, 16, 1e9))
        b = s.form_batch(0.0)
        assert len({r.task for r in b.requests}) == 1 and b.group in ("fast", "slow")
        for r in b.requests:
            device[r.task] += r.cost * price[r.task]
    share = device["b"] / (device["a"] + device["b"])
    assert abs(share - 0.75) < 0.02, share


def test_charge_counts_work_done_outside_batches():
    """A decoder charges generated tokens with `charge`: the charged task falls behind in turn."""
    s = Scheduler(token_budget=32, max_requests=1)
    for k in "ab":
        s.add_task(k, 1.0, 100)
        fill(s, k, 20, cost=32)
    s.charge("a", 320)                            # ten requests' worth served elsewhere
    order = [s.form_batch(0.0).requests[0].task for _ in range(12)]
    assert order[:10] == ["b"] * 10 and set(order[10:]) == {"a", "b"}


def test_requeue_puts_a_taken_request_first_again():
    s = Scheduler(token_budget=32, max_requests=1)
    s.add_task("a", 1.0, 2)
    first, second = fill(s, "a", 2, cost=32)
    taken = s.form_batch(0.0).requests[0]
    assert taken is first
    s.requeue(taken)                               # over the queue limit: requeue ignores it
    assert s.task_stats("a")["queued"] == 2
    assert [s.form_batch(0.0).requests[0] for _ in range(2)] == [first, second]
