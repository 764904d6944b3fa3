"""The torch kernels of the batched forward against an fp64 reference over the grid of
tests/lora_grid.py (dtypes x ranks x adapter distributions x odd batch sizes)."""
import numpy as np
import pytest
import torch

from kernels.heads import HeadSegment, segmented_head
from kernels.lora import gathered_lora, lora_loop_reference, segmented_lora
from kernels.scaling import ScaleSegment, segmented_scale, segmented_scale_
from tests.lora_grid import CASES, DTYPES, adapters, assign, poisoned, segments


def ids(case):
    return f"{case.dtype}-r{case.rank}-{case.distribution}-n{case.rows}"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_segmented_lora_matches_reference(case):
    dtype, tol = DTYPES[case.dtype]
    rng, gen = np.random.default_rng(case.rank), torch.Generator().manual_seed(case.rows)
    idx = assign(case, rng)
    ads = adapters(case, int(idx.max()) + 1, gen)
    x = torch.randn(case.rows, case.fan_in, generator=gen)
    y0 = torch.randn(case.rows, case.fan_out, generator=gen)
    segs = segments(idx, ads, dtype)
    want = lora_loop_reference(y0.double(), x.double(), segments(idx, ads, torch.float64))
    got = segmented_lora(y0.to(dtype).clone(), x.to(dtype), segs)
    assert not torch.isnan(got).any()
    assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_gathered_lora_matches_segmented(case):
    dtype, tol = DTYPES[case.dtype]
    rng, gen = np.random.default_rng(case.rank + 1), torch.Generator().manual_seed(case.rows + 1)
    idx = assign(case, rng)
    ads = adapters(case, int(idx.max()) + 1, gen)
    r_max = max(r for r, *_ in ads)
    A = torch.randn(len(ads), r_max, case.fan_in, generator=gen)    # garbage padding: masked
    B = torch.randn(len(ads), case.fan_out, r_max, generator=gen)
    for a, (r, Aa, Ba, _) in enumerate(ads):
        A[a, :r], B[a, :, :r] = Aa, Ba
    x = torch.randn(case.rows, case.fan_in, generator=gen)
    y0 = torch.randn(case.rows, case.fan_out, generator=gen)
    adapter = torch.from_numpy(idx.copy())           # (from_numpy would share idx's memory)
    adapter[::5] = -1                                    # rows without an adapter stay unchanged
    want = y0.double().clone()
    keep = adapter >= 0
    want[keep] = lora_loop_reference(
        y0.double(), x.double(), segments(idx, ads, torch.float64))[keep]
    got = gathered_lora(y0.to(dtype).clone(), x.to(dtype), adapter, A.to(dtype), B.to(dtype),
                        torch.tensor([r for r, *_ in ads]),
                        torch.tensor([s for *_, s in ads], dtype=torch.float32))
    assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max().item())
    assert torch.equal(got[~keep], y0.to(dtype)[~keep])


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
        assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item()) * 10


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
