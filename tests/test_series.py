"""The time-series family: Fracast-0 served by fmplex equals the fracast package's own inference
(float32 weights) on real series bundled with statsmodels, through the task's pipeline (its
normalisation, the daemon's executor, the block-by-block horizon); LoRA on the release's linear
layers equals PEFT on fracast's own modules, also with tasks of different adapters in one batch;
pooled features with a head (series classification) equal the same computed from fracast's own
encoder.

The daemon side runs in-process here (LocalCall, a test double for the task's session): the
multi-process path is tests/test_families_daemon.py's."""
import asyncio

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
fracast = pytest.importorskip("fracast")

from fmplex.demo.samples import sample_series  # noqa: E402
from fmplexd.families import load_backbone  # noqa: E402
from fmplexd.families.batch_runner import bare_view  # noqa: E402
from fmplexd.families.embedded import embedded_path  # noqa: E402
from fmplexd.families.timeseries.executor import Executor, WorkItem  # noqa: E402
from fmplexd.families.timeseries.forward import Fracast  # noqa: E402
from fmplexd.families.timeseries.runner import SeriesRunner  # noqa: E402
from ipc.errors import ErrorCode, FmplexError  # noqa: E402
from ipc.messages import ForecastReply, HeadInput, InferSeries, Output, Pooling, Result  # noqa: E402
from ipc.messages import SubmitSeries  # noqa: E402
from ipc.spec import parse_spec  # noqa: E402
from tasklets.adapters import build_extension  # noqa: E402
from tasklets.pipelines.series import SeriesPipeline, normalise  # noqa: E402
from testkit.extensions import commit_extension  # noqa: E402
from testkit.tiny import write_random_head  # noqa: E402

TOL = 1e-4
LINEARS = r".*\.(in_proj|proj|to_gb|pw|up|down|summary_proj|out_proj)"     # all 15 of them


class LocalCall:
    """The daemon's side of a task session, in-process: a SubmitSeries runs the executor with the
    task's committed extension view and comes back as the Result the daemon would send."""
    task = "t"

    def __init__(self, executor: Executor, view):
        self.executor, self.view, self.requests = executor, view, 0

    async def request(self, cls, **fields):
        assert cls is SubmitSeries
        msg = SubmitSeries(epoch=1, ref=1, **fields)            # validates like the wire does
        self.requests += 1
        (data,) = self.executor.run([WorkItem(self.view, msg.output, msg.values)])
        return Result(epoch=1, ref=1, version=self.view.version, output=msg.output, data=data)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fracast", "embedded:fracast")


@pytest.fixture(scope="module")
def executor(backbone):
    return Executor(Fracast(backbone.config, backbone.weights))


@pytest.fixture(scope="module")
def reference():
    return fracast.FracastModel.from_pretrained(weights="fp32")


def _pipeline(backbone, body='pipeline = "time-series-forecasting"'):
    return SeriesPipeline(parse_spec(f'name = "t"\n{body}'), backbone.info)


def _serve(pipeline, call, values, **kw):
    msg = InferSeries(ref=1, values=np.asarray(values, np.float32).reshape(-1, np.shape(values)[-1]),
                      **kw)
    return asyncio.run(pipeline.serve(msg, call, None, 10_000))


def _co2_window():
    return sample_series("co2")[1000:1512]                  # 512 weeks, 5 of them missing


