"""The torch kernels of the batched forward against an fp64 reference over the grid of
tests/lora_grid.py (dtypes x ranks x adapter distributions x odd batch sizes)."""
import pytest
import torch

from kernels.heads import HeadSegment, segmented_head
from kernels.lora import gathered_lora, segmented_lora
from kernels.scaling import ScaleSegment, segmented_scale, segmented_scale_
from tests.lora_grid import CASES, DTYPES, assert_close, case_id, lora_problem, poisoned


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_segmented_lora_matches_reference(case):
    dtype, tol = DTYPES[case.dtype]
    p = lora_problem(case)
    got = segmented_lora(p.y0.to(dtype).clone(), p.x.to(dtype), p.segments(dtype))
    assert not torch.isnan(got).any()
    assert_close(got, p.want, tol)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gathered_lora_matches_segmented(case):
    dtype, tol = DTYPES[case.dtype]
    p = lora_problem(case, seed=1)
    r_max = max(r for r, *_ in p.ads)
    A = torch.randn(len(p.ads), r_max, case.fan_in, generator=p.gen)    # garbage padding: masked
    B = torch.randn(len(p.ads), case.fan_out, r_max, generator=p.gen)
    for a, (r, Aa, Ba, _) in enumerate(p.ads):
        A[a, :r], B[a, :, :r] = Aa, Ba
    adapter = torch.from_numpy(p.idx.copy())         # (from_numpy would share idx's memory)
    adapter[::5] = -1                                    # rows without an adapter stay unchanged
    keep = adapter >= 0
    want = p.y0.double().clone()
    want[keep] = p.want[keep]
    got = gathered_lora(p.y0.to(dtype).clone(), p.x.to(dtype), adapter, A.to(dtype), B.to(dtype),
                        torch.tensor([r for r, *_ in p.ads]),
                        torch.tensor([s for *_, s in p.ads], dtype=torch.float32))
    assert_close(got, want, tol)
    assert torch.equal(got[~keep], p.y0.to(dtype)[~keep])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mlp", [False, True])
def test_segmented_head_writes_every_row(dtype, mlp):
    tdt, tol = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(41, 32, generator=gen)
    bounds = [(0, 5), (5, 6), (6, 30), (30, 41)]
    segs, want = [], []
    for k, (s, e) in enumerate(bounds):
        labels = 2 + k
        w1, b1 = torch.randn(16 if mlp else labels, 32, generator=gen), torch.randn(16 if mlp else labels)
        w2, b2 = (torch.randn(labels, 16, generator=gen), torch.randn(labels)) if mlp else (None, None)
        segs.append(HeadSegment(s, e, w1.to(tdt), b1.to(tdt), None if w2 is None else w2.to(tdt),
                                None if b2 is None else b2.to(tdt)))
        h = x[s:e].double() @ w1.double().T + b1.double()
        want.append(torch.relu(h) @ w2.double().T + b2.double() if mlp else h)
    for got, ref in zip(segmented_head(x.to(tdt), segs), want):
        assert got.shape == ref.shape and not torch.isnan(got).any()
        assert_close(got, ref, tol * 10)


def test_segmented_scale_touches_only_its_segments():
    x = torch.randn(20, 8)
    v = torch.rand(8) + 0.5
    segs = [ScaleSegment(3, 9, v)]
    out = segmented_scale(x, segs)
    assert torch.equal(out[:3], x[:3]) and torch.equal(out[9:], x[9:])
    assert torch.allclose(out[3:9], x[3:9] * v)
    assert segmented_scale(x, []) is x                   # no segment: no copy
    y = x.clone()
    assert segmented_scale_(y, segs) is y and torch.equal(y, out)


def test_poisoned_output_is_detected_by_the_harness():
    """The grid's poison works: an output left unwritten stays NaN."""
    out = poisoned((4, 3), torch.float32)
    out[:2] = 0
    assert torch.isnan(out[2:]).all() and not torch.isnan(out[:2]).any()
