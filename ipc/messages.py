"""Every message of the fmplex protocol, as small frozen schemas. The one place the wire is defined.

A message travels as frame 0 = a MessagePack map {"type": TYPE, <field>: <value>, ...} followed by
one frame per Tensor field (see ipc.fields for wire forms and ipc.codec for framing). docs/protocol.md
describes the sockets and the order in which these messages are exchanged.

Conventions: `ref` correlates a request with its reply (chosen by the requester, echoed back);
`epoch` on task-plane messages is the session epoch granted by `Registered` (the epoch rule).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import numpy as np

from ipc.errors import ErrorCode
from ipc.fields import (Bool, Bytes, Enum, Float, Int, ListOf, MapOf, Optional, Str, Struct,
                        Tensor)

PROTOCOL_VERSION = 3

U64 = Int(0, (1 << 64) - 1)
REF = U64
EPOCH = Int(1, (1 << 63) - 1)
ROOM = Int(0, 1_000_000)                      # admission: requests a task's queue can still take
SEEN = Int(1, (1 << 64) - 1)                  # admission: session requests the daemon received
NAME = Str(64, 1, r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
TARGET = Str(32, 1, r"[a-z][a-z0-9_]*")      # a target (linear layer) name of a backbone's family
TASK_REF = Str(80, 1, r"[A-Za-z0-9][A-Za-z0-9_.\-]*(@[A-Za-z0-9_\-]+)?")   # name or name@variant
TEXT = Str(100_000)
MAX_SEQUENCES = 1024          # sequences per request
MAX_SEQ_TOKENS = 8192         # tokens per sequence (the backbone's own limit is usually lower)
MAX_LABELS = 4096
MAX_NEW_TOKENS = 1 << 16      # tokens one Generate may ask for


class Role(str, enum.Enum):
    TASK = "task"
    OPERATOR = "operator"
    CLIENT = "client"


class Output(str, enum.Enum):
    """What a Submit asks the executor to return for each sequence."""
    POOLED = "pooled"              # (n, hidden) pooled embedding
    LOGITS = "logits"              # (n, labels) head on the pooled embedding
    TOKENS = "tokens"              # (sum len, hidden) per-token hidden states
    TOKEN_LOGITS = "token_logits"  # (sum len, labels) per-token head
    FORECAST = "forecast"          # (n * horizon, quantiles) time series: the native horizon's
                                   # quantiles of each series, series-major (see SubmitSeries)


class Pooling(str, enum.Enum):
    CLS = "cls"
    MEAN = "mean"


class Family(str, enum.Enum):
    """A backbone family: what its forward does and which requests it serves (fmplexd/families/)."""
    TEXT_ENCODER = "text-encoder"      # BERT-style encoders: Submit -> Result
    DECODER = "decoder"                # Llama-style LLMs: generation (iterations, KV pool)
    VISION = "vision"                  # ViT / DINOv2
    TIME_SERIES = "time-series"        # forecasting models


class HeadKind(str, enum.Enum):
    LINEAR = "linear"
    MLP = "mlp"


class HeadInput(str, enum.Enum):
    POOLED = "pooled"
    TOKENS = "tokens"


class Activation(str, enum.Enum):
    RELU = "relu"
    GELU = "gelu"
    TANH = "tanh"


class TaskState(str, enum.Enum):
    WAITING = "waiting"      # registered, no process attached (or not yet committed)
    READY = "ready"          # attached and committed: serving
    DEAD = "dead"            # its process died; being restarted by the supervisor
    STOPPED = "stopped"      # removed or gave up restarting


class FinishReason(str, enum.Enum):
    """Why a generated sequence ended."""
    STOP = "stop"                # an end-of-sequence / stop token, or a stop string
    LENGTH = "length"            # max_tokens, or the backbone's context
    CANCELLED = "cancelled"      # the client cancelled, or went away
    ERROR = "error"              # the daemon could not continue it (see the error's message)


class Op(str, enum.Enum):
    """Operator commands the daemon relays to a task process."""
    UPDATE = "update"        # load a new extension, hot-swap (or stage a canary)
    PROMOTE = "promote"      # make the canary the only version
    ROLLBACK = "rollback"    # drop the canary
    STOP = "stop"            # unregister and exit


class Message:
    """Base of all top-level messages. TYPE is the wire "type" string."""
    __slots__ = ()
    TYPE: ClassVar[str] = ""


# ---------------------------------------------------------------- nested structs

@dataclass(frozen=True, slots=True)
class LoraEntry:
    layer: Annotated[int, Int(0, 255)]
    module: Annotated[str, TARGET]                # one of the backbone's BackboneInfo.targets
    rank: Annotated[int, Int(1, 1024)]
    scale: Annotated[float, Float(-1e6, 1e6)]     # alpha / rank (or alpha / sqrt(rank) for rsLoRA)


@dataclass(frozen=True, slots=True)
class Ia3Entry:
    layer: Annotated[int, Int(0, 255)]
    module: Annotated[str, TARGET]
    feedforward: Annotated[bool, Bool()]          # scale the input (True) or the output (False)


@dataclass(frozen=True, slots=True)
class HeadSpec:
    kind: Annotated[HeadKind, Enum(HeadKind)]
    input: Annotated[HeadInput, Enum(HeadInput)]
    num_labels: Annotated[int, Int(1, MAX_LABELS)]
    hidden: Annotated[int, Int(0, 65536)] = 0     # MLP hidden width (0 for linear)
    activation: Annotated[Activation, Enum(Activation)] = Activation.RELU


@dataclass(frozen=True, slots=True)
class ExtensionSpec:
    """What a task adds to the backbone. Tensor shapes follow from this and the backbone."""
    pooling: Annotated[Pooling, Enum(Pooling)] = Pooling.CLS
    lora: Annotated[list[LoraEntry], ListOf(Struct(LoraEntry), 6 * 256)] = field(default_factory=list)
    ia3: Annotated[list[Ia3Entry], ListOf(Struct(Ia3Entry), 6 * 256)] = field(default_factory=list)
    prompt_tokens: Annotated[int, Int(0, 512)] = 0
    head: Annotated[HeadSpec | None, Optional(Struct(HeadSpec))] = None


@dataclass(frozen=True, slots=True)
class TaskConfig:
    name: Annotated[str, TASK_REF]
    owner_uid: Annotated[int, Int(0, (1 << 32) - 1)]
    weight: Annotated[float, Float(1e-3, 1e6)] = 1.0
    queue_limit: Annotated[int, Int(1, 1_000_000)] = 256
    deadline_ms: Annotated[int, Int(1, 3_600_000)] = 10_000
    backbone: Annotated[str, NAME] = "default"
    family: Annotated[Family, Enum(Family)] = Family.TEXT_ENCODER   # what the task's pipeline needs


@dataclass(frozen=True, slots=True)
class SlotEntry:
    name: Annotated[str, Str(128, 1)]
    dtype: Annotated[str, Str(16, 1)]
    shape: Annotated[list[int], ListOf(Int(0, 1 << 31), 4)]
    offset: Annotated[int, U64]                   # byte offset inside one half


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """A task's extension region: two halves of half_bytes; the task writes `half`, then commits."""
    generation: Annotated[int, Int(1)]
    size: Annotated[int, U64]
    half_bytes: Annotated[int, U64]
    half: Annotated[int, Int(0, 1)]
    entries: Annotated[list[SlotEntry], ListOf(Struct(SlotEntry), 8192)]
    token: Annotated[bytes, Bytes(64)]            # presented on the handle plane to get the fd


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """A linear layer of every backbone layer that an extension (LoRA, IA3) may target."""
    name: Annotated[str, TARGET]                  # e.g. "query" (slot tensor names use it)
    path: Annotated[str, Str(128, 1)]             # its module path inside a layer, as PEFT names it
    in_features: Annotated[int, Int(1)]
    out_features: Annotated[int, Int(1)]
    per_layer: Annotated[bool, Bool()] = True     # False: one module of the whole model, `path`
                                                  # from its root, addressed as layer 0


