"""What every backbone family provides, and the pieces their runners share.

A family (fmplexd/families/<family>/) supplies:
    detect(path) -> bool              whether a path holds a backbone of this family
    load(name, path, dtype, workdir, progress) -> Backbone
                                      weights read from the formats users hold, checked, published
                                      in one sealed read-only region (`publish`); its BackboneInfo
                                      names the targets (linear layers) an extension may touch;
                                      `progress(text)` (optional) hears its stages as they come
    make_runner(backbone, settings) -> Runner
                                      the engine's handle on that backbone's executor

A Runner turns the family's request messages into scheduler requests (`admit`), forms the next
unit of work from the shared scheduler (`form`: a batch for one-forward families, an iteration for
generation), runs it in a worker thread (`run`) and turns its outputs into messages for the tasks
(`finish`). The engine calls nothing else, so sessions, supervisor and scheduler never see a
family's types.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

import numpy as np
import torch

from fmplexd.families import compute_dtype
from fmplexd.scheduler import Batch, Request, Scheduler
from ipc.errors import FmplexError
from ipc.messages import BackboneInfo, Family, Manifest, Message, TargetInfo
from ipc.shm import MappedRegion, export_tensors

Progress = Callable[[str], None]      # a loader's stages ("dequantizing tensor 3/272 (1%)")


def quiet(_: str) -> None:
    """A Progress that tells nobody."""


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class Backbone:
    """A loaded backbone: its sealed region (the only copy of the weights), read-only torch views
    of it, the family's own config object, and what tasks are told about it."""
    name: str
    path: str
    family: Family
    dtype: str
    config: Any
    fd: int
    manifest: Manifest
    region: MappedRegion
    weights: dict[str, torch.Tensor]
    info: BackboneInfo


