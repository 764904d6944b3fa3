"""Fracast-0's forward over a batch of series of many tasks, each task's series with its own
extensions (LoRA / IA3 on the targets of loader.py, through fmplexd.families.extensions).

Shapes: B series, W window (context), D width, H horizon, Q quantiles, K periods. Inputs are
normalised values v (B, W) (0 where unobserved) and the observed mask m (B, W), the series right-
aligned in the window (left padding unobserved). Every step matches the release's own modules
(fracast._core); RMSNorm is F.rms_norm with eps = float32's machine epsilon.

    periods  p (B, K): the K strongest local maxima of the normalised periodogram of v (unobserved
             steps filled with the series' mean; rfft of length 2^ceil(log2 W)) inside the band
             [min_period, W/2] that exceed ln(bins / alpha) / bins, as round(n_fft / k); 0 = none
    core     x = in([v, m, rec(t)]) + periodic([sin, cos](2 pi t / p_k))              (B, W, D)
             rec(t) = (d, sign(d) log2(1 + |d|), e^{-|d|/2}, e^{-2|d|}, e^{-8|d|}), d = (t - W + 1)/W
             stage s = 0 .. S-1 at dilation r = base^s, all with ONE shared block:
                 [g, b] = film([sin, cos](pi log2(r) / 2^k), k = 0..3);  x = block(x (1 + g) + b, r)
             block(x, r) = n2(y + swiglu(y)),  y = n1(x + pw(dwconv_r(x)))     dwconv: causal,
             depthwise, kernel 3, dilation r;  swiglu(x) = down(silu(u1) * u2), [u1, u2] = up(x)
             h = norm(x)                                                                (B, W, D)
    head     x = summary([rec(W .. W+H-1), mean_t h, h[:, -1]]) + queries                (B, H, D)
             x = n(x + swiglu(x));  x = fc blocks (causal depthwise along the horizon, dilations
             1, 2, .. each followed by + residual and RMSNorm)
             fill (B, H): mean of v over the observed steps in the same phase bin (phase_bins per
             primary period p_1) as each future step (the series mean where a bin is empty)
             z = [h[:, -seed:] ; future_in([fill, rec(future)])]                   (B, seed+H, D)
             z = future block applied at dilations base^0 .. base^(layers-1)
             q = out(x + future_out(z[:, -H:]))                                        (B, H, Q)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmplexd.families.extensions import ModuleExt, extended_linear
from fmplexd.families.timeseries.loader import FracastConfig, target_paths

Ext = dict[tuple[int, str], ModuleExt]


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps=None)


def recency(pos: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T) step indices -> (B, T, 5) recency features relative to a window of L steps."""
    d = (pos.float() - float(L - 1)) / float(L)
    a = d.abs()
    return torch.stack([d, torch.sign(d) * torch.log1p(a) / math.log(2.0),
                        torch.exp(-0.5 * a), torch.exp(-2.0 * a), torch.exp(-8.0 * a)], -1)


def fill_with_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(v) & m
    mean = torch.where(ok, v, 0.0).sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    return torch.where(ok, v, mean)


