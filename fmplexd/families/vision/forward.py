"""The vision family's forward (DINOv2, ViT) over a packed multi-task batch of images.

Short and flat on purpose: embed each image -> pack every image's rows back to back -> layers ->
final layer norm. Shapes: an image of H x W pixels with patch P has S = 1 + (H/P)(W/P) rows (CLS
first); T = the rows of all images of the batch; D = hidden.

    embed:   x = [cls ; conv_P(pixels) flattened] + positions         (n, S, D)
             positions: the table as is when the image's patch grid is the table's, else the table's
             patch grid resized to (H/P, W/P) by bicubic interpolation (align_corners False, no
             antialias), the CLS position kept: transformers' Dinov2Embeddings
    layer:   x = x + ls1 * o_proj(attention(q, k, v of LN1(x)))      attention within each image
             x = x + ls2 * fc2(gelu(fc1(LN2(x))))                    (ls = 1 without layer scale)
    output:  LN(x)                                                    (T, D)
Every linear layer carries the batch's extensions (fmplexd.families.extensions), each on its task's rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fmplexd.families.extensions import ModuleExt, extended_linear
from fmplexd.families.vision.loader import TARGETS, VisionConfig
from kernels.attention import VarlenPlan, varlen_attention


@dataclass(slots=True)
class PackedImages:
    """x: (T, D) embedded rows of every image, back to back; plan: attention within each image;
    ext[(layer, target)]: the batch's extensions of that linear layer (absent = none)."""
    x: torch.Tensor
    plan: VarlenPlan
    ext: dict[tuple[int, str], ModuleExt] = field(default_factory=dict)


class VisionTransformer:
    """Runs the forward on weights it does not own (read-only views of the backbone region)."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = weights
        self.dtype = weights["layernorm.weight"].dtype

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1 + gh * gw, D) position embeddings of a gh x gw patch grid."""
        table = self.w["embeddings.position_embeddings"]
        g = self.cfg.grid
        if gh == g and gw == g:
            return table
        d = table.shape[-1]
        grid = table[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, d)
        return torch.cat((table[:, :1], grid), dim=1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) pixels -> (n, S, D) rows, CLS first."""
        w, p = self.w, self.cfg.patch
        x = F.conv2d(pixels.to(self.dtype), w["embeddings.patch_embeddings.projection.weight"],
                     w["embeddings.patch_embeddings.projection.bias"], stride=p)     # (n, D, gh, gw)
        n, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                                              # (n, gh*gw, D)
        cls = w["embeddings.cls_token"].expand(n, -1, -1)
        return torch.cat((cls, x), dim=1) + self.positions(gh, gw)

    def linear(self, x: torch.Tensor, layer: int, target: str, batch: PackedImages,
               owned: bool = False) -> torch.Tensor:
        name = f"layer.{layer}.{TARGETS[target]}"
        return extended_linear(x, self.w[name + ".weight"], self.w[name + ".bias"],
                               batch.ext.get((layer, target)), owned)

    def layer(self, i: int, x: torch.Tensor, batch: PackedImages) -> torch.Tensor:
        w, cfg = self.w, self.cfg
        p = f"layer.{i}."
        h = F.layer_norm(x, (cfg.hidden,), w[p + "norm1.weight"], w[p + "norm1.bias"], cfg.eps)
        q = self.linear(h, i, "query", batch)                                         # (T, D)
        k = self.linear(h, i, "key", batch)
        v = self.linear(h, i, "value", batch)
        a = self.linear(varlen_attention(q, k, v, batch.plan, cfg.heads), i, "attn_out", batch,
                        owned=True)
        x = x + (a * w[p + "layer_scale1"] if cfg.layer_scale else a)
        h = F.layer_norm(x, (cfg.hidden,), w[p + "norm2.weight"], w[p + "norm2.bias"], cfg.eps)
        m = self.linear(F.gelu(self.linear(h, i, "ffn_in", batch)), i, "ffn_out", batch,
                        owned=True)                                                   # (T, D)
        return x + (m * w[p + "layer_scale2"] if cfg.layer_scale else m)

    def forward(self, batch: PackedImages) -> torch.Tensor:
        """(T, D) final hidden states of every row."""
        x = batch.x
        for i in range(self.cfg.layers):
            x = self.layer(i, x, batch)
        return F.layer_norm(x, (self.cfg.hidden,), self.w["layernorm.weight"],
                            self.w["layernorm.bias"], self.cfg.eps)
