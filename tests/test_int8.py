"""The decoder's int8 dtype: weight-only int8 matrices with per-channel scales (kernels.int8).

Kernel math against float references, the loader's region (int8 matrices, float32 scales, float32
norms), the forward against float32 on the same tiny Llama, a daemon serving an int8 backbone with
LoRA tasks (greedy tokens equal to the in-process int8 forward's), and the refusal of int8 for
families that do not quantize."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fmplexd.families import load_backbone
from fmplexd.families.decoder.forward import DecoderForward
from fmplexd.families.decoder.loader import SCALE_SUFFIX
from ipc.messages import Info
from kernels.int8 import int8_linear, int8_rows, quantize_per_channel
from testkit.decode import greedy_decode
from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_llama_lora


def test_quantize_per_channel_bounds_the_error_by_half_a_step():
    w = torch.randn(48, 96) * torch.linspace(0.01, 3.0, 48)[:, None]
    w[5] = 0.0                                          # an all-zero row keeps a finite scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert int(q.abs().max()) <= 127 and scale[5] == 1.0 and not q[5].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0],
                       torch.full((47,), 127, dtype=torch.int8))


def test_int8_linear_and_rows_equal_the_dequantized_matrix():
    torch.manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(40, 64))
    deq = q.double() * scale.double()[:, None]
    x = torch.randn(7, 64)
    y = int8_linear(x, q, scale)
    assert y.shape == (7, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ deq.t(), rtol=1e-5, atol=1e-5)
    xt = torch.randn(64, 7).t()                         # a non-contiguous input
    torch.testing.assert_close(int8_linear(xt, q, scale).double(), xt.double() @ deq.t(),
                               rtol=1e-5, atol=1e-5)
    ids = torch.tensor([3, 0, 39, 3])
    torch.testing.assert_close(int8_rows(ids, q, scale).double(), deq[ids], rtol=1e-6, atol=1e-7)


def test_the_int8_region_holds_int8_matrices_and_the_forward_tracks_float32(tiny_llama, tmp_path):
    f32 = load_backbone("f32", tiny_llama, "float32", str(tmp_path / "a"))
    i8 = load_backbone("i8", tiny_llama, "int8", str(tmp_path / "b"))
    assert i8.info.dtype == "int8" and i8.dtype == "int8"
    assert i8.manifest.size < f32.manifest.size / 3
    for key, t in f32.weights.items():
        if t.dim() == 2:
            assert i8.weights[key].dtype == torch.int8 and i8.weights[key].shape == t.shape
            assert i8.weights[key + SCALE_SUFFIX].shape == (t.shape[0],)
        else:
            assert i8.weights[key].dtype == torch.float32 and torch.equal(i8.weights[key], t)
    fw32, fw8 = DecoderForward(f32.config, f32.weights), DecoderForward(i8.config, i8.weights)
    assert fw8.int8 and fw8.dtype == torch.float32
    prompt = list(range(100, 130))
    ref, _ = greedy_decode(fw32, f32.config, prompt, 12)
    got, _ = greedy_decode(fw8, i8.config, prompt, 12, forced=ref)
    assert sum(a == b for a, b in zip(ref, got)) >= 10     # near-ties of a random model may differ
    forced_again, _ = greedy_decode(fw8, i8.config, prompt, 12, forced=ref)
    assert forced_again == got                               # deterministic


def test_int8_is_refused_for_a_family_that_does_not_quantize(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="int8.*decoder.*text-encoder|int8.*decoder"):
        load_backbone("b", tiny_bert, "int8", str(tmp_path))


def test_a_daemon_serves_int8_with_lora_tasks_as_the_in_process_forward_decodes(tiny_llama,
                                                                               tmp_path):
    specs = short_tmpdir("fmx-int8-")
    with open(os.path.join(tiny_llama, "config.json")) as f:
        cfg = json.load(f)
    lora = write_random_llama_lora(os.path.join(specs, "lora"), cfg, 8, seed=1, std_b=0.5)
    gen = 'pipeline = "text-generation"\nbackbone = "llama"\n'
    d = Daemon({"llama": tiny_llama}, config="kv_pool_mb = 4", dtypes={"llama": "int8"}).start()
    procs = [TaskProc(write_spec(specs, "base", gen), d.run_dir).start(),
             TaskProc(write_spec(specs, "tuned", gen + f'[extension]\nadapter = "{lora}"\n'),
                      d.run_dir).start()]
    try:
        with d.client() as c:
            assert [b.dtype for b in c.control(Info(ref=c.ref())).backbones] == ["int8"]
            base = c.generate("base", prompt="Hello there", max_tokens=10, ignore_eos=True)
            tuned = c.generate("tuned", prompt="Hello there", max_tokens=10, ignore_eos=True)
        i8 = load_backbone("i8", tiny_llama, "int8", str(tmp_path))
        fw = DecoderForward(i8.config, i8.weights)
        want, _ = greedy_decode(fw, i8.config, list(base_prompt_ids(tiny_llama)), 10)
        assert base.token_ids == want
        assert base.completion_tokens == tuned.completion_tokens == 10
        assert tuned.token_ids != base.token_ids                 # the adapter applies on int8
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


def base_prompt_ids(model_dir: str) -> list[int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return tok.encode("Hello there", add_special_tokens=False).ids
