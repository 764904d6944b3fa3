"""One fmplexd hosts a backbone of every family from one config (all-MiniLM-L6-v2, DINOv2-small,
Fracast-0, SmolLM2-135M-Instruct: the embedded carriers), real task processes of every family are
served concurrently, and every answer equals its reference (transformers for text and images,
fracast's own inference for series, greedy decoding on an in-process DecoderForward of the same
GGUF for generation: tests/test_generation_parity.py holds that one to transformers). `fmplex
info` lists each backbone with its family and tasks; a task whose pipeline needs another family
is refused, by the task process and by the daemon.

Adding a family is one more FAMILIES entry: its backbone, its tasks'
spec bodies, how a client calls them and the reference each answer must equal."""
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
fracast = pytest.importorskip("fracast")

from fmplex.demo.samples import sample_images, sample_series  # noqa: E402
from fmplexd.families.embedded import embedded_path  # noqa: E402
from ipc import aio  # noqa: E402
from ipc.addresses import RunDir  # noqa: E402
from ipc.errors import ErrorCode, FmplexError  # noqa: E402
from ipc.messages import ExtensionSpec, Family, ListTasks, TaskConfig  # noqa: E402
from tasklets.daemon_link import DaemonLink  # noqa: E402
from testkit.decode import greedy_decode  # noqa: E402
from testkit.launch import REPO, Daemon, TaskProc, short_tmpdir, write_spec  # noqa: E402
from testkit.tiny import write_random_head  # noqa: E402
from tests.test_lean_task import mapped_files  # noqa: E402

TOL = 1e-4
TEXTS = [["a man is playing a guitar", "the stock market fell sharply today"], ["hello world"]]
SERIES = [sample_series("co2")[1000:1512], sample_series("macrodata")[:, :155]]
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
NEW_TOKENS = 8


@dataclass(frozen=True)
class TaskCase:
    name: str
    backbone: str
    body: str                                  # spec lines after name (and backbone)
    inputs: list                               # one request per input
    call: Callable                             # (client, task, input) -> reply
    check: Callable                            # (references, input, reply) -> max abs error


