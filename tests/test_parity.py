"""The daemon's executor equals transformers + PEFT within 1e-4 (fp32, CPU), alone and when one
batch mixes 8 tasks with different ranks, target modules, heads, pooling and no extension.

Adapters are created with PEFT on the same backbone, saved with save_pretrained, loaded by the task
side's loader (tasklets.adapters) and written through a real slot mapping before the forward."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fmplexd.families import load_backbone  # noqa: E402
from fmplexd.families.encoder.forward import Encoder  # noqa: E402
from fmplexd.families.encoder.executor import Executor, WorkItem  # noqa: E402
from ipc.messages import HeadInput, Output, Pooling  # noqa: E402
from tasklets.adapters import build_extension  # noqa: E402
from testkit.extensions import commit_extension  # noqa: E402

TOL = 1e-4
TEXTS = ["a", "hello world", "the quick brown fox jumps over the lazy dog near the river bank",
         "serving many tasks on one shared backbone is the whole point of this project, and "
         "batching them together is how it stays fast on a small machine"]
ALL_MODULES = (r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
               r"intermediate\.dense|output\.dense)")


@pytest.fixture(scope="module")
def tok(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def executor(minilm):
    return Executor(Encoder(minilm.config, minilm.weights))


def peft_model(path, config, seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(transformers.AutoModel.from_pretrained(path), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)          # PEFT starts IA3 at identity; make it matter
    return model


def hidden_of(model, tok, text):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).last_hidden_state[0].double()


def pooled(h, pooling):
    return h[0] if pooling is Pooling.CLS else h.mean(0)


def random_head(tmp_path, name, labels, hidden, mlp, seed):
    rng = np.random.default_rng(seed)
    if mlp:
        t = {"w1": rng.normal(0, 0.2, (64, hidden)), "b1": rng.normal(0, 0.1, 64),
             "w2": rng.normal(0, 0.2, (labels, 64)), "b2": rng.normal(0, 0.1, labels)}
    else:
        t = {"weight": rng.normal(0, 0.2, (labels, hidden)), "bias": rng.normal(0, 0.1, labels)}
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.astype(np.float32) for k, v in t.items()}, path)
    return path, {k: torch.from_numpy(v) for k, v in t.items()}


def apply_head(t, x):
    if "w1" in t:
        return torch.relu(x @ t["w1"].T + t["b1"]) @ t["w2"].T + t["b2"]
    return x @ t["weight"].T + t["bias"]


def encode(tok, texts):
    ids = [tok(t)["input_ids"] for t in texts]
    return np.concatenate(ids).astype(np.int32), [len(i) for i in ids]


TASKS = {   # name: (PEFT config factory or None, pooling, head (labels, mlp, input) or None, output)
    "lora_qv_r8": (lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                           init_lora_weights=False), Pooling.MEAN, None, Output.POOLED),
    "lora_all_r4": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_MODULES,
                                            init_lora_weights=False), Pooling.CLS, None, Output.TOKENS),
    "lora_rs_r16": (lambda: peft.LoraConfig(r=16, lora_alpha=32, use_rslora=True,
                                            target_modules=["key", "intermediate.dense"],
                                            layers_to_transform=[0, 2, 4], init_lora_weights=False),
                    Pooling.MEAN, (3, False, HeadInput.POOLED), Output.LOGITS),
    "ia3": (lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                   feedforward_modules=["output.dense"]), Pooling.MEAN, None, Output.POOLED),
    "prompt10": (lambda: peft.PromptTuningConfig(num_virtual_tokens=10, task_type="FEATURE_EXTRACTION"),
                 Pooling.CLS, None, Output.TOKENS),
    "plain": (None, Pooling.CLS, None, Output.POOLED),
    "lora_r2_mlp": (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["value", "output.dense"],
                                            init_lora_weights=False),
                    Pooling.CLS, (5, True, HeadInput.POOLED), Output.LOGITS),
    "token_head": (None, Pooling.MEAN, (4, True, HeadInput.TOKENS), Output.TOKEN_LOGITS),
}


@pytest.fixture(scope="module")
def built(minilm, minilm_path, tok, tmp_path_factory):
    """Per task: committed view and a function text -> reference output (float64)."""
    tmp = tmp_path_factory.mktemp("adapters")
    base = transformers.AutoModel.from_pretrained(minilm_path).eval()
    out = {}
    for seed, (name, (cfg, pooling, head, output)) in enumerate(TASKS.items()):
        model, adapter = base, None
        if cfg is not None:
            model = peft_model(minilm_path, cfg(), seed)
            adapter = str(tmp / name)
            model.save_pretrained(adapter)
        head_path, head_t = (None, None)
        if head is not None:
            head_path, head_t = random_head(tmp, name, head[0], minilm.info.hidden, head[1], seed)
        ext = build_extension(minilm.info.targets, adapter, head_path, pooling,
                              head[2] if head else HeadInput.POOLED)
        view = commit_extension(ext, minilm.info, name)
        nv = view.prompt_tokens

        def reference(text, model=model, pooling=pooling, head_t=head_t, output=output, nv=nv):
            h = hidden_of(model, tok, text)
            if output is Output.TOKENS:
                return h[nv:]
            if output is Output.TOKEN_LOGITS:
                return apply_head(head_t, h[nv:])
            p = pooled(h, pooling)
            return apply_head(head_t, p[None])[0] if output is Output.LOGITS else p

        out[name] = (view, output, reference, model)
    return out


def check(result, texts, lengths, reference, output):
    rows = 0
    for i, (text, n) in enumerate(zip(texts, lengths)):
        want = reference(text)
        if output in (Output.TOKENS, Output.TOKEN_LOGITS):
            got = result[rows:rows + n]
            rows += n
        else:
            got = result[i]
        err = (torch.from_numpy(np.asarray(got)).double() - want).abs().max().item()
        assert err < TOL, f"{text!r}: max error {err}"


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_alone_matches_peft(name, built, executor, tok):
    view, output, reference, _ = built[name]
    ids, lengths = encode(tok, TEXTS)
    (result,) = executor.run([WorkItem(view, output, ids, lengths)])
    check(result, TEXTS, lengths, reference, output)


def test_mixed_batch_of_eight_tasks_matches_peft(built, executor, tok):
    items, expect = [], []
    rng = np.random.default_rng(0)
    for k, (name, (view, output, reference, _)) in enumerate(built.items()):
        for rep in range(1 + k % 2):                      # some tasks send two requests
            texts = [TEXTS[j] for j in rng.permutation(len(TEXTS))[: 1 + (k + rep) % len(TEXTS)]]
            ids, lengths = encode(tok, texts)
            items.append(WorkItem(view, output, ids, lengths))
            expect.append((texts, lengths, reference, output))
    order = rng.permutation(len(items))                  # tasks interleaved in the request order
    results = executor.run([items[i] for i in order])
    for res, i in zip(results, order):
        check(res, *expect[i])


def test_adapters_actually_change_the_output(built, tok):
    """Guards the parity tests against vacuous adapters (e.g. LoRA B left at zero)."""
    base = built["plain"][3]
    for name in ("lora_qv_r8", "lora_all_r4", "lora_rs_r16", "ia3", "lora_r2_mlp"):
        diff = (hidden_of(built[name][3], tok, TEXTS[2]) - hidden_of(base, tok, TEXTS[2])).abs().max()
        assert diff > 1e-3, name


def test_tiny_roberta_with_lora_matches_peft(tiny_roberta, tmp_path):
    bb = load_backbone("tiny", tiny_roberta)
    ex = Executor(Encoder(bb.config, bb.weights))
    torch.manual_seed(3)
    model = peft.get_peft_model(transformers.AutoModel.from_pretrained(tiny_roberta),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                init_lora_weights=False)).eval()
    model.save_pretrained(str(tmp_path / "a"))
    view = commit_extension(build_extension(bb.info.targets, str(tmp_path / "a")), bb.info)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 1000, n).astype(np.int32) for n in (3, 17, 40, 64)]
    (result,) = ex.run([WorkItem(view, Output.TOKENS, np.concatenate(seqs), [len(s) for s in seqs])])
    row = 0
    for s in seqs:
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(s[None]).long()).last_hidden_state[0]
        assert np.abs(result[row:row + len(s)] - want.numpy()).max() < TOL
        row += len(s)
