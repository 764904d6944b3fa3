"""CUDA kernels (kernels/cuda/multi_lora.cu): they compile (nvcc, where installed, even without a
GPU), and on a GPU they match the fp64 reference over the grid of tests/lora_grid.py with
poisoned outputs. Without a GPU (or CuPy) the numerical tests skip."""
import os
import shutil
import subprocess

import pytest
import torch

from tests.lora_grid import CASES, DTYPES, assert_close, case_id, lora_problem

SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels", "cuda",
                      "multi_lora.cu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-std=c++17", "-Xptxas", "-v", SOURCE,
                          "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for kernel in ("sgmv_shrink", "sgmv_expand", "segmented_head"):
        for suffix in ("f32", "f16", "bf16"):
            assert f"'{kernel}_{suffix}'" in out.stderr
    spills = [line for line in out.stderr.splitlines() if "spill stores" in line]
    assert len(spills) == 9 and all(" 0 bytes spill stores" in line for line in spills)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_segmented_lora_cuda_matches_reference(case):
    pytest.importorskip("cupy")
    from kernels.cuda_lora import segmented_lora_cuda
    dtype, tol = DTYPES[case.dtype]
    p = lora_problem(case)
    segs = [type(s)(s.start, s.end, s.A.cuda().contiguous(), s.B.cuda().contiguous(), s.scale)
            for s in p.segments(dtype)]
    got = segmented_lora_cuda(p.y0.to(dtype).cuda(), p.x.to(dtype).cuda(), segs).cpu()
    assert not torch.isnan(got).any()
    assert_close(got, p.want, tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mlp", [False, True])
def test_segmented_head_cuda_matches_torch(dtype, mlp):
    pytest.importorskip("cupy")
    from kernels.cuda_lora import segmented_head_cuda
    from kernels.heads import HeadSegment, segmented_head
    tdt, tol = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(41, 32, generator=gen).to(tdt)
    segs = []
    for k, (s, e) in enumerate([(0, 5), (5, 6), (6, 30), (30, 41)]):
        w1 = torch.randn(16 if mlp else 2 + k, 32, generator=gen).to(tdt)
        b1 = torch.randn(w1.shape[0], generator=gen).to(tdt)
        w2 = torch.randn(2 + k, 16, generator=gen).to(tdt) if mlp else None
        b2 = torch.randn(2 + k, generator=gen).to(tdt) if mlp else None
        segs.append(HeadSegment(s, e, w1, b1, w2, b2, "gelu"))
    want = segmented_head(x.float(), [HeadSegment(s.start, s.end, s.w1.float(), s.b1.float(),
                                                  None if s.w2 is None else s.w2.float(),
                                                  None if s.b2 is None else s.b2.float(), "gelu")
                                      for s in segs])
    cuda_segs = [HeadSegment(s.start, s.end, s.w1.cuda(), s.b1.cuda(),
                             None if s.w2 is None else s.w2.cuda(),
                             None if s.b2 is None else s.b2.cuda(), "gelu") for s in segs]
    for got, ref in zip(segmented_head_cuda(x.cuda(), cuda_segs), want):
        got = got.float().cpu()
        assert got.shape == ref.shape and not torch.isnan(got).any()
        assert_close(got, ref, 10 * tol)
