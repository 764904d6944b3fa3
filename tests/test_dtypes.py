"""Backbone dtypes other than float32 (config `dtype`): weights and slots are stored in that dtype
(bfloat16 as raw bits, converted with rounding), and the forward stays close to the fp32 one."""
import numpy as np
import pytest
import torch

from fmplexd.families import load_backbone
from fmplexd.families.encoder.forward import Encoder
from fmplexd.families.encoder.executor import Executor, WorkItem
from ipc.messages import Output, Pooling
from ipc.shm import to_bfloat16_bits
from tasklets.adapters import build_extension
from testkit.extensions import commit_extension
from testkit.tiny import write_random_lora as write_lora

TOL = {"float16": 5e-3, "bfloat16": 5e-2}      # relative to the output's scale


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(0).normal(0, 3, 10_000).astype(np.float32)
    x[:4] = [0.0, -0.0, np.inf, -np.inf]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bfloat16_bits(x), want)
    assert to_bfloat16_bits(np.array([np.nan], np.float32))[0] & 0x7F80 == 0x7F80


def run(path, dtype, ext_dir, ids, lengths, output):
    bb = load_backbone("t", path, dtype)
    ex = Executor(Encoder(bb.config, bb.weights))
    view = commit_extension(build_extension(bb.info.targets, ext_dir, pooling=Pooling.MEAN), bb.info)
    assert view.lora[0][2].dtype == {"float32": torch.float32, "float16": torch.float16,
                                     "bfloat16": torch.bfloat16}[dtype]
    return ex.run([WorkItem(view, output, ids, lengths)])[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("output", [Output.POOLED, Output.TOKENS])
def test_low_precision_forward_with_lora_is_close_to_fp32(tiny_bert, tmp_path, dtype, output):
    lora = write_lora(str(tmp_path / "a"), 4, [0, 1], 32, seed=1, std=0.2)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, 2000, n).astype(np.int32) for n in (5, 17, 40)]
    ids, lengths = np.concatenate(seqs), [len(s) for s in seqs]
    ref = run(tiny_bert, "float32", lora, ids, lengths, output)
    got = run(tiny_bert, dtype, lora, ids, lengths, output)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL[dtype] * np.abs(ref).max()