CASES = {   # name: (series (T,) or (n, T), horizons)
    "co2-with-gaps": (_co2_window, (48, 96)),
    "co2-full": (lambda: sample_series("co2"), (48,)),            # 2284 > 2048: truncated
    "sunspots": (lambda: sample_series("sunspots")[:261], (20, 48)),
    "elnino": (lambda: sample_series("elnino")[-512:], (48,)),
    "macrodata-4": (lambda: sample_series("macrodata")[:, :155], (48, 100)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forecasts_equal_fracasts_own(case, backbone, executor, reference):
    make, horizons = CASES[case]
    x = make()
    pipe = _pipeline(backbone)
    for horizon in horizons:
        call = LocalCall(executor, bare_view())
        reply = _serve(pipe, call, x, horizon=horizon)
        assert isinstance(reply, ForecastReply) and call.requests == -(-horizon // 48)
        want = np.asarray(reference.forecast(x, horizon=horizon)).reshape(reply.forecast.shape)
        worst = float(np.abs(reply.forecast - want.astype(np.float32)).max())
        print(f"{case} h{horizon}: max abs diff vs fracast {worst:.2e} (|x| <= {np.nanmax(np.abs(x)):.0f})")
        assert worst <= TOL
        assert reply.truncated == [x.shape[-1] > 2048] * reply.forecast.shape[0]
        assert reply.quantiles == backbone.info.series.quantiles


def test_quantiles_can_be_chosen(backbone, executor):
    pipe = _pipeline(backbone)
    x = sample_series("nile")
    full = _serve(pipe, LocalCall(executor, bare_view()), x)
    some = _serve(pipe, LocalCall(executor, bare_view()), x, quantiles=[0.9, 0.1])
    assert some.quantiles == [0.9, 0.1]
    assert np.array_equal(some.forecast, full.forecast[:, :, [8, 0]])
    with pytest.raises(FmplexError, match="quantile 0.25 is not one"):
        _serve(pipe, LocalCall(executor, bare_view()), x, quantiles=[0.25])
    with pytest.raises(FmplexError, match="fewer than 8 finite"):
        _serve(pipe, LocalCall(executor, bare_view()), np.r_[np.full(30, np.nan), x[:7]])


class FracastNet(torch.nn.Module):
    """fracast's own encoder and head as one module (PEFT wraps one root): (v, m) -> normalised
    quantiles (B, H, Q), exactly as FracastModel._predict_rows calls them."""

    def __init__(self):
        super().__init__()
        from fracast.inference import load_fracast
        self.core, self.head = load_fracast(embedded_path("fracast").rsplit("/", 1)[0], "fp32")

    def features(self, v, m):
        return self.core(v[:, None], m[:, None], m[:, None].float())

    def forward(self, v, m):
        return self.head.forward_horizon(self.features(v, m), last_obs=v[:, -1:], ctx=v,
                                         ctx_mask=m)


ADAPTERS = {   # name: (PEFT config, seed)
    "lora_all_r4": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS,
                                            init_lora_weights=False), 1),
    "lora_pw_out_r2": (lambda: peft.LoraConfig(r=2, lora_alpha=2, target_modules=[
        "core.block.pw", "head.out_proj", "head.future_conv.block.pw"],
        init_lora_weights=False), 2),
}


@pytest.fixture(scope="module")
def windows(backbone):
    """Three normalised windows of real series (the task's normalisation) and their mask."""
    rows = np.stack([_co2_window(), sample_series("elnino")[-512:], sample_series("co2")[-512:]])
    v = normalise(rows, backbone.info.series).values
    W = backbone.info.series.context
    full = np.zeros((3, W), np.float32)
    mask = np.zeros((3, W), bool)
    full[:, W - 512:] = np.nan_to_num(v)
    mask[:, W - 512:] = np.isfinite(v)
    return v, torch.from_numpy(full), torch.from_numpy(mask)


@pytest.fixture(scope="module")
def adapted(backbone, tmp_path_factory):
    """Per adapter: (committed view, the PEFT-wrapped fracast modules)."""
    tmp = tmp_path_factory.mktemp("fracast-adapters")
    out = {}
    for name, (config, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        model = peft.get_peft_model(FracastNet(), config()).eval()
        model.save_pretrained(str(tmp / name))
        ext = build_extension(backbone.info.targets, str(tmp / name))
        out[name] = (commit_extension(ext, backbone.info, name), model)
    return out


def test_lora_tasks_in_one_batch_equal_peft_on_fracasts_modules(adapted, executor, windows):
    v, full, mask = windows
    items, wants = [], []
    for view, model in adapted.values():
        with torch.no_grad():
            want = model(full, mask).numpy()
        items.append(WorkItem(view, Output.FORECAST, v))
        wants.append(want)
    with torch.no_grad():
        plain = FracastNet().eval()(full, mask).numpy()
    items.append(WorkItem(bare_view(), Output.FORECAST, v[1:2]))
    wants.append(plain[1:2])
    results = executor.run(items)
    worst = max(float(np.abs(r.reshape(w.shape) - w).max()) for r, w in zip(results, wants))
    print(f"fracast LoRA mixed batch vs PEFT: max abs diff {worst:.2e} (normalised units)")
    assert worst < TOL
    for w in wants[:2]:                                        # the adapters do something
        assert np.abs(w - plain).max() > 1e-2


@pytest.mark.parametrize("pooling", [Pooling.MEAN, Pooling.CLS])
def test_series_classification_heads_on_pooled_features(pooling, backbone, executor, windows,
                                                        tmp_path):
    v, full, mask = windows
    head = write_random_head(str(tmp_path / "head.safetensors"), 3, backbone.info.hidden, seed=4)
    view = commit_extension(build_extension(backbone.info.targets, None, head, pooling,
                                            HeadInput.POOLED), backbone.info)
    (logits,) = executor.run([WorkItem(view, Output.LOGITS, v)])
    with torch.no_grad():
        h = FracastNet().eval().features(full, mask).double()
    w = mask.double()[..., None]
    pooled = (h * w).sum(1) / w.sum(1) if pooling is Pooling.MEAN else h[:, -1]
    from safetensors.numpy import load_file
    t = {k: torch.from_numpy(a).double() for k, a in load_file(head).items()}
    want = (pooled @ t["weight"].T + t["bias"]).numpy()
    assert np.abs(logits - want).max() < TOL
    spec = ('pipeline = "time-series-classification"\nlabels = ["a", "b", "c"]\n'
            f'pooling = "{pooling.value}"\n[extension]\nhead = "{head}"')
    reply = _serve(_pipeline(backbone, spec), LocalCall(executor, view), _co2_window(), top_k=3)
    expect = np.exp(want[0] - want[0].max())
    assert [ls.label for ls in reply.labels[0]] == [["a", "b", "c"][i] for i in np.argsort(-expect)]


def test_the_runner_refuses_series_the_backbone_cannot_take(backbone):
    runner = SeriesRunner.__new__(SeriesRunner)               # validation only: no executor needed
    runner.backbone = backbone

    def cost(values):
        msg = SubmitSeries(epoch=1, ref=1, output=Output.FORECAST,
                           values=np.asarray(values, np.float32))
        return runner.cost(msg, bare_view())
    assert cost(np.zeros((3, 100))) == 3 * 2048
    for values, code in ((np.zeros((1, 2049)), ErrorCode.OVERSIZED),
                         (np.r_[np.full(10, np.nan), np.zeros(7)][None], ErrorCode.INVALID_INPUT),
                         (np.r_[np.inf, np.zeros(20)][None], ErrorCode.INVALID_INPUT),
                         (np.zeros((1, 0)), ErrorCode.INVALID_INPUT)):
        with pytest.raises(FmplexError) as e:
            cost(values)
        assert e.value.code is code, (values.shape, e.value)