def hf_model_type(path: str) -> str | None:
    """The model_type of a Hugging Face directory's config.json (None if there is none)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            value = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_shapes(path: str, tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]
                 ) -> dict[str, torch.Tensor]:
    """The tensors `want` names, each of the shape it gives (ValueError naming the first that is
    missing or of another shape); other tensors are left out."""
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, config "
                             f"implies {shape}")
    return {k: tensors[k] for k in want}


def publish(name: str, tensors: dict[str, torch.Tensor], dtype: str, keep: frozenset[str] = frozenset()
            ) -> tuple[int, Manifest, MappedRegion, dict[str, torch.Tensor]]:
    """Cast to `dtype`'s compute dtype (tensors named in `keep` keep their own: quantized weights
    and their scales), write into one sealed memfd and map it back read-only: the daemon itself
    then runs on views of the shared copy. Returns (fd, manifest, region, views by name)."""
    tdt = TORCH_DTYPES[compute_dtype(dtype)]
    cast = {k: (t if k in keep else t.to(tdt)).contiguous() for k, t in tensors.items()}
    arrays = {k: _as_numpy(t) for k, t in cast.items()}
    fd, manifest = export_tensors(f"fmplex-backbone-{name}", arrays,
                                  dtypes={k: _REGION_DTYPES[t.dtype] for k, t in cast.items()})
    region = MappedRegion(fd, manifest.size)
    return fd, manifest, region, {e.name: region.tensor(e) for e in manifest.entries}


def publish_checked(name: str, path: str, raw: dict[str, torch.Tensor],
                    want: dict[str, tuple[int, ...]], dtype: str):
    """`publish` the tensors `want` names after `check_shapes`."""
    return publish(name, check_shapes(path, raw, want), dtype)


def layer_targets(paths: dict[str, str], hidden: int, intermediate: int) -> list[TargetInfo]:
    """A transformer layer's targets (name -> PEFT path): H -> H, except ffn_in H -> I and
    ffn_out I -> H."""
    dims = {"ffn_in": (hidden, intermediate), "ffn_out": (intermediate, hidden)}
    return [TargetInfo(name=n, path=p, in_features=dims.get(n, (hidden, hidden))[0],
                       out_features=dims.get(n, (hidden, hidden))[1]) for n, p in paths.items()]


_REGION_DTYPES = {torch.int8: "int8", **{t: n for n, t in TORCH_DTYPES.items()}}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view("<u2") if t.dtype == torch.bfloat16 else t.numpy()


class TaskRef(Protocol):
    """What the engine and runners may read of a task (fmplexd.registry.TaskEntry satisfies it)."""
    name: str
    session: int
    config: Any          # ipc.messages.TaskConfig: backbone, deadline_ms, ...
    slot: Any            # .active: the committed ExtensionView, or None


@dataclass(slots=True, eq=False)
class Pending:
    """A queued request: whose (task + session), which message, when it arrived; `view` is the
    extension version pinned when it enters a batch."""
    task: TaskRef
    session: int
    msg: Message
    arrival: float
    view: Any = None


@dataclass(slots=True)
class Delivery:
    """A message for a task's process, if it still holds `session`. A final non-Error message
    completes a request (its latency, when given, is recorded)."""
    task: TaskRef
    session: int
    msg: Message
    final: bool = True
    latency_s: float | None = None


@dataclass(slots=True)
class Work:
    """One unit of executor work (a batch or an iteration) and what `finish` needs afterwards."""
    runner: "Runner"
    batch: Batch
    items: list
    pendings: list[Pending]
    expired: list[Request] = field(default_factory=list)
    tokens: int = 0
    rows: list[tuple[int, int]] = field(default_factory=list)   # (session, its rows): device time


class Runner(Protocol):
    backbone: Backbone
    accepts: frozenset[type]           # the request messages this family serves
    concurrent: bool                   # several of its works may run at once (executor lanes);
                                       # False: the next is formed after the last one finished

    def admit(self, task: TaskRef, msg: Message, now: float, deadline: float) -> Request: ...
    def form(self, scheduler: Scheduler, group: Hashable, now: float) -> Work | None: ...
    def run(self, work: Work) -> list: ...
    def finish(self, work: Work, outputs: "list | FmplexError", t0: float, t1: float
               ) -> list[Delivery]: ...
    def release(self, work: Work) -> None: ...
    def warm_up(self) -> None: ...
    def busy(self) -> bool: ...        # has work of its own beyond the scheduler's queues
    def forget(self, session: int) -> list: ...      # the session ended: drop its work
    def kv_stats(self) -> dict: ...                  # BackboneStats fields (KV pool, sequences)
    def cancel(self, scheduler: Scheduler, session: int, ref: int) -> list[Delivery]: ...


class Pacer:
    """Sizes batches to take about `target_s` (0 = always `max_budget`): the budget follows the
    measured throughput (an EWMA of tokens/s over batches that filled at least half their budget),
    between MIN_BUDGET and `max_budget`. A forward cannot be interrupted, so the batch time bounds
    how long a newly arrived request of a quiet task waits behind a busy neighbour; on a GPU the
    measured throughput makes the same target allow large batches."""

    MIN_BUDGET = 32

    def __init__(self, max_budget: int, target_s: float):
        self.max_budget, self.target_s = max_budget, target_s
        self.budget = max_budget
        self.tokens_per_s = 0.0

    def calibrate(self, tokens: int, seconds: float) -> None:
        self.tokens_per_s = tokens / max(seconds, 1e-6)
        self._set_budget()

    def observe(self, tokens: int, seconds: float) -> None:
        """A batch of `tokens` took `seconds`: update the throughput estimate and the budget."""
        if seconds > 0 and tokens >= self.budget // 2:
            rate = tokens / seconds
            self.tokens_per_s = rate if not self.tokens_per_s else 0.8 * self.tokens_per_s + 0.2 * rate
            self._set_budget()

    def horizon(self) -> float:
        """Expected duration of the next full batch (for deadline checks)."""
        return self.budget / self.tokens_per_s if self.tokens_per_s else 0.0

    def _set_budget(self) -> None:
        if self.target_s and self.tokens_per_s:
            budget = int(self.tokens_per_s * self.target_s)
            self.budget = max(self.MIN_BUDGET, min(self.max_budget, budget))