def periods(x: torch.Tensor, c: FracastConfig) -> torch.Tensor:
    """(B, L) filled series -> (B, K) integer periods, 0 where fewer peaks are significant."""
    L = x.shape[1]
    max_period = max(2, L // 2)
    n_fft = 1 << int(math.ceil(math.log2(max(2, L))))
    X = torch.fft.rfft(x - x.mean(1, keepdim=True), n=n_fft)
    p = (X * X.conj()).real[:, 1:]
    bins = p.shape[1]
    power = p / p.sum(1, keepdim=True).clamp(min=1e-12)
    lo = max(0, n_fft // max_period - 1)
    hi = min(bins - 1, max(0, n_fft // max(2, c.min_period) - 1))
    peak = F.pad((power[:, 1:-1] > power[:, :-2]) & (power[:, 1:-1] > power[:, 2:]), (1, 1),
                 value=False)
    band = torch.zeros(bins, dtype=torch.bool)
    band[lo:hi + 1] = hi > lo
    threshold = math.log(max(2, bins) / c.alpha) / max(2, bins)
    score = torch.where(peak & band & (power >= threshold), power, float("-inf"))
    top, k = score.topk(min(c.topk, bins), dim=1)
    per = torch.round(n_fft / (k + 1).clamp(min=1).float()).long()
    return torch.where(torch.isfinite(top), per, 0)


class Fracast:
    """Runs the forward on weights it does not own (read-only views of the backbone region)."""

    def __init__(self, cfg: FracastConfig, weights: dict[str, torch.Tensor]):
        self.cfg, self.w = cfg, weights
        self.paths = target_paths(cfg)

    def lin(self, x: torch.Tensor, target: str, ext: Ext) -> torch.Tensor:
        """A targeted linear layer on (B, ..., in) with each task's extension on its series."""
        path = self.paths[target]
        w, b = self.w[path + ".weight"], self.w[path + ".bias"]
        e = ext.get((0, target))
        if e is None:
            return F.linear(x, w, b)
        rows = x[0].numel() // x.shape[-1]                  # rows per series
        y = extended_linear(x.reshape(-1, x.shape[-1]), w, b, e.scaled(rows))
        return y.view(*x.shape[:-1], -1)

    def swiglu(self, x: torch.Tensor, prefix: str, ext: Ext) -> torch.Tensor:
        g, v = self.lin(x, prefix + "_up", ext).chunk(2, -1)
        return self.lin(F.silu(g) * v, prefix + "_down", ext)

    def block(self, x: torch.Tensor, r: int, prefix: str, ext: Ext) -> torch.Tensor:
        """The shared dilated block (`prefix` core or future) at dilation r; x (B, T, D)."""
        p = self.paths[prefix + "_pw"].rsplit(".", 1)[0] + "."
        y = F.conv1d(F.pad(x.transpose(1, 2), (2 * r, 0)), self.w[p + "dw_weight"],
                     self.w[p + "dw_bias"], dilation=r, groups=x.shape[-1])
        x = rms(x + self.lin(y.transpose(1, 2), prefix + "_pw", ext), self.w[p + "norm1.weight"])
        return rms(x + self.swiglu(x, prefix, ext), self.w[p + "norm2.weight"])

    def film(self, x: torch.Tensor, r: int, ext: Ext) -> torch.Tensor:
        k = torch.arange(4, dtype=torch.float32)
        angle = math.log2(float(r)) / torch.pow(2.0, k) * math.pi
        feat = torch.cat([torch.sin(angle), torch.cos(angle)])                # (8,)
        if (0, "core_film") in ext:                                           # per series
            feat = feat.expand(x.shape[0], -1)
        gamma, beta = self.lin(feat, "core_film", ext).chunk(2, -1)           # (B|1, D) each
        if gamma.dim() == 2:
            gamma, beta = gamma[:, None], beta[:, None]
        return x * (1.0 + gamma) + beta

    def core(self, v: torch.Tensor, m: torch.Tensor, per: torch.Tensor, ext: Ext) -> torch.Tensor:
        """(B, W) values and mask, (B, K) periods -> h (B, W, D)."""
        c = self.cfg
        B, L = v.shape
        pos = torch.arange(L).unsqueeze(0).expand(B, -1)
        x = self.lin(torch.cat([v[..., None], m.float()[..., None], recency(pos, L)], -1),
                     "core_in", ext)
        phase = 2.0 * math.pi * pos[..., None].float() / per.clamp(min=1)[:, None, :].float()
        ok = (per > 0)[:, None, :].float()
        pe = torch.stack([torch.sin(phase) * ok, torch.cos(phase) * ok], -1).reshape(B, L, -1)
        x = x + self.lin(pe, "core_periodic", ext)
        for s in range(c.stages):
            r = c.dilation_base ** s
            x = self.block(self.film(x, r, ext), r, "core", ext)
        return rms(x, self.w["core.norm.weight"])

    def fill(self, v: torch.Tensor, m: torch.Tensor, per: torch.Tensor, pos: torch.Tensor):
        """(B, H) seasonal fill of the future steps `pos` (B, H)."""
        B, L = v.shape
        bins = self.cfg.phase_bins
        w = m.float()
        vals = torch.where(m, v, 0.0)
        p = per[:, :1].clamp(min=1).float()
        t = torch.arange(L).view(1, L).float()
        idx = torch.clamp(((t % p) / p * bins).long(), max=bins - 1)
        onehot = F.one_hot(idx, bins).float() * w[..., None]
        count = onehot.sum(1)
        total = torch.bmm(onehot.transpose(1, 2), vals[..., None])[..., 0]
        mean = vals.sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1.0)
        phase_mean = torch.where(count > 0, total / count.clamp(min=1.0), mean.expand(B, bins))
        future = torch.clamp((pos.float() % p) / p * bins, max=bins - 1).long()
        return torch.gather(phase_mean, 1, future)

    def head(self, h: torch.Tensor, v: torch.Tensor, m: torch.Tensor, per: torch.Tensor,
             ext: Ext) -> torch.Tensor:
        """h (B, W, D) -> quantiles (B, H, Q) in normalised units."""
        c, w = self.cfg, self.w
        B, L, D = h.shape
        pos = torch.arange(L, L + c.horizon).unsqueeze(0).expand(B, -1)
        pe = recency(pos, L)
        summary = torch.cat([h.mean(1), h[:, -1]], -1)[:, None].expand(B, c.horizon, 2 * D)
        x = self.lin(torch.cat([pe, summary], -1), "head_summary", ext) + w["head.queries"]
        x = rms(x + self.swiglu(x, "head", ext), w["head.decoder_norms.0.weight"])
        for k in range(c.fc_layers):
            p, r = f"head.fc_blocks.{k}.", 2 ** k
            y = F.conv1d(F.pad(x.transpose(1, 2), (2 * r, 0)), w[p + "dw_weight"],
                         w[p + "dw_bias"], dilation=r, groups=D).transpose(1, 2)
            x = rms(x + y, w[p + "norm.weight"])
        fill = self.fill(v, m, per, pos)
        z = torch.cat([h[:, -c.future_seed:],
                       self.lin(torch.cat([fill[..., None], pe], -1), "future_in", ext)], 1)
        for s in range(c.future_layers):
            z = self.block(z, c.dilation_base ** s, "future", ext)
        x = x + self.lin(z[:, -c.horizon:], "future_out", ext)
        return self.lin(x, "out", ext)

    def forward(self, v: torch.Tensor, m: torch.Tensor, ext: Ext, forecast: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h (B, W, D), quantiles (B, H, Q) or None when `forecast` is false)."""
        per = periods(fill_with_mean(v, m), self.cfg)        # shared by the core and the head
        h = self.core(v, m, per, ext)
        return h, (self.head(h, v, m, per, ext) if forecast else None)
