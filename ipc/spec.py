"""Task specs (TOML): what a task is, who owns it, its limits, pipeline and extension sources.

Parsed by task processes (which run the spec) and by the daemon's supervisor (which deploys it), so
it lives here, below both. Pure Python (tomllib); no torch.

    name = "sentiment"                   # required; [A-Za-z0-9][A-Za-z0-9_.-]*
    pipeline = "text-classification"     # required: text-embedding | text-classification |
                                         #   token-classification | sentence-similarity |
                                         #   text-generation (a decoder backbone) |
                                         #   image-classification | image-embedding |
                                         #   time-series-forecasting | time-series-classification
    backbone = "default"
    owner = "alice"                      # user name or numeric uid; default: the current user
    weight = 1.0                         # fair-share weight
    queue_limit = 256                    # requests queued in the daemon before "overloaded"; the
                                         # task itself accepts at most 2x this many at once
    deadline_ms = 10000                  # default per-request deadline (text-generation: 120000)
    memory_mb = 0                        # the task process's memory limit (its cgroup's memory.max
                                         #   where fmplexd places tasks in cgroups); 0 = none
    labels = ["negative", "positive"]    # classification pipelines: one per head output
    pooling = "mean"                     # cls | mean (default: mean); images: the CLS row or
                                         #   the mean of the patch rows; series: the last step's
                                         #   features or the mean over the observed steps
    top_k = 1                            # default labels returned per input
    cache_mb = 0                         # result cache in the task process, MiB (0 = off): a
                                         #   repeated request is answered from it (tasklets.cache)

    [extension]                          # all optional; paths are relative to this file
    adapter = "adapters/sentiment"       # PEFT adapter directory (LoRA, IA3 or prompt tuning)
    head = "heads/sentiment.safetensors" # linear (weight, bias) or MLP (w1, b1, w2, b2)
    head_activation = "relu"             # relu | gelu | tanh (MLP heads)

    system_prompt = ""                   # text-generation: prepended to chats without a system
                                         # message ("" = the chat template's own default)
    [generation]                         # text-generation defaults (a request may override them)
    max_tokens = 128
    temperature = 0.0                    # 0 = greedy
    top_p = 1.0
    top_k = 0                            # 0 = off
    stop = []                            # stop strings

    [endpoint]
    tcp = ""                             # e.g. "tcp://127.0.0.1:7001": also serve over CURVE
    authorized_keys = []                 # Z85 client public keys allowed on tcp://

Parsing validates everything and raises SpecError (code invalid_input) naming the field.
"""
from __future__ import annotations

import enum
import os
import pwd
import re
import tomllib
from dataclasses import dataclass

from ipc.errors import ErrorCode, FmplexError
from ipc.messages import Activation, Family, HeadInput, Output, Pooling, TaskConfig

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class Pipeline(str, enum.Enum):
    EMBEDDING = "text-embedding"
    CLASSIFICATION = "text-classification"
    TOKEN_CLASSIFICATION = "token-classification"
    SIMILARITY = "sentence-similarity"
    GENERATION = "text-generation"
    IMAGE_CLASSIFICATION = "image-classification"
    IMAGE_EMBEDDING = "image-embedding"
    FORECASTING = "time-series-forecasting"
    SERIES_CLASSIFICATION = "time-series-classification"

    @property
    def output(self) -> Output:
        return {Pipeline.CLASSIFICATION: Output.LOGITS,
                Pipeline.TOKEN_CLASSIFICATION: Output.TOKEN_LOGITS,
                Pipeline.IMAGE_CLASSIFICATION: Output.LOGITS,
                Pipeline.FORECASTING: Output.FORECAST,
                Pipeline.SERIES_CLASSIFICATION: Output.LOGITS}.get(self, Output.POOLED)

    @property
    def family(self) -> Family:
        """The backbone family the pipeline runs on (a backbone of another family is refused)."""
        return _FAMILIES.get(self, Family.TEXT_ENCODER)

    @property
    def head_input(self) -> HeadInput | None:
        return {Pipeline.CLASSIFICATION: HeadInput.POOLED,
                Pipeline.TOKEN_CLASSIFICATION: HeadInput.TOKENS,
                Pipeline.IMAGE_CLASSIFICATION: HeadInput.POOLED,
                Pipeline.SERIES_CLASSIFICATION: HeadInput.POOLED}.get(self)