def _text_ref(refs, texts):
    tok, model = refs["text"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def _image_ref(refs, images, pooling):
    proc, model = refs["vision"]
    from io import BytesIO

    from PIL import Image
    x = proc(images=[Image.open(BytesIO(b)) for b in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        h = model(pixel_values=x).last_hidden_state.double()
    return (h[:, 0] if pooling == "cls" else h[:, 1:].mean(1)).numpy()


def _image_cls_check(refs, images, reply):
    pooled = _image_ref(refs, images, "cls")
    w, b = refs["head"]
    logits = pooled @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = np.array([[{ls.label: ls.score for ls in row}[f"c{k}"] for k in range(3)]
                    for row in reply.labels])
    return float(np.abs(got - p).max())


def _image_emb_check(refs, images, reply):
    e = _image_ref(refs, images, "mean")
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return float(np.abs(reply.embeddings - e).max())


def _forecast_check(refs, x, reply):
    want = np.asarray(refs["series"].forecast(x, horizon=96), np.float32)
    return float(np.abs(reply.forecast - want.reshape(reply.forecast.shape)).max())


def _generation_check(refs, prompt, reply):
    """0 if the daemon's greedy tokens are the in-process decode's, else 1."""
    fw, cfg, tok = refs["llm"]
    want, _ = greedy_decode(fw, cfg, tok.encode(prompt, add_special_tokens=False).ids, NEW_TOKENS)
    return 0.0 if list(reply.token_ids) == want else 1.0


IMAGES = list(sample_images().values())
FAMILIES = {   # backbone name -> (path, its tasks)
    "text": ("embedded", [
        TaskCase("fam-text", "text", 'pipeline = "text-embedding"', TEXTS,
                 lambda c, t, x: c.infer(t, x),
                 lambda refs, x, r: float(np.abs(r.embeddings - _text_ref(refs, x)).max()))]),
    "vision": ("embedded:dinov2", [
        TaskCase("fam-img-cls", "vision", 'pipeline = "image-classification"\nlabels = ["c0", '
                 '"c1", "c2"]\npooling = "cls"\ntop_k = 3\n[extension]\nhead = "head.safetensors"',
                 [IMAGES, IMAGES[:1]], lambda c, t, x: c.infer_images(t, x), _image_cls_check),
        TaskCase("fam-img-emb", "vision", 'pipeline = "image-embedding"\npooling = "mean"',
                 [IMAGES[1:]], lambda c, t, x: c.infer_images(t, x), _image_emb_check)]),
    "series": ("embedded:fracast", [
        TaskCase("fam-co2", "series", 'pipeline = "time-series-forecasting"', SERIES,
                 lambda c, t, x: c.infer_series(t, x, horizon=96), _forecast_check)]),
    "llm": ("embedded:smollm2", [
        TaskCase("fam-gen", "llm", 'pipeline = "text-generation"', PROMPTS,
                 lambda c, t, x: c.generate(t, prompt=x, max_tokens=NEW_TOKENS, ignore_eos=True),
                 _generation_check)]),
}
CASES = [case for _, cases in FAMILIES.values() for case in cases]


@pytest.fixture(scope="module")
def served():
    d = Daemon({name: path for name, (path, _) in FAMILIES.items()},
               config="liveness_ms = 5000\nheartbeat_ms = 250").start(timeout_s=300)
    specs = short_tmpdir("fmx-fam-")
    write_random_head(os.path.join(specs, "head.safetensors"), 3, 384, seed=5)
    procs = []
    try:
        for case in CASES:
            path = write_spec(specs, case.name, f'backbone = "{case.backbone}"\n{case.body}')
            procs.append(TaskProc(path, d.run_dir).start(timeout_s=120))
        yield d, specs, {case.name: p for case, p in zip(CASES, procs)}
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


@pytest.fixture(scope="module")
def references(tmp_path_factory, served):
    """transformers' MiniLM and Dinov2Model (from the weights the daemon extracted from the same
    ONNX graph, as an HF directory), fracast's own model, the head the image task uses, and
    SmolLM2 dequantized in this process (a DecoderForward, its config and tokenizer)."""
    import json

    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    from fmplexd.families import load_backbone
    from fmplexd.families.decoder.forward import DecoderForward
    from fmplexd.families.vision.onnx_extract import extract
    minilm = embedded_path("minilm")
    cfg, weights = extract(embedded_path("dinov2"))
    d = tmp_path_factory.mktemp("dinov2-hf")
    with open(d / "config.json", "w") as f:
        json.dump({**cfg, "architectures": ["Dinov2Model"]}, f)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 256}, resample=3, crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    head = load_file(os.path.join(served[1], "head.safetensors"))
    llm = load_backbone("llm", "embedded:smollm2", "float32",
                        str(tmp_path_factory.mktemp("smollm2")))
    return {"llm": (DecoderForward(llm.config, llm.weights), llm.config,
                    Tokenizer.from_file(llm.info.tokenizer)),
            "text": (transformers.AutoTokenizer.from_pretrained(minilm),
                     transformers.AutoModel.from_pretrained(minilm).eval()),
            "vision": (processor, transformers.Dinov2Model.from_pretrained(str(d)).eval()),
            "series": fracast.FracastModel.from_pretrained(weights="fp32"),
            "head": (head["weight"].astype(np.float64), head["bias"].astype(np.float64))}


def test_tasks_of_every_family_served_concurrently_equal_their_references(served, references):
    """Every task's client starts at once (a barrier), so the daemon's batches of the three
    backbones interleave under one scheduler; then each answer is checked."""
    daemon, _, _ = served
    replies: dict[str, list] = {}
    errors: list = []
    start = threading.Barrier(len(CASES))

    def client(case: TaskCase) -> None:
        try:
            with daemon.client(timeout_s=120) as c:
                start.wait(60)
                replies[case.name] = [case.call(c, case.name, x) for x in case.inputs * 2]
        except Exception as e:                       # reported below, with the task's name
            errors.append(f"{case.name}: {e!r}")

    threads = [threading.Thread(target=client, args=(case,)) for case in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors
    for case in CASES:
        worst = max(case.check(references, x, r)
                    for x, r in zip(case.inputs * 2, replies[case.name]))
        print(f"{case.name} ({case.backbone}): max abs diff vs reference {worst:.2e}")
        assert worst < TOL, case.name
    with daemon.client() as c:
        stats = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}
    for case in CASES:
        assert stats[case.name].backbone == case.backbone
        assert stats[case.name].device_ms > 0 and stats[case.name].requests >= 2 * len(case.inputs)


def test_fmplex_info_lists_each_backbone_with_family_and_tasks(served):
    daemon, _, _ = served
    out = subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", daemon.run_dir, "info"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name, (_, cases) in FAMILIES.items():
        head = next(i for i, line in enumerate(lines) if line.startswith(f"backbone {name}: "))
        family = {"text": Family.TEXT_ENCODER, "vision": Family.VISION,
                  "series": Family.TIME_SERIES, "llm": Family.DECODER}[name]
        assert lines[head].split(": ", 1)[1].startswith(f"{family.value} (")
        assert " float32, " in lines[head] and " MiB, checksum " in lines[head]
        assert lines[head + 1] == (f"  {len(cases)} task(s): "
                                   + ", ".join(sorted(c.name for c in cases)))


def test_a_task_of_another_family_is_refused(served):
    daemon, specs, _ = served
    wrong = write_spec(specs, "fam-wrong", 'backbone = "series"\npipeline = "image-embedding"')
    with pytest.raises(RuntimeError) as e:
        TaskProc(wrong, daemon.run_dir).start(timeout_s=60)
    assert ("fmplex-task-error: invalid_input: a image-embedding task needs a vision backbone; "
            "series is a time-series backbone") in str(e.value)

    async def register(link):                        # the daemon refuses it too, on its own
        cfg = TaskConfig(name="fam-raw", owner_uid=os.getuid(), backbone="text",
                         family=Family.VISION)
        return await link.register(cfg, ExtensionSpec(), {})

    async def go():
        link = DaemonLink(RunDir(daemon.run_dir))
        await link.open(10)
        try:
            return await register(link)
        finally:
            await link.close()
    with pytest.raises(FmplexError) as e:
        aio.run(go())
    assert e.value.code is ErrorCode.INVALID_INPUT
    assert "needs a vision backbone; text is a text-encoder backbone" in e.value.message


def test_task_processes_of_every_family_map_no_torch(served):
    """Image decoding and series normalisation stay torch-free (DESIGN.md: standard tasks import
    no torch); the daemon maps it, so the check can see it."""
    daemon, _, procs = served
    assert any("libtorch" in f for f in mapped_files(daemon.proc.pid))
    for name, p in procs.items():
        assert not [f for f in mapped_files(p.proc.pid) if "libtorch" in f or "/torch/" in f], name
