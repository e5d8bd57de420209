"""Test helpers: tiny random Llama models and tokenizers written to disk the way the real tools
write them (a Hugging Face folder; a GGUF file with q/k permuted as llama.cpp's converter does),
and an independent numpy forward pass with Hugging Face semantics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rope_theta": 5000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_HF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_config(tied: bool, **overrides) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY}
    return {**cfg, "tie_word_embeddings": tied, **overrides}


def random_hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors ([out, in] matrices) for `cfg`; norms are not all ones."""
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {
        "input_layernorm": (d,),
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "post_attention_layernorm": (d,),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }

    def draw(shape):
        if len(shape) == 1:
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    tensors = {"model.embed_tokens.weight": draw((v, d)), "model.norm.weight": draw((d,))}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = draw(shape)
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = draw((v, d))
    return tensors


def write_hf(folder: Path, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 2) -> Path:
    """config.json plus the tensors split over `shards` safetensors files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row permutation of q/k (rotate-half -> adjacent pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(cfg: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The HF tensors renamed to GGUF names, q/k permuted, lm_head dropped when tied."""
    out = {
        "token_embd.weight": tensors["model.embed_tokens.weight"],
        "output_norm.weight": tensors["model.norm.weight"],
    }
    if "lm_head.weight" in tensors:
        out["output.weight"] = tensors["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in _HF_LAYER.items():
            w = tensors[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, cfg["num_attention_heads"])
            if gg == "attn_k":
                w = llama_cpp_permute(w, cfg["num_key_value_heads"])
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def write_gguf(
    path: Path,
    cfg: dict,
    tensors: dict[str, np.ndarray],
    arch: str = "llama",
    qtype: gguf.GGMLQuantizationType | None = None,
    tokenizer: dict | None = None,
) -> Path:
    """A GGUF file of GGUF-named `tensors`; matrices quantized to `qtype` if given."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for key, value in (tokenizer or {}).items():
        _add_tokenizer_field(w, key, value)
    for name, array in tensors.items():
        if qtype is not None and array.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer_field(w: gguf.GGUFWriter, key: str, value) -> None:
    adders = {
        "model": w.add_tokenizer_model,
        "pre": w.add_tokenizer_pre,
        "tokens": w.add_token_list,
        "token_type": w.add_token_types,
        "merges": w.add_token_merges,
        "add_bos_token": w.add_add_bos_token,
        "chat_template": w.add_chat_template,
    }
    adders[key](value)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta):
    """[T, H, hd] -> rotate-half RoPE, written from the HF definition."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = positions[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def reference_logits(cfg: dict, t: dict[str, np.ndarray], tokens) -> np.ndarray:
    """[T] -> [T, V] float64 logits of a causal forward pass, HF Llama semantics, no cache."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n, hq, hkv, hd = (
        cfg[k]
        for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    eps, tokens = cfg["rms_norm_eps"], np.asarray(tokens)
    pos = np.arange(len(tokens), dtype=np.float64)
    causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(n):
        p = lambda name, i=i: t[f"model.layers.{i}.{name}.weight"]
        h = _rms(x, p("input_layernorm"), eps)
        q = _rope((h @ p("self_attn.q_proj").T).reshape(-1, hq, hd), pos, cfg["rope_theta"])
        k = _rope((h @ p("self_attn.k_proj").T).reshape(-1, hkv, hd), pos, cfg["rope_theta"])
        v = (h @ p("self_attn.v_proj").T).reshape(-1, hkv, hd)
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("htu,uhd->thd", a, v).reshape(len(tokens), hq * hd)
        x = x + o @ p("self_attn.o_proj").T
        h = _rms(x, p("post_attention_layernorm"), eps)
        gate = h @ p("mlp.gate_proj").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    x = _rms(x, t["model.norm.weight"], eps)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return x @ head.T


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, written from its definition."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


# ASCII form of the GPT-2 split; digits were already isolated one by one.
_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def reference_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Plain BPE for ASCII text: pre-split, map bytes, apply the lowest-ranked merge until none."""
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    b2u = _byte_to_unicode()
    ids = []
    for chunk in re.split(r"(\d)", text):
        for piece in _SPLIT.findall(chunk):
            word = [b2u[b] for b in piece.encode()]
            while len(word) > 1:
                pairs = [
                    (ranks.get(p, 1 << 30), i)
                    for i, p in enumerate(zip(word[:-1], word[1:], strict=True))
                ]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
            ids += [vocab[w] for w in word]
    return ids