_FAMILIES = {Pipeline.GENERATION: Family.DECODER,
             Pipeline.IMAGE_CLASSIFICATION: Family.VISION, Pipeline.IMAGE_EMBEDDING: Family.VISION,
             Pipeline.FORECASTING: Family.TIME_SERIES,
             Pipeline.SERIES_CLASSIFICATION: Family.TIME_SERIES}


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """A text-generation task's sampling defaults."""
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()


class SpecError(FmplexError):
    def __init__(self, field: str, why: str):
        super().__init__(ErrorCode.INVALID_INPUT, f"spec field {field!r}: {why}")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    pipeline: Pipeline
    backbone: str
    owner_uid: int
    weight: float
    queue_limit: int
    deadline_ms: int
    labels: tuple[str, ...]
    pooling: Pooling
    top_k: int
    adapter: str | None
    head: str | None
    head_activation: Activation
    tcp: str
    authorized_keys: tuple[str, ...]
    system_prompt: str = ""
    generation: GenerationDefaults = GenerationDefaults()
    memory_mb: int = 0
    cache_mb: float = 0.0

    def task_config(self, variant: str = "") -> TaskConfig:
        return TaskConfig(name=self.name + (f"@{variant}" if variant else ""),
                          owner_uid=self.owner_uid, weight=self.weight,
                          queue_limit=self.queue_limit, deadline_ms=self.deadline_ms,
                          backbone=self.backbone, family=self.pipeline.family)


_TOP = {"name", "pipeline", "backbone", "owner", "weight", "queue_limit", "deadline_ms", "labels",
        "pooling", "top_k", "extension", "endpoint", "system_prompt", "generation", "memory_mb",
        "cache_mb"}
_GENERATION = {"max_tokens", "temperature", "top_p", "top_k", "stop"}
_EXT = {"adapter", "head", "head_activation"}
_ENDPOINT = {"tcp", "authorized_keys"}