# ---------------------------------------------------------------- vision and time-series families
# (structs; their request messages are in the task-plane and client-endpoint sections below)

@dataclass(frozen=True, slots=True)
class ImageInfo:
    """How a vision backbone's task pre-processes an image (Pillow + numpy, in the task process):
    resize the shortest edge to `resize` (0: resize to size x size directly), center-crop
    `size` x `size`, scale to [0, 1], subtract `mean` and divide by `std` per RGB channel."""
    size: Annotated[int, Int(1, 4096)]            # pixels of the square the backbone is fed
    patch: Annotated[int, Int(1, 256)]            # pixels of a patch side
    resize: Annotated[int, Int(0, 8192)]
    resample: Annotated[str, Str(16, 1, r"bicubic|bilinear")]
    mean: Annotated[list[float], ListOf(Float(-10, 10), 3, 3)]
    std: Annotated[list[float], ListOf(Float(1e-6, 10), 3, 3)]


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """What a time-series backbone forecasts: from at most `context` past values (at least
    `min_observed` finite), `horizon` steps at once, each as the listed quantiles."""
    context: Annotated[int, Int(1, 1 << 20)]
    horizon: Annotated[int, Int(1, 1 << 16)]
    quantiles: Annotated[list[float], ListOf(Float(0, 1), 99, 1)]
    min_observed: Annotated[int, Int(1)] = 8


@dataclass(frozen=True, slots=True)
class GenerationInfo:
    """What a task needs to prompt a decoder backbone (BackboneInfo.generation)."""
    context: Annotated[int, Int(1)]                          # positions: prompt + completion
    eos_ids: Annotated[list[int], ListOf(Int(0, (1 << 31) - 1), 64)]
    bos_id: Annotated[int | None, Optional(Int(0, (1 << 31) - 1))] = None
    chat_template: Annotated[str, Str(1 << 16)] = ""         # Jinja, as in the model's metadata


@dataclass(frozen=True, slots=True)
class BackboneInfo:
    name: Annotated[str, NAME]
    family: Annotated[Family, Enum(Family)]
    model_type: Annotated[str, Str(32, 1)]
    hidden: Annotated[int, Int(1)]
    layers: Annotated[int, Int(1)]
    heads: Annotated[int, Int(1)]
    intermediate: Annotated[int, Int(1)]
    dtype: Annotated[str, Str(16, 1)]
    region_bytes: Annotated[int, U64]
    checksum: Annotated[str, Str(128)]
    targets: Annotated[list[TargetInfo], ListOf(Struct(TargetInfo), 64)]
    max_positions: Annotated[int, Int(0)] = 0     # usable input length (tokens, patches, steps)
    vocab: Annotated[int, Int(0)] = 0             # text families
    tokenizer: Annotated[str, Str(4096)] = ""     # path of tokenizer.json ("" if none)
    generation: Annotated[GenerationInfo | None, Optional(Struct(GenerationInfo))] = None  # decoders
    image: Annotated[ImageInfo | None, Optional(Struct(ImageInfo))] = None       # vision
    series: Annotated[SeriesInfo | None, Optional(Struct(SeriesInfo))] = None    # time series


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    name: Annotated[str, Str(256, 1)]
    dtype: Annotated[str, Str(16, 1)]
    shape: Annotated[list[int], ListOf(Int(0, 1 << 31), 8)]
    offset: Annotated[int, U64]


