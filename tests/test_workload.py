"""The shared workload generator (bench/workload.py): deterministic, power-law popularity, Poisson
arrivals, lengths within their bounds and texts of exactly the drawn number of tokens."""
import os

import numpy as np
import pytest

from bench.workload import WORDS, WorkloadSpec, generate


def test_same_seed_same_events_other_seed_other_events():
    spec = WorkloadSpec(n_tasks=8, total_rate=50, duration_s=20, seed=3)
    assert generate(spec) == generate(spec)
    other = generate(WorkloadSpec(n_tasks=8, total_rate=50, duration_s=20, seed=4))
    assert [e.t for e in other] != [e.t for e in generate(spec)]


def test_sorted_and_within_duration():
    events = generate(WorkloadSpec(total_rate=40, duration_s=10))
    times = [e.t for e in events]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 10


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.3])
def test_rates_follow_the_power_law(alpha):
    spec = WorkloadSpec(n_tasks=16, alpha=alpha, total_rate=400, duration_s=100, seed=1)
    rates = spec.rates()
    assert rates.sum() == pytest.approx(400)
    assert rates[3] / rates[0] == pytest.approx(4 ** -alpha)
    counts = np.bincount([e.task for e in generate(spec)], minlength=16)
    n = counts.sum()
    assert n == pytest.approx(400 * 100, rel=0.03)             # Poisson: sd ~ 0.5 %
    shares = spec.shares()
    # Each empirical share within 4 binomial standard deviations of its expected share.
    sd = np.sqrt(shares * (1 - shares) / n)
    assert np.all(np.abs(counts / n - shares) < 4 * sd + 1e-4), (counts / n, shares)


def test_poisson_inter_arrivals():
    spec = WorkloadSpec(n_tasks=4, total_rate=100, duration_s=200, seed=2)
    events = generate(spec)
    gaps = np.diff([e.t for e in events])
    assert gaps.mean() == pytest.approx(1 / 100, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)      # exponential: CV = 1
    # Per task too (a split Poisson process is Poisson): the most popular task's gaps.
    t0 = np.diff([e.t for e in events if e.task == 0])
    assert t0.std() / t0.mean() == pytest.approx(1.0, abs=0.1)


def test_lengths_within_bounds_and_lognormal_median():
    spec = WorkloadSpec(total_rate=200, duration_s=50, len_median=20, len_sigma=0.6,
                        min_tokens=4, max_tokens=64)
    lens = np.array([e.tokens for e in generate(spec)])
    assert lens.min() >= 4 and lens.max() <= 64
    assert np.median(lens) == pytest.approx(20, abs=1.5)
    assert (lens == 64).any()                                   # the tail is clipped, not dropped


def test_texts_have_exactly_the_drawn_number_of_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    try:
        from fmplexd.families.embedded import embedded_path
        path = os.path.join(embedded_path("minilm"), "tokenizer.json")
    except RuntimeError:
        pytest.skip("the embedded backbone is not installed")
    tok = tokenizers.Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    assert all(len(tok.encode(w, add_special_tokens=False).ids) == 1 for w in WORDS)
    events = generate(WorkloadSpec(total_rate=50, duration_s=10, max_tokens=128))
    assert all(len(tok.encode(e.text).ids) == e.tokens for e in events)


def test_invalid_specs_are_refused():
    for bad in (dict(n_tasks=0), dict(total_rate=0), dict(min_tokens=2), dict(max_tokens=3)):
        with pytest.raises(ValueError):
            WorkloadSpec(**bad)