def load_spec(path: str) -> TaskSpec:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("<file>", f"cannot read {path}: {e}") from None
    return parse_spec(text, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_spec(text: str, base_dir: str | None = None) -> TaskSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError("<toml>", str(e)) from None
    _no_unknown("", data, _TOP)
    ext, endpoint = _table(data, "extension", _EXT), _table(data, "endpoint", _ENDPOINT)
    gen = _table(data, "generation", _GENERATION)
    name = _get(data, "name", str, required=True)
    if not NAME_RE.fullmatch(name):
        raise SpecError("name", f"{name!r} must match {NAME_RE.pattern}")
    pipeline = _enum(Pipeline, "pipeline", _get(data, "pipeline", str, required=True))
    labels = tuple(_get(data, "labels", list, []))
    if not all(isinstance(x, str) and x for x in labels):
        raise SpecError("labels", "must be a list of non-empty strings")
    if pipeline.head_input is not None and not labels:
        raise SpecError("labels", f"a {pipeline.value} task needs its labels")
    head = _path(base_dir, _get(ext, "head", str))
    if pipeline.head_input is not None and head is None:
        raise SpecError("extension.head", f"a {pipeline.value} task needs a head file")
    keys = tuple(_get(endpoint, "authorized_keys", list, []))
    if not all(isinstance(k, str) and len(k) == 40 for k in keys):
        raise SpecError("endpoint.authorized_keys", "must be Z85 public keys (40 characters)")
    spec = TaskSpec(
        name=name, pipeline=pipeline, backbone=_get(data, "backbone", str, "default"),
        owner_uid=_owner(data.get("owner")),
        weight=_number(data, "weight", 1.0, 1e-3, 1e6), queue_limit=int(_number(
            data, "queue_limit", 256, 1, 1_000_000, integer=True)),
        deadline_ms=int(_number(data, "deadline_ms", 120_000 if pipeline is Pipeline.GENERATION
                                else 10_000, 1, 3_600_000, integer=True)),
        labels=labels, pooling=_enum(Pooling, "pooling", _get(data, "pooling", str, "mean")),
        top_k=int(_number(data, "top_k", 1, 1, 4096, integer=True)),
        adapter=_path(base_dir, _get(ext, "adapter", str)), head=head,
        head_activation=_enum(Activation, "extension.head_activation",
                              _get(ext, "head_activation", str, "relu")),
        tcp=_get(endpoint, "tcp", str, ""), authorized_keys=keys,
        system_prompt=_get(data, "system_prompt", str, ""), generation=_generation(gen),
        memory_mb=int(_number(data, "memory_mb", 0, 0, 1 << 24, integer=True)),
        cache_mb=float(_number(data, "cache_mb", 0, 0, 1 << 20)))
    if (spec.system_prompt or gen) and pipeline is not Pipeline.GENERATION:
        raise SpecError("system_prompt" if spec.system_prompt else "generation",
                        f"only a {Pipeline.GENERATION.value} task takes it")
    if spec.tcp and not spec.tcp.startswith("tcp://"):
        raise SpecError("endpoint.tcp", "must be a tcp:// address")
    return spec


def _generation(gen: dict) -> GenerationDefaults:
    stop = tuple(_get(gen, "stop", list, []))
    if not all(isinstance(x, str) and 0 < len(x) <= 256 for x in stop) or len(stop) > 16:
        raise SpecError("generation.stop", "must be at most 16 non-empty strings of <= 256 chars")
    return GenerationDefaults(
        max_tokens=int(_number(gen, "max_tokens", 128, 1, 1 << 16, integer=True)),
        temperature=float(_number(gen, "temperature", 0.0, 0.0, 100.0)),
        top_p=float(_number(gen, "top_p", 1.0, 1e-6, 1.0)),
        top_k=int(_number(gen, "top_k", 0, 0, 1 << 20, integer=True)), stop=stop)


def _table(data: dict, key: str, allowed: set) -> dict:
    t = data.get(key, {})
    if not isinstance(t, dict):
        raise SpecError(key, "must be a table")
    _no_unknown(key + ".", t, allowed)
    return t


def _no_unknown(prefix: str, data: dict, allowed: set) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise SpecError(prefix + extra[0], "unknown field")


def _get(data: dict, key: str, typ: type, default=None, required: bool = False):
    if key not in data:
        if required:
            raise SpecError(key, "missing")
        return default
    value = data[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise SpecError(key, f"must be a {typ.__name__}")
    return value


def _number(data: dict, key: str, default, lo, hi, integer: bool = False):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise SpecError(key, "must be an integer" if integer else "must be a number")
    if not lo <= value <= hi:
        raise SpecError(key, f"{value} outside [{lo}, {hi}]")
    return value


def _enum(cls, field: str, value: str):
    try:
        return cls(value)
    except ValueError:
        raise SpecError(field, f"{value!r} is not one of {[m.value for m in cls]}") from None


def _owner(value) -> int:
    return owner_uid(value, "owner")


def owner_uid(value, field: str) -> int:
    """A user name or uid (None: the current user) -> uid; SpecError naming `field` otherwise.
    (Also the gateway's API-key owners.)"""
    if value is None:
        return os.getuid()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise SpecError(field, f"no user named {value!r}") from None
    raise SpecError(field, "must be a user name or a uid")


def _path(base_dir: str | None, value: str | None) -> str | None:
    if not value:
        return None
    return value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