@dataclass(frozen=True, slots=True)
class Manifest:
    """Layout of a shared region: where each named tensor lies. checksum = blake2b of the bytes."""
    size: Annotated[int, U64]
    alignment: Annotated[int, Int(1, 1 << 21)]
    checksum: Annotated[str, Str(128)]
    entries: Annotated[list[ManifestEntry], ListOf(Struct(ManifestEntry), 100_000)]


@dataclass(frozen=True, slots=True)
class RegionInfo:
    name: Annotated[str, Str(128, 1)]
    kind: Annotated[str, Str(32, 1)]              # "backbone" or "slot"
    bytes: Annotated[int, U64]


@dataclass(frozen=True, slots=True)
class BackboneStats:
    """A hosted backbone's load (InfoReply): its batches and, for decoders, its KV pool."""
    name: Annotated[str, NAME]
    batches: Annotated[int, Int(0)] = 0                 # batches / iterations run so far
    tokens_per_s: Annotated[float, Float(0)] = 0.0      # measured throughput (rows per second)
    kv_blocks_total: Annotated[int, Int(0)] = 0
    kv_blocks_used: Annotated[int, Int(0)] = 0
    kv_block_tokens: Annotated[int, Int(0)] = 0
    kv_tokens: Annotated[int, Int(0)] = 0               # tokens whose K/V the used blocks hold
    sequences: Annotated[int, Int(0)] = 0               # generating now
    preemptions: Annotated[int, Int(0)] = 0             # sequences preempted so far


@dataclass(frozen=True, slots=True)
class TaskStats:
    name: Annotated[str, TASK_REF]
    state: Annotated[TaskState, Enum(TaskState)]
    owner_uid: Annotated[int, Int(0, (1 << 32) - 1)]
    weight: Annotated[float, Float(0)]
    pid: Annotated[int, Int(0)]
    version: Annotated[int, Int(0)]
    queued: Annotated[int, Int(0)]
    requests: Annotated[int, Int(0)]
    served_tokens: Annotated[int, Int(0)]
    errors: Annotated[int, Int(0)]
    timeouts: Annotated[int, Int(0)]
    overloaded: Annotated[int, Int(0)]
    p50_ms: Annotated[float, Float(0)]
    p99_ms: Annotated[float, Float(0)]
    rate: Annotated[float, Float(0)]              # completed requests per second, recent window
    restarts: Annotated[int, Int(0)] = 0
    endpoint: Annotated[str, Str(512)] = ""
    backbone: Annotated[str, Str(64)] = ""        # the backbone it runs on
    device_ms: Annotated[float, Float(0)] = 0.0   # forward time its requests took (each batch's
                                                  # time split by the requests' costs)
    family: Annotated[Family, Enum(Family)] = Family.TEXT_ENCODER   # its backbone's family
    cache_hits: Annotated[int, Int(0)] = 0        # requests its process answered from its result
    cache_misses: Annotated[int, Int(0)] = 0      # cache (as its cache_stats report them); hits
    cache_bytes: Annotated[int, Int(0)] = 0       # never reach the daemon, so not in `requests`


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: Annotated[str, Str(256)]
    score: Annotated[float, Float()]


@dataclass(frozen=True, slots=True)
class TokenLabel:
    start: Annotated[int, Int(0)]                 # character offsets into the input text
    end: Annotated[int, Int(0)]
    label: Annotated[str, Str(256)]
    score: Annotated[float, Float()]


# ---------------------------------------------------------------- shared by all sockets

