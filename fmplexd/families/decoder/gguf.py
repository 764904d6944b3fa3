"""Read a llama-architecture GGUF file: hyperparameters, float tensors under Hugging Face Llama
names, and the tokenizer and chat template stored in its metadata.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized with `gguf.quants.dequantize`, which returns
float32 in numpy order (out_features, in_features). llama.cpp's converter interleaves each head's
rows of attn_q / attn_k for its adjacent-pair RoPE; Hugging Face's rotate_half wants the two halves
apart, so those are un-permuted (what transformers' GGUF loader does):
    w.reshape(n_head, head_dim // 2, 2, in).swapaxes(1, 2).reshape(w.shape)
with n_head = attention heads for attn_q and key/value heads for attn_k.
The tokenizer (GPT-2 style byte-level BPE, tokenizer.ggml.model "gpt2") is rebuilt with the
`tokenizers` library as transformers does: BPE over the stored vocabulary and merges, a ByteLevel
pre-tokenizer and decoder, control tokens (type 3) as special added tokens, no post-processor.
"""
from __future__ import annotations

import re

import numpy as np
import torch

_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
CONTROL, USER_DEFINED = 3, 4


def hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _BLOCK:
        raise ValueError(f"GGUF tensor {name!r} is not part of a llama model")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(path: str) -> dict:
    """The key/value metadata of a GGUF file (tensors are not read)."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf(path: str, progress=None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """-> (HF-style config dict, float32 tensors by HF name, metadata dict). `progress(text)`
    hears "dequantizing tensor i/n (p%)" as it goes."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(path)
    md = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    cfg = {
        "model_type": "llama",
        "vocab_size": int(md.get(f"{arch}.vocab_size", len(md["tokenizer.ggml.tokens"]))),
        "hidden_size": int(md[f"{arch}.embedding_length"]),
        "intermediate_size": int(md[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(md[f"{arch}.block_count"]),
        "num_attention_heads": int(md[f"{arch}.attention.head_count"]),
        "num_key_value_heads": int(md.get(f"{arch}.attention.head_count_kv",
                                          md[f"{arch}.attention.head_count"])),
        "rms_norm_eps": float(md[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(md[f"{arch}.context_length"]),
    }
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        if progress is not None:
            progress(f"dequantizing tensor {i + 1}/{total} ({100 * (i + 1) // total}%)")
        w = dequantize(t.data, t.tensor_type)
        if w.shape != tuple(int(x) for x in reversed(t.shape)):
            raise ValueError(f"{path}: tensor {t.name} dequantized to {w.shape}")
        if ".attn_q." in t.name:
            w = unpermute_qk(w, heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, kv_heads)
        tensors[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return cfg, tensors, md


def tokenizer_from_metadata(md: dict):
    """A `tokenizers.Tokenizer` equal to transformers' GGUF tokenizer (add_special_tokens=False)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {md.get('tokenizer.ggml.model')!r} is not supported "
                         "(byte-level BPE, 'gpt2')")
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                 use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
