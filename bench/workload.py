"""The one workload generator, shared by the serving benchmark (bench/serve.py) and its tests.

A workload is N tasks on one backbone, each with its own extension, receiving requests as a Poisson
process whose rates follow a power law (MuxServe's set-up):

    rate_i = total_rate * (i + 1) ** -alpha / sum_j (j + 1) ** -alpha        i = 0 .. N-1

Arrivals: one Poisson process of rate `total_rate` (exponential inter-arrival times) over
[0, duration_s), each arrival assigned to task i with probability rate_i / total_rate (splitting a
Poisson process this way gives N independent Poisson processes of rates rate_i).

Input lengths, in tokens of the backbone's tokenizer *including* [CLS] and [SEP]:
    round(lognormal(median = len_median, sigma = len_sigma)), clipped to [min_tokens, max_tokens].
Each text is (tokens - 2) words drawn from WORDS, a bundled list of common English words each of
which is exactly one WordPiece token of the bert-base-uncased vocabulary (all-MiniLM-L6-v2's), so a
text has exactly the drawn number of tokens (tests/test_workload.py checks this with the tokenizer).

Repeated inputs (bench/cache.py): `zipf_picks` draws which of N distinct inputs each request
carries, input k with probability (k + 1) ** -s / sum_j (j + 1) ** -s.

Deterministic: the same WorkloadSpec (seed included) always gives the same events (numpy PCG64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORDS = tuple("""
the of and to in is was for on that with as by it at from his an were are which this be has had one
not but their they first new after who also two been its time would there more other when can all
into during school world year city film house music water people state family game team war book
road life church river village party season album series government country name great day night
home work place part area land public power story food money light word north south east west small
large long young early late town little good best old high point line side group hand head body face
eyes voice mind heart love friend child woman man girl boy king queen army club station center field
court table paper letter phone window door garden street market office hotel bank car train ship
plane horse dog cat bird fish tree flower rain snow wind sun moon star sky sea lake island mountain
forest stone fire gold silver red blue green black white yellow brown dark bright happy sad quiet
loud fast slow easy hard simple strong weak rich poor open close begin end start stop play sing read
write speak listen watch walk run drive fly swim build make take give find keep hold turn show move
live die help call ask tell know think feel want need like look seem leave come go see get put set
sit stand lose win pay buy sell send bring carry""".split())
SPECIAL_TOKENS = 2                      # [CLS] ... [SEP]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    n_tasks: int = 16
    alpha: float = 0.9                  # popularity skew: rate_i ~ (i + 1) ** -alpha
    total_rate: float = 20.0            # requests per second, all tasks together
    duration_s: float = 30.0            # arrivals lie in [0, duration_s)
    len_median: float = 20.0            # tokens, [CLS] and [SEP] included
    len_sigma: float = 0.6              # of the underlying normal (natural log)
    min_tokens: int = 4
    max_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.n_tasks < 1 or self.total_rate <= 0 or self.duration_s <= 0 or self.alpha < 0:
            raise ValueError("need n_tasks >= 1, total_rate > 0, duration_s > 0, alpha >= 0")
        if not SPECIAL_TOKENS < self.min_tokens <= self.max_tokens:
            raise ValueError(f"need {SPECIAL_TOKENS} < min_tokens <= max_tokens")

    def shares(self) -> np.ndarray:
        """(N,) each task's share of the requests; sums to 1, non-increasing in i."""
        w = np.arange(1, self.n_tasks + 1, dtype=np.float64) ** -self.alpha
        return w / w.sum()

    def rates(self) -> np.ndarray:
        """(N,) each task's request rate (per second); sums to total_rate."""
        return self.total_rate * self.shares()

    def describe(self) -> str:
        return (f"{self.n_tasks} tasks, rate_i ~ (i+1)^-{self.alpha:g}, Poisson arrivals at "
                f"{self.total_rate:g} req/s for {self.duration_s:g} s, lengths lognormal(median "
                f"{self.len_median:g}, sigma {self.len_sigma:g}) tokens clipped to "
                f"[{self.min_tokens}, {self.max_tokens}], seed {self.seed}")


@dataclass(frozen=True, slots=True)
class Event:
    t: float            # seconds from the start of the run
    task: int           # task index (0 = most popular)
    tokens: int         # tokens of `text` including [CLS] and [SEP]
    text: str


def arrival_times(rng: np.random.Generator, rate: float, duration_s: float) -> np.ndarray:
    """Sorted times of a Poisson process of `rate` on [0, duration_s)."""
    expected = rate * duration_s
    n = int(expected + 10 * np.sqrt(expected) + 10)        # enough draws, almost surely
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < duration_s:                              # never in practice; kept exact anyway
        t = np.concatenate((t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))))
    return t[t < duration_s]


def lengths(rng: np.random.Generator, spec: WorkloadSpec, n: int) -> np.ndarray:
    raw = rng.lognormal(np.log(spec.len_median), spec.len_sigma, n)
    return np.clip(np.rint(raw), spec.min_tokens, spec.max_tokens).astype(np.int64)


def make_text(rng: np.random.Generator, tokens: int) -> str:
    idx = rng.integers(0, len(WORDS), tokens - SPECIAL_TOKENS)
    return " ".join(WORDS[i] for i in idx)


def generate(spec: WorkloadSpec) -> list[Event]:
    """The workload's events, sorted by arrival time."""
    rng = np.random.default_rng(spec.seed)
    times = arrival_times(rng, spec.total_rate, spec.duration_s)
    tasks = rng.choice(spec.n_tasks, size=len(times), p=spec.shares())
    lens = lengths(rng, spec, len(times))
    return [Event(float(t), int(k), int(n), make_text(rng, int(n)))
            for t, k, n in zip(times, tasks, lens)]


def texts(spec: WorkloadSpec, n: int, seed_offset: int = 1) -> list[Event]:
    """n extra (time-less) inputs drawn from the same length distribution (warm-up, probes)."""
    rng = np.random.default_rng(spec.seed + seed_offset)
    lens = lengths(rng, spec, n)
    return [Event(0.0, i % spec.n_tasks, int(k), make_text(rng, int(k))) for i, k in enumerate(lens)]


def zipf_picks(rng: np.random.Generator, n_inputs: int, n_requests: int, s: float) -> np.ndarray:
    """Which of `n_inputs` distinct inputs each of `n_requests` requests carries: input k with
    probability proportional to (k + 1) ** -s (a few inputs are very popular, most rare)."""
    p = np.arange(1, n_inputs + 1, dtype=np.float64) ** -s
    return rng.choice(n_inputs, size=n_requests, p=p / p.sum())