@dataclass(frozen=True, slots=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    ref: Annotated[int, REF]
    code: Annotated[ErrorCode, Enum(ErrorCode)]
    message: Annotated[str, Str(4096)]
    epoch: Annotated[int, Int(0, (1 << 63) - 1)] = 0
    room: Annotated[int | None, Optional(ROOM)] = None     # admission (daemon -> task): see Result
    seen: Annotated[int | None, Optional(SEEN)] = None


@dataclass(frozen=True, slots=True)
class Ok(Message):
    TYPE: ClassVar[str] = "ok"
    ref: Annotated[int, REF]
    message: Annotated[str, Str(4096)] = ""


@dataclass(frozen=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    ref: Annotated[int, REF]
    proto: Annotated[int, Int(0, 1 << 16)]
    role: Annotated[Role, Enum(Role)]
    pid: Annotated[int, Int(0, 1 << 31)] = 0


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    ref: Annotated[int, REF]
    proto: Annotated[int, Int(0, 1 << 16)]
    epoch: Annotated[int, EPOCH]                  # the daemon's incarnation
    heartbeat_ms: Annotated[int, Int(1, 60_000)]
    backbones: Annotated[list[BackboneInfo], ListOf(Struct(BackboneInfo), 64)]


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    epoch: Annotated[int, EPOCH]
    seq: Annotated[int, U64]


# ---------------------------------------------------------------- task plane

@dataclass(frozen=True, slots=True)
class Register(Message):
    TYPE: ClassVar[str] = "register"
    ref: Annotated[int, REF]
    proto: Annotated[int, Int(0, 1 << 16)]        # must be PROTOCOL_VERSION
    task: Annotated[TaskConfig, Struct(TaskConfig)]
    extension: Annotated[ExtensionSpec, Struct(ExtensionSpec)]
    pid: Annotated[int, Int(0, 1 << 31)] = 0
    endpoint: Annotated[str, Str(512)] = ""       # where the task's clients connect (ipc://)
    tcp_endpoint: Annotated[str, Str(512)] = ""   # optional tcp:// endpoint (CURVE)
    server_key: Annotated[str, Str(64)] = ""      # its CURVE public key (Z85)


@dataclass(frozen=True, slots=True)
class Registered(Message):
    TYPE: ClassVar[str] = "registered"
    ref: Annotated[int, REF]
    epoch: Annotated[int, EPOCH]                  # the session epoch: carried by all later messages
    slot: Annotated[SlotGrant, Struct(SlotGrant)]
    backbone: Annotated[BackboneInfo, Struct(BackboneInfo)]
    heartbeat_ms: Annotated[int, Int(1, 60_000)]


@dataclass(frozen=True, slots=True)
class Submit(Message):
    TYPE: ClassVar[str] = "submit"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    output: Annotated[Output, Enum(Output)]
    lengths: Annotated[list[int], ListOf(Int(1, MAX_SEQ_TOKENS), MAX_SEQUENCES, 1)]
    ids: Annotated[np.ndarray, Tensor(("int32",), ndim=1)]
    type_ids: Annotated[np.ndarray | None, Optional(Tensor(("int8",), ndim=1))] = None
    deadline_ms: Annotated[int, Int(0, 3_600_000)] = 0   # relative; 0 = the task's default


@dataclass(frozen=True, slots=True)
class Result(Message):
    TYPE: ClassVar[str] = "result"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    version: Annotated[int, Int(0)]               # extension version the batch used
    output: Annotated[Output, Enum(Output)]
    data: Annotated[np.ndarray, Tensor(("float32", "float16"), ndim=2)]
    queue_ms: Annotated[float, Float(0)] = 0.0
    run_ms: Annotated[float, Float(0)] = 0.0
    # Admission, as flow control (also on Tokens and on a session's Error replies): when the daemon
    # sent this, it had received `seen` requests of the session (1 = the first) and the task's
    # queue had room for `room` more. The task may send room - (requests sent - seen) more before
    # one is refused as overloaded, and refuses further ones itself before doing any work for
    # them. Absent: no admission figures.
    room: Annotated[int | None, Optional(ROOM)] = None
    seen: Annotated[int | None, Optional(SEEN)] = None


# -- vision and time-series requests (one forward each; answered by a Result)

MAX_IMAGES = 64               # images per request
MAX_SERIES = 256              # series per request


@dataclass(frozen=True, slots=True)
class SubmitImages(Message):
    """Pre-processed images (n, 3, H, W) for a vision backbone: H and W multiples of its patch.
    Result.data: POOLED (n, hidden) (CLS row or mean of the patch rows, per the task's pooling),
    LOGITS (n, labels), TOKENS (n * (1 + patches), hidden) every image's rows, CLS first."""
    TYPE: ClassVar[str] = "submit_images"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    output: Annotated[Output, Enum(Output)]
    pixels: Annotated[np.ndarray, Tensor(("float32",), ndim=4)]
    deadline_ms: Annotated[int, Int(0, 3_600_000)] = 0


@dataclass(frozen=True, slots=True)
class SubmitSeries(Message):
    """Normalised series (n, T) for a time-series backbone, T <= its context, oldest first, NaN
    where unobserved (the backbone left-pads to its context). Result.data: FORECAST
    (n * horizon, quantiles) in normalised units, series-major (row i * horizon + t is series i,
    step t); POOLED (n, hidden) the mean of the observed steps' features; LOGITS (n, labels)."""
    TYPE: ClassVar[str] = "submit_series"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    output: Annotated[Output, Enum(Output)]
    values: Annotated[np.ndarray, Tensor(("float32",), ndim=2)]
    deadline_ms: Annotated[int, Int(0, 3_600_000)] = 0


@dataclass(frozen=True, slots=True)
class Generate(Message):
    """Task -> daemon: generate a completion of `prompt` (token ids) on a decoder backbone. Answered
    by a stream of Tokens (the last one has `finish`), or an Error before the first Tokens."""
    TYPE: ClassVar[str] = "generate"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    prompt: Annotated[np.ndarray, Tensor(("int32",), ndim=1)]
    max_tokens: Annotated[int, Int(1, MAX_NEW_TOKENS)]
    temperature: Annotated[float, Float(0.0, 100.0)] = 0.0    # 0 = greedy
    top_p: Annotated[float, Float(0.0, 1.0)] = 1.0            # nucleus; must be > 0
    top_k: Annotated[int, Int(0, 1 << 20)] = 0                # 0 = all tokens
    seed: Annotated[int | None, Optional(U64)] = None         # a seeded request repeats exactly
    stop_ids: Annotated[list[int], ListOf(Int(0, (1 << 31) - 1), 64)] = field(default_factory=list)
    ignore_eos: Annotated[bool, Bool()] = False               # run to max_tokens (benchmarks)
    deadline_ms: Annotated[int, Int(0, 3_600_000)] = 0        # to start; 0 = the task's default


@dataclass(frozen=True, slots=True)
class Tokens(Message):
    """Daemon -> task: the tokens a sequence gained since the last Tokens (one per iteration); the
    last message of a sequence carries `finish` and the final counts."""
    TYPE: ClassVar[str] = "tokens"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    ids: Annotated[list[int], ListOf(Int(0, (1 << 31) - 1), MAX_NEW_TOKENS)]
    finish: Annotated[FinishReason | None, Optional(Enum(FinishReason))] = None
    prompt_tokens: Annotated[int, Int(0)] = 0
    completion_tokens: Annotated[int, Int(0)] = 0
    version: Annotated[int, Int(0)] = 0                       # extension version generating it
    room: Annotated[int | None, Optional(ROOM)] = None        # admission: see Result
    seen: Annotated[int | None, Optional(SEEN)] = None


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Task -> daemon: stop generating `ref` and free its KV blocks now (answered by its final
    Tokens, finish = cancelled, unless it already finished)."""
    TYPE: ClassVar[str] = "cancel"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]


@dataclass(frozen=True, slots=True)
class PrepareUpdate(Message):
    TYPE: ClassVar[str] = "prepare_update"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    extension: Annotated[ExtensionSpec, Struct(ExtensionSpec)]


@dataclass(frozen=True, slots=True)
class UpdateReady(Message):
    TYPE: ClassVar[str] = "update_ready"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    slot: Annotated[SlotGrant, Struct(SlotGrant)]


@dataclass(frozen=True, slots=True)
class Commit(Message):
    TYPE: ClassVar[str] = "commit"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    generation: Annotated[int, Int(1)]
    half: Annotated[int, Int(0, 1)]


@dataclass(frozen=True, slots=True)
class Committed(Message):
    TYPE: ClassVar[str] = "committed"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    version: Annotated[int, Int(1)]


@dataclass(frozen=True, slots=True)
class Unregister(Message):
    TYPE: ClassVar[str] = "unregister"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]


@dataclass(frozen=True, slots=True)
class Command(Message):
    """Daemon -> task: an operator's lifecycle command for this task (relayed from the control API)."""
    TYPE: ClassVar[str] = "command"
    epoch: Annotated[int, EPOCH]
    ref: Annotated[int, REF]
    op: Annotated[Op, Enum(Op)]
    spec: Annotated[str, Str(1 << 20)] = ""       # UPDATE: TOML text of the new spec
    spec_dir: Annotated[str, Str(4096)] = ""      # where relative paths in `spec` start
    canary_percent: Annotated[int, Int(0, 100)] = 0


@dataclass(frozen=True, slots=True)
class CacheStats(Message):
    """Task -> daemon: the session's result cache so far (tasklets/cache.py), cumulative over the
    session; sent at most once per heartbeat period, and only when it changed. Counts as a sign of
    life like a heartbeat."""
    TYPE: ClassVar[str] = "cache_stats"
    epoch: Annotated[int, EPOCH]
    hits: Annotated[int, U64]
    misses: Annotated[int, U64]
    entries: Annotated[int, U64]
    bytes: Annotated[int, U64]


# ---------------------------------------------------------------- control socket

@dataclass(frozen=True, slots=True)
class Info(Message):
    TYPE: ClassVar[str] = "info"
    ref: Annotated[int, REF]


@dataclass(frozen=True, slots=True)
class InfoReply(Message):
    TYPE: ClassVar[str] = "info_reply"
    ref: Annotated[int, REF]
    epoch: Annotated[int, EPOCH]
    version: Annotated[str, Str(64)]
    uptime_s: Annotated[float, Float(0)]
    run_dir: Annotated[str, Str(4096)]
    backbones: Annotated[list[BackboneInfo], ListOf(Struct(BackboneInfo), 64)]
    regions: Annotated[list[RegionInfo], ListOf(Struct(RegionInfo), 100_000)]
    load: Annotated[list[BackboneStats], ListOf(Struct(BackboneStats), 64)] = field(
        default_factory=list)
    metrics: Annotated[str, Str(512)] = ""        # the Prometheus URL ("" when not serving one)


@dataclass(frozen=True, slots=True)
class ListTasks(Message):
    TYPE: ClassVar[str] = "list_tasks"
    ref: Annotated[int, REF]


@dataclass(frozen=True, slots=True)
class TaskList(Message):
    TYPE: ClassVar[str] = "task_list"
    ref: Annotated[int, REF]
    tasks: Annotated[list[TaskStats], ListOf(Struct(TaskStats), 100_000)]


@dataclass(frozen=True, slots=True)
class RemoveTask(Message):
    TYPE: ClassVar[str] = "remove_task"
    ref: Annotated[int, REF]
    name: Annotated[str, TASK_REF]


@dataclass(frozen=True, slots=True)
class Deploy(Message):
    """Start (and supervise) a task process for the spec; spec_path is where it was read from."""
    TYPE: ClassVar[str] = "deploy"
    ref: Annotated[int, REF]
    spec: Annotated[str, Str(1 << 20, 1)]
    spec_path: Annotated[str, Str(4096)] = ""


@dataclass(frozen=True, slots=True)
class TaskCommand(Message):
    """Operator -> daemon: relay a lifecycle command to the named task's process."""
    TYPE: ClassVar[str] = "task_command"
    ref: Annotated[int, REF]
    name: Annotated[str, NAME]
    op: Annotated[Op, Enum(Op)]
    spec: Annotated[str, Str(1 << 20)] = ""
    spec_dir: Annotated[str, Str(4096)] = ""
    canary_percent: Annotated[int, Int(0, 100)] = 0


@dataclass(frozen=True, slots=True)
class Resolve(Message):
    TYPE: ClassVar[str] = "resolve"
    ref: Annotated[int, REF]
    name: Annotated[str, NAME]


@dataclass(frozen=True, slots=True)
class Endpoint(Message):
    TYPE: ClassVar[str] = "endpoint"
    ref: Annotated[int, REF]
    name: Annotated[str, NAME]
    address: Annotated[str, Str(512)]             # ipc:// endpoint
    tcp_endpoint: Annotated[str, Str(512)] = ""
    server_key: Annotated[str, Str(64)] = ""      # CURVE public key (Z85) of the tcp endpoint


@dataclass(frozen=True, slots=True)
class Health(Message):
    TYPE: ClassVar[str] = "health"
    ref: Annotated[int, REF]
    name: Annotated[str, Str(80)] = ""            # "" = the daemon itself
    wait_ms: Annotated[int, Int(0, 600_000)] = 0  # a task not ready: answer when it is, or then
    not_pid: Annotated[int, Int(0, 1 << 31)] = 0  # count as ready only with another pid (restarts)


@dataclass(frozen=True, slots=True)
class HealthReply(Message):
    TYPE: ClassVar[str] = "health_reply"
    ref: Annotated[int, REF]
    live: Annotated[bool, Bool()]
    ready: Annotated[bool, Bool()]
    detail: Annotated[str, Str(1024)] = ""


# ---------------------------------------------------------------- client endpoint (a task's socket)

@dataclass(frozen=True, slots=True)
class Infer(Message):
    TYPE: ClassVar[str] = "infer"
    ref: Annotated[int, REF]
    texts: Annotated[list[str], ListOf(TEXT, MAX_SEQUENCES, 1)]
    pairs: Annotated[list[str] | None, Optional(ListOf(TEXT, MAX_SEQUENCES, 1))] = None
    top_k: Annotated[int, Int(0, MAX_LABELS)] = 0        # 0 = the task's default
    timeout_ms: Annotated[int, Int(0, 3_600_000)] = 0    # 0 = the task's default deadline
    proto: Annotated[int, Int(0, 1 << 16)] = 0           # if given, must be PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class InferReply(Message):
    """One entry per input in whichever fields the task's pipeline fills (the others stay None)."""
    TYPE: ClassVar[str] = "infer_reply"
    ref: Annotated[int, REF]
    task: Annotated[str, TASK_REF]                # the variant that answered (name or name@canary)
    version: Annotated[int, Int(0)]
    truncated: Annotated[list[bool], ListOf(Bool(), MAX_SEQUENCES)]
    labels: Annotated[list[list[LabelScore]] | None,
                      Optional(ListOf(ListOf(Struct(LabelScore), MAX_LABELS), MAX_SEQUENCES))] = None
    embeddings: Annotated[np.ndarray | None, Optional(Tensor(("float32",), ndim=2))] = None
    similarity: Annotated[list[float] | None, Optional(ListOf(Float(), MAX_SEQUENCES))] = None
    tokens: Annotated[list[list[TokenLabel]] | None,
                      Optional(ListOf(ListOf(Struct(TokenLabel), MAX_SEQ_TOKENS), MAX_SEQUENCES))] = None
    prompt_tokens: Annotated[int, Int(0)] = 0     # text tasks: tokens of all inputs as run (after
                                                  # truncation, special tokens included)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Annotated[str, Str(32, 1, r"[a-z_]+")]             # system | user | assistant | tool
    content: Annotated[str, TEXT]


@dataclass(frozen=True, slots=True)
class GenerateText(Message):
    """Client -> a text-generation task: a raw `prompt` (tokenized as written; special tokens in it
    are recognized) or chat `messages` (rendered with the model's chat template). Unset sampling
    fields take the task's defaults. Answered by TextDelta messages (per token with `stream`, else
    at most every 0.5 s), then one GenerateReply (or an Error)."""
    TYPE: ClassVar[str] = "generate_text"
    ref: Annotated[int, REF]
    prompt: Annotated[str | None, Optional(TEXT)] = None
    messages: Annotated[list[ChatMessage] | None, Optional(ListOf(Struct(ChatMessage), 1024, 1))] = None
    max_tokens: Annotated[int | None, Optional(Int(1, MAX_NEW_TOKENS))] = None
    temperature: Annotated[float | None, Optional(Float(0.0, 100.0))] = None
    top_p: Annotated[float | None, Optional(Float(0.0, 1.0))] = None
    top_k: Annotated[int | None, Optional(Int(0, 1 << 20))] = None
    seed: Annotated[int | None, Optional(U64)] = None
    stop: Annotated[list[str] | None, Optional(ListOf(Str(256, 1), 16))] = None
    stop_token_ids: Annotated[list[int] | None, Optional(ListOf(Int(0, (1 << 31) - 1), 64))] = None
    stream: Annotated[bool, Bool()] = False
    ignore_eos: Annotated[bool, Bool()] = False
    timeout_ms: Annotated[int, Int(0, 3_600_000)] = 0
    proto: Annotated[int, Int(0, 1 << 16)] = 0


@dataclass(frozen=True, slots=True)
class TextDelta(Message):
    """Task -> client: text (and its token ids) added since the previous delta of request `ref`."""
    TYPE: ClassVar[str] = "text_delta"
    ref: Annotated[int, REF]
    text: Annotated[str, Str(1 << 20)]
    token_ids: Annotated[list[int], ListOf(Int(0, (1 << 31) - 1), MAX_NEW_TOKENS)]


@dataclass(frozen=True, slots=True)
class GenerateReply(Message):
    """Task -> client: the final answer to GenerateText. `text` excludes a matched stop string and
    special tokens; `token_ids` are every generated id (a final end-of-sequence id included)."""
    TYPE: ClassVar[str] = "generate_reply"
    ref: Annotated[int, REF]
    task: Annotated[str, TASK_REF]
    version: Annotated[int, Int(0)]
    text: Annotated[str, Str(1 << 22)]
    token_ids: Annotated[list[int], ListOf(Int(0, (1 << 31) - 1), MAX_NEW_TOKENS)]
    prompt_tokens: Annotated[int, Int(0)]
    completion_tokens: Annotated[int, Int(0)]
    finish_reason: Annotated[FinishReason, Enum(FinishReason)]


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    """Client -> task: cancel this client's request `ref` (answered `ok`, or `error` unknown_task
    when no such request is in flight); the request itself then ends with finish_reason
    cancelled."""
    TYPE: ClassVar[str] = "cancel_request"
    ref: Annotated[int, REF]


# -- vision and time-series clients (InferImages / InferSeries -> InferReply or ForecastReply)

MAX_IMAGE_BYTES = 16 << 20    # one encoded image
MAX_HORIZON = 4096


@dataclass(frozen=True, slots=True)
class InferImages(Message):
    """Encoded images (PNG, JPEG, ... as files hold them) for a vision task; answered by an
    InferReply (labels or embeddings; truncated all false)."""
    TYPE: ClassVar[str] = "infer_images"
    ref: Annotated[int, REF]
    images: Annotated[list[bytes], ListOf(Bytes(MAX_IMAGE_BYTES), MAX_IMAGES, 1)]
    top_k: Annotated[int, Int(0, MAX_LABELS)] = 0
    timeout_ms: Annotated[int, Int(0, 3_600_000)] = 0
    proto: Annotated[int, Int(0, 1 << 16)] = 0


@dataclass(frozen=True, slots=True)
class InferSeries(Message):
    """Series (n, T) for a time-series task, oldest first, NaN where missing (pad shorter series
    on the left with NaN). A forecasting task answers a ForecastReply of `horizon` steps (0 = the
    backbone's native horizon) and the listed `quantiles` (None = all the backbone's; each must be
    one of them); a classification task answers an InferReply with labels."""
    TYPE: ClassVar[str] = "infer_series"
    ref: Annotated[int, REF]
    values: Annotated[np.ndarray, Tensor(("float32",), ndim=2)]
    horizon: Annotated[int, Int(0, MAX_HORIZON)] = 0
    quantiles: Annotated[list[float] | None, Optional(ListOf(Float(0, 1), 99, 1))] = None
    top_k: Annotated[int, Int(0, MAX_LABELS)] = 0
    timeout_ms: Annotated[int, Int(0, 3_600_000)] = 0
    proto: Annotated[int, Int(0, 1 << 16)] = 0


@dataclass(frozen=True, slots=True)
class ForecastReply(Message):
    """forecast[i, t, k]: series i, step t + 1 after its last value, quantile quantiles[k], in the
    series' own units. truncated[i]: series i had more than the backbone's context (its oldest
    values were not used)."""
    TYPE: ClassVar[str] = "forecast_reply"
    ref: Annotated[int, REF]
    task: Annotated[str, TASK_REF]
    version: Annotated[int, Int(0)]
    quantiles: Annotated[list[float], ListOf(Float(0, 1), 99, 1)]
    forecast: Annotated[np.ndarray, Tensor(("float32",), ndim=3)]
    truncated: Annotated[list[bool], ListOf(Bool(), MAX_SERIES)]


# ---------------------------------------------------------------- handle plane (AF_UNIX)

@dataclass(frozen=True, slots=True)
class OpenRegions(Message):
    """Ask for the fds of a session's regions: the backbone (read-only) and the task's slot."""
    TYPE: ClassVar[str] = "open_regions"
    ref: Annotated[int, REF]
    token: Annotated[bytes, Bytes(64)]


@dataclass(frozen=True, slots=True)
class RegionsGranted(Message):
    """Reply carrying fds by SCM_RIGHTS, in order: backbone region, then slot region."""
    TYPE: ClassVar[str] = "regions_granted"
    ref: Annotated[int, REF]
    backbone: Annotated[Manifest, Struct(Manifest)]
    slot_size: Annotated[int, U64]
    slot_generation: Annotated[int, Int(1)]


# ---------------------------------------------------------------- zygote channel (AF_UNIX SEQPACKET)

@dataclass(frozen=True, slots=True)
class ZygoteReady(Message):
    """Zygote -> daemon, once: the preload is done and spawns are served."""
    TYPE: ClassVar[str] = "zygote_ready"
    pid: Annotated[int, Int(1, 1 << 31)]


@dataclass(frozen=True, slots=True)
class Spawn(Message):
    """Daemon -> zygote: fork a task process for `spec` (its log, environment and identity)."""
    TYPE: ClassVar[str] = "spawn"
    ref: Annotated[int, REF]
    name: Annotated[str, TASK_REF]
    spec: Annotated[str, Str(4096, 1)]            # path of the task's spec file
    log: Annotated[str, Str(4096, 1)]             # the child's stdout and stderr (appended)
    env: Annotated[dict[str, str], MapOf(Str(1 << 16), 4096, Str(256, 1))]
    uid: Annotated[int | None, Optional(Int(0, (1 << 32) - 1))] = None
    gid: Annotated[int | None, Optional(Int(0, (1 << 32) - 1))] = None
    nice: Annotated[int, Int(0, 19)] = 0          # the child lowers its priority by this much
    cgroups: Annotated[list[str], ListOf(Str(4096, 1), 8)] = field(default_factory=list)
    # cgroup.procs files the child joins (before it takes the owner's uid); see fmplexd.cgroups


@dataclass(frozen=True, slots=True)
class Spawned(Message):
    """Zygote -> daemon: the answer to a Spawn (an Error with its ref if the fork failed)."""
    TYPE: ClassVar[str] = "spawned"
    ref: Annotated[int, REF]
    pid: Annotated[int, Int(1, 1 << 31)]


@dataclass(frozen=True, slots=True)
class ChildExit(Message):
    """Zygote -> daemon: a forked task process ended (code < 0: killed by signal -code)."""
    TYPE: ClassVar[str] = "child_exit"
    pid: Annotated[int, Int(1, 1 << 31)]
    code: Annotated[int, Int(-255, 255)]



# ---------------------------------------------------------------- cluster routing
# The cluster controller's service socket (tcp:// + CURVE; cluster/service.py): clients resolve
# tasks to the replicas that serve them; operators deploy, remove and inspect cluster tasks.

@dataclass(frozen=True, slots=True)
class RouteEndpoint:
    """One serving replica of a task: the tcp:// endpoint of its task process on one host."""
    host: Annotated[str, NAME]                    # the host's name (its Ray node label value)
    address: Annotated[str, Str(512, 1)]          # tcp://HOST:PORT of the task's endpoint
    server_key: Annotated[str, Str(64, 1)]        # that task process's CURVE public key (Z85)
    load: Annotated[float, Float(0, 1e6)] = 0.0   # the host's recent utilization (a hint)


@dataclass(frozen=True, slots=True)
class Route:
    task: Annotated[str, NAME]
    endpoints: Annotated[list[RouteEndpoint], ListOf(Struct(RouteEndpoint), 256)]


@dataclass(frozen=True, slots=True)
class RouteQuery(Message):
    """Ask for the routes of some tasks (all when `tasks` is empty). With wait_ms, a long poll:
    the answer comes once every asked task has a serving endpoint not in `avoid` (the endpoints
    the client just saw fail), or when wait_ms has passed, whichever is first."""
    TYPE: ClassVar[str] = "route_query"
    ref: Annotated[int, REF]
    tasks: Annotated[list[str], ListOf(NAME, 4096)] = field(default_factory=list)
    wait_ms: Annotated[int, Int(0, 60_000)] = 0
    avoid: Annotated[list[str], ListOf(Str(512, 1), 256)] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RouteTable(Message):
    """The routes asked for; `version` grows whenever any route of the cluster changes."""
    TYPE: ClassVar[str] = "route_table"
    ref: Annotated[int, REF]
    version: Annotated[int, U64]
    routes: Annotated[list[Route], ListOf(Struct(Route), 100_000)]


@dataclass(frozen=True, slots=True)
class ClusterDeploy(Message):
    """Operator -> controller: run a task somewhere in the cluster (answered `ok` once accepted).
    rate, slo_ms and memory_bytes are placement inputs until the hosts report measured figures."""
    TYPE: ClassVar[str] = "cluster_deploy"
    ref: Annotated[int, REF]
    spec: Annotated[str, Str(1 << 20, 1)]         # the task spec (TOML); [endpoint] tcp is assigned
    spec_dir: Annotated[str, Str(4096)] = ""      # where relative paths in `spec` start
    rate: Annotated[float, Float(0, 1e9)] = 0.0   # expected requests per second
    slo_ms: Annotated[int, Int(0, 3_600_000)] = 0   # latency objective; 0 = the spec's deadline
    min_replicas: Annotated[int, Int(1, 256)] = 1
    max_replicas: Annotated[int, Int(1, 256)] = 1   # above min_replicas: replicas autoscale
    memory_bytes: Annotated[int, U64] = 0         # extension size on a host; 0 = estimate


@dataclass(frozen=True, slots=True)
class ClusterRemove(Message):
    TYPE: ClassVar[str] = "cluster_remove"
    ref: Annotated[int, REF]
    name: Annotated[str, NAME]


@dataclass(frozen=True, slots=True)
class ClusterStatus(Message):
    TYPE: ClassVar[str] = "cluster_status"
    ref: Annotated[int, REF]


@dataclass(frozen=True, slots=True)
class HostStatus:
    name: Annotated[str, NAME]
    alive: Annotated[bool, Bool()]
    backbones: Annotated[list[str], ListOf(NAME, 64)]
    memory_bytes: Annotated[int, U64]             # what the host offers
    used_bytes: Annotated[int, U64]               # backbones and task slots
    load: Annotated[float, Float(0, 1e6)]         # estimated utilization of its device(s)
    tasks: Annotated[int, Int(0)]


@dataclass(frozen=True, slots=True)
class ClusterTask:
    name: Annotated[str, NAME]
    backbone: Annotated[str, NAME]
    replicas: Annotated[int, Int(0, 256)]         # wanted now (between min and max replicas)
    hosts: Annotated[list[str], ListOf(NAME, 256)]   # where it serves
    rate: Annotated[float, Float(0, 1e9)]         # measured requests per second, all replicas
    p99_ms: Annotated[float, Float(0, 1e9)]       # worst replica's recent p99
    slo_ms: Annotated[int, Int(0, 3_600_000)]


@dataclass(frozen=True, slots=True)
class ClusterStatusReply(Message):
    TYPE: ClassVar[str] = "cluster_status_reply"
    ref: Annotated[int, REF]
    version: Annotated[int, U64]                  # the route table's version
    hosts: Annotated[list[HostStatus], ListOf(Struct(HostStatus), 4096)]
    tasks: Annotated[list[ClusterTask], ListOf(Struct(ClusterTask), 100_000)]

ALL_MESSAGES: tuple[type[Message], ...] = (
    Error, Ok, Hello, Welcome, Heartbeat,
    Register, Registered, Submit, Result, Generate, Tokens, Cancel, PrepareUpdate, UpdateReady,
    Commit, Committed, Unregister, Command, CacheStats,
    Info, InfoReply, ListTasks, TaskList, RemoveTask, Deploy, TaskCommand, Resolve, Endpoint,
    Health, HealthReply,
    Infer, InferReply, GenerateText, TextDelta, GenerateReply, CancelRequest,
    SubmitImages, SubmitSeries, InferImages, InferSeries, ForecastReply,
    OpenRegions, RegionsGranted,
    ZygoteReady, Spawn, Spawned, ChildExit,
    RouteQuery, RouteTable, ClusterDeploy, ClusterRemove, ClusterStatus, ClusterStatusReply,
)
