"""The target LLM: a Llama-architecture decoder as pure functions over a params pytree.

Each decoder block is written for one sequence (`decoder_layer`: `[T, D]` against one row's
cache slots) and vmapped over the batch, so every matmul still runs as one `[B*T, D] x [D, F]`
product.
Layers are stacked on a leading `N` axis and run with `lax.scan`, so compile time does not grow
with depth.

The forward pass never writes the cache: the new tokens' keys/values come back in `ForwardOut`
and `commit` writes the ones the caller keeps. Attention runs over `S` cache slots plus the `T`
new tokens under an arbitrary boolean mask `[T, S + T]` and per-token positions, which is what
lets the verifier score a packed prefix tree of drafts in one pass. Prompts are right-padded.

RoPE uses the Hugging Face "rotate-half" layout (the two halves of each head are the real and
imaginary parts); the GGUF loader un-permutes q/k into it.

Weights may be fp32 or bf16. Activations are never rounded to bf16: a bf16 weight multiplies the
fp32 activations split into two bf16 parts (`_split`), accumulating in fp32, so every product keeps
about fp32 accuracy. The residual stream, norms, softmax, logits and (by default) the KV cache stay
fp32. Rounding the activations instead lets the last-bit differences between two shapes of the same
computation (a one-token AR step, a many-node verify step) grow until an argmax flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pipeline import kernels

F32 = jnp.float32
# Finite, so a query whose every column is masked gets a uniform (not NaN) distribution.
MASKED = -1e30


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and constants of a Llama-architecture model (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_seq_len: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        # Loaders pass lists from JSON/GGUF metadata; keep the config hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.num_heads // self.num_kv_heads


class KVCache(NamedTuple):
    """Keys/values of every layer and per-row filled lengths `[B]` int32.

    Head-major layout, keys transposed: `k` is `[N, B, Hkv, hd, S]` and `v` `[N, B, Hkv, S, hd]`,
    either as stacked arrays (the storage form `init_cache` makes) or as tuples of N per-layer
    arrays (`unstack_cache`, for decode loops); both index as `k[n]`. A decode step's attention is
    then, per row and head, `q [G, hd] @ k [hd, S]` and `p [G, S] @ v [S, hd]`: plain matmuls over
    contiguous blocks. On the slot-major `[B, S, Hkv, hd]` layout XLA's (CPU) batched dots ran
    far below memory bandwidth: at batch 64 with 224 slots one layer's attention took 6-10 ms
    against 1.5-2 ms now (jax 0.10). Slots `>= lengths[b]` hold garbage and are always masked out.
    `slot_major()` / `from_slot_major` convert from / to the `[N, B, S, Hkv, hd]` view that
    `ForwardOut.new_k` uses (for tests and inspection).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def num_slots(self) -> int:
        """S, the slots per row."""
        return self.v[0].shape[-2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def slot_major(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as stacked `[N, B, S, Hkv, hd]` arrays."""
        k, v = _stacked(self.k), _stacked(self.v)
        return jnp.transpose(k, (0, 1, 4, 2, 3)), jnp.swapaxes(v, 2, 3)

    @classmethod
    def from_slot_major(cls, k, v, lengths) -> KVCache:
        """A stacked cache from `[N, B, S, Hkv, hd]` keys and values."""
        k, v = jnp.asarray(k), jnp.asarray(v)
        return cls(jnp.transpose(k, (0, 1, 3, 4, 2)), jnp.swapaxes(v, 2, 3), jnp.asarray(lengths))


class ForwardOut(NamedTuple):
    """logits `[B, T, V]` fp32, hidden `[B, T, D]` (after the final norm), new_k/new_v
    `[N, B, T, Hkv, hd]` (the new tokens' keys/values, RoPE applied, not yet in the cache)."""

    logits: jax.Array
    hidden: jax.Array
    new_k: jax.Array
    new_v: jax.Array


def init_params(config: LlamaConfig, key, dtype=jnp.float32) -> dict:
    """A random model of `config`'s shape (scaled normal weights, unit norms)."""
    n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    keys = iter(jax.random.split(key, 10))

    def dense(shape):
        w = jax.random.normal(next(keys), shape, jnp.float32) / jnp.sqrt(shape[-2])
        return w.astype(dtype)

    params = {
        "embed": (jax.random.normal(next(keys), (config.vocab_size, d)) * 0.5).astype(dtype),
        "final_norm": jnp.ones((d,), dtype),
        "layers": {
            "attn_norm": jnp.ones((n, d), dtype),
            "wq": dense((n, d, q_dim)),
            "wk": dense((n, d, kv_dim)),
            "wv": dense((n, d, kv_dim)),
            "wo": dense((n, q_dim, d)),
            "mlp_norm": jnp.ones((n, d), dtype),
            "w_gate": dense((n, d, f)),
            "w_up": dense((n, d, f)),
            "w_down": dense((n, f, d)),
        },
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = dense((d, config.vocab_size)).T
    return params


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `max_len` slots per row."""
    n, h, hd = config.num_layers, config.num_kv_heads, config.head_dim
    k = jnp.zeros((n, batch, h, hd, max_len), dtype)
    v = jnp.zeros((n, batch, h, max_len, hd), dtype)
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


def unstack_cache(cache: KVCache) -> KVCache:
    """The same cache with per-layer arrays (a no-op if it already has them).

    A decode step reads every layer's keys/values. Sliced out of one stacked loop carry, each
    layer's block is copied before XLA's (CPU) attention ops read it, on every step: at batch 32
    with 224 slots the copies took 66 ms of a 392 ms profiled step (jax 0.10). Per-layer arrays
    are read and updated in place. Call it once before a decode loop, like `unstack_layers`.
    """
    if isinstance(cache.k, (tuple, list)):
        return cache
    split = lambda buf: tuple(buf[n] for n in range(buf.shape[0]))
    return KVCache(split(cache.k), split(cache.v), cache.lengths)


def _stacked(buf):
    return jnp.stack(buf) if isinstance(buf, (tuple, list)) else buf


def rms_norm(x, weight, eps: float):
    """[..., D], [D] -> [..., D] fp32."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * weight.astype(jnp.float32)


def rope_tables(positions, head_dim: int, theta: float):
    """[T] int -> cos, sin [T, hd] for the rotate-half layout."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """[T, H, hd], [T, hd], [T, hd] -> [T, H, hd]: rotate pairs (i, i + hd/2) by the angle."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _split(x, dtype):
    """[..., I] -> [..., P, I] in `dtype`, parts that sum to `x` (fp32): P = 1 for fp32; for a
    narrower dtype a high and a low part, together exact to about 16 significant bits, so a
    product with a `dtype` weight (exact products, fp32 sums) keeps about fp32 accuracy."""
    x = x.astype(F32)
    if dtype == F32:
        return x[..., None, :]
    hi = x.astype(dtype)
    lo = (x - hi.astype(F32)).astype(dtype)
    return jnp.stack([hi, lo], axis=-2)


def _dense(x, w):
    """[..., I] fp32, [I, O] -> [..., O] fp32: the activations `_split` to the weight's dtype,
    fp32 accumulation; a `kernels.PackedWeight` goes through `kernels.matmul` (the small-M CPU
    kernel for few rows), and so does a `kernels.QuantWeight` (GGUF blocks, any rows)."""
    if isinstance(w, (kernels.PackedWeight, kernels.QuantWeight)):
        return kernels.matmul(x, w)
    return jnp.dot(_split(x, w.dtype), w, preferred_element_type=F32).sum(axis=-2)


def _batch_dot(a, b):
    """[H, M, K] fp32, [H, K, N] -> [H, M, N] fp32: `a` `_split` to `b`'s dtype."""
    h, m, k = a.shape
    parts = _split(a, b.dtype)  # [H, M, P, K]
    p = parts.shape[-2]
    dims = (((2,), (1,)), ((0,), (0,)))
    out = jax.lax.dot_general(parts.reshape(h, m * p, k), b, dims, preferred_element_type=F32)
    return out.reshape(h, m, p, -1).sum(axis=2)


def attention(q, k, v, cache_k, cache_v, mask, use_kernel: bool = False):
    """[T, Hq, hd], [T, Hkv, hd] x2, cache [Hkv, hd, S] / [Hkv, S, hd], [T, S+T] bool -> [T, Hq*hd].

    fp32 out. Scores against the cache and against the new tokens are computed separately and
    only the (small) score matrices are concatenated: the cache and the new keys are never
    concatenated. Query head `h` uses key/value head `h // G`; the cache is in `KVCache`'s
    head-major layout.

    `use_kernel`: through `kernels.kernel_attention` where it applies (a few new tokens, fp32;
    the packed-weight forward passes it), one fused call per layer in place of a dozen small
    XLA ops.
    """
    t, hq, hd = q.shape
    hkv, s = k.shape[1], cache_v.shape[1]
    g = hq // hkv
    if use_kernel and kernels.attention_applies(q, cache_k):
        return kernels.kernel_attention(q * hd**-0.5, k, v, cache_k, cache_v, mask)
    # Query rows grouped per key/value head: [Hkv, T*G, hd] against [Hkv, hd, S] is one batched
    # matmul per head, with the cache as the right operand in its stored layout.
    qh = jnp.swapaxes((q * hd**-0.5).reshape(t, hkv, g, hd), 0, 1).reshape(hkv, t * g, hd)
    cache_scores = _batch_dot(qh, cache_k)  # [Hkv, T*G, S]
    new_scores = jnp.einsum("kmd,ukd->kmu", qh, k, preferred_element_type=F32)
    scores = jnp.concatenate([cache_scores, new_scores], axis=-1).reshape(hkv, t, g, s + t)
    probs = jax.nn.softmax(jnp.where(mask[None, :, None, :], scores, MASKED), axis=-1)
    probs = probs.reshape(hkv, t * g, s + t)
    out = _batch_dot(probs[..., :s], cache_v)  # [Hkv, T*G, hd]
    out = out + jnp.einsum("kmu,ukd->kmd", probs[..., s:], v, preferred_element_type=F32)
    out = jnp.swapaxes(out.reshape(hkv, t, g, hd), 0, 1)
    return out.reshape(t, hq * hd)


def decoder_layer(config: LlamaConfig, layer: dict, x, cache_k, cache_v, cos, sin, mask):
    """One block for one sequence: [T, D] fp32 -> [T, D], new k, v [T, Hkv, hd] (cache dtype)."""
    t = x.shape[0]
    hd, eps = config.head_dim, config.rms_norm_eps
    h = rms_norm(x, layer["attn_norm"], eps)
    if "wqkv" in layer:  # `with_packed_weights`: one product for q, k and v
        nq, nk = config.num_heads * hd, config.num_kv_heads * hd
        qkv = _dense(h, layer["wqkv"])
        q, k, v = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
    else:
        q, k, v = (_dense(h, layer[name]) for name in ("wq", "wk", "wv"))
    q = apply_rope(q.reshape(t, config.num_heads, hd), cos, sin)
    k = apply_rope(k.reshape(t, config.num_kv_heads, hd), cos, sin)
    v = v.reshape(t, config.num_kv_heads, hd)
    # Round the new keys/values to the cache dtype now, so attending to them here and later
    # from the cache gives identical results.
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    packed = isinstance(layer["wo"], (kernels.PackedWeight, kernels.QuantWeight))
    x = x + _dense(attention(q, k, v, cache_k, cache_v, mask, use_kernel=packed), layer["wo"])
    h = rms_norm(x, layer["mlp_norm"], eps)
    if "w_gate_up" in layer:
        gate, up = jnp.split(_dense(h, layer["w_gate_up"]), 2, axis=-1)
    else:
        gate, up = _dense(h, layer["w_gate"]), _dense(h, layer["w_up"])
    gated = jax.nn.silu(gate) * up
    return x + _dense(gated, layer["w_down"]), k, v


def unstack_layers(params) -> dict:
    """The same params with `layers` as a tuple of N per-layer dicts.

    `forward` accepts both forms. Stacked layers run under `lax.scan` (fast to compile), but XLA
    copies each layer's weights out of the stacked arrays on every call, so a weight-bound decode
    step moves about 3x the weight bytes. Separate per-layer arrays are read in place. Call this
    once outside jit, or inside a jit before a decode loop (the slices are then taken once per
    call, outside the loop); the stacked form stays the storage layout (loaders, checkpoints).
    """
    layers = params["layers"]
    if not isinstance(layers, dict):
        return params
    num_layers = next(iter(layers.values())).shape[0]
    per_layer = tuple({k: w[n] for k, w in layers.items()} for n in range(num_layers))
    return {**params, "layers": per_layer}


# `lm_logits` reads `head_t` (see `with_transposed_head`) for this many rows or fewer, above one.
TRANSPOSED_HEAD_MAX_ROWS = 16


def with_transposed_head(params, one_row: bool = False) -> dict:
    """The same params plus `head_t`: the output table ([V, D], the untied `lm_head` or the
    embedding) as a separate, materialised `[D, V]` array.

    On the CPU, XLA multiplies a few rows by a `[D, V]` table faster than by the `[V, D]` one, and
    one row slower: SmolLM2's 49152-row head, fp32, 2 cores, a separate jit per case (ad-hoc, median
    of 40): 1 row 3.2 ms `[V, D]` against 3.8 ms `[D, V]`; 5 rows 7.1 against 5.4 ms; 8 rows 7.3
    against 5.3; 16 rows 8.3 against 6.7; 32 rows 10.3 against 11.5. So `lm_logits` uses `head_t`
    for 2 to `TRANSPOSED_HEAD_MAX_ROWS` rows (a verify step of a few tree nodes, a small batch's
    decode step or prefill logits) and the stored table otherwise (one row, or many). The cost is a
    second copy of the table (113 MB for SmolLM2 in fp32). Call it once, outside jit (inside, XLA
    may fold the transpose back into the dot).

    `one_row`: use `head_t` for one row too. Which layout wins one row depends on the CPU: on a
    second one (AMD Zen 4) `[D, V]` took 2.6 against 3.7 ms, the opposite of the figures above,
    so the engine measures it (`pipeline.tree_costs.head_one_row_ms`). It is recorded as the
    empty marker `ONE_ROW_HEAD_T`, so that jit sees it in the params' structure.
    """
    table = params.get("lm_head", params["embed"])
    out = {**params, "head_t": jnp.transpose(table)}
    if one_row:
        out[ONE_ROW_HEAD_T] = jnp.zeros((0,), F32)
    return out


# The key of `with_transposed_head(..., one_row=True)`'s marker: an empty array.
ONE_ROW_HEAD_T = "head_t_one_row"


def embed_rows(table, tokens):
    """The embedding table's rows for `tokens` ([...] ints) as [..., D] fp32: from the [V, D]
    array, or from the output head's blocks when it is a `kernels.QuantWeight` ([D, V])."""
    if isinstance(table, kernels.QuantWeight):
        return table.columns(tokens)
    return table[tokens].astype(jnp.float32)


def lm_logits(params, hidden):
    """[..., D] -> [..., V] fp32, through the untied head if there is one, else the embedding
    (`HEAD_PACKED`, see `with_packed_weights`, for up to `kernels.KERNEL_MAX_ROWS` rows; else its
    `head_t` copy when there is one and `hidden` has 2 to `TRANSPOSED_HEAD_MAX_ROWS` rows,
    or 1 to that many with the `ONE_ROW_HEAD_T` marker)."""
    rows = math.prod(hidden.shape[:-1])
    table = params.get("lm_head", params["embed"])
    if isinstance(table, kernels.QuantWeight):  # held as the head, [D, V], in GGUF blocks
        return kernels.matmul(hidden, table)
    if HEAD_PACKED in params and rows <= kernels.KERNEL_MAX_ROWS:
        return kernels.matmul(hidden, params[HEAD_PACKED], rows)
    fewest = 1 if ONE_ROW_HEAD_T in params else 2
    if "head_t" in params and fewest <= rows <= TRANSPOSED_HEAD_MAX_ROWS:
        table_t = params["head_t"]
        parts = _split(hidden, table_t.dtype)
        out = jnp.einsum("...pd,dv->...pv", parts, table_t, preferred_element_type=F32)
        return out.sum(axis=-2)
    parts = _split(hidden, table.dtype)
    return jnp.einsum("...pd,vd->...pv", parts, table, preferred_element_type=F32).sum(axis=-2)


# The key of `with_packed_weights`' packed output table.
HEAD_PACKED = "head_packed"
PACKED_LAYER_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def with_packed_weights(params, keep_plain: bool = True) -> dict:
    """The same params (fp32, layers unstacked: `unstack_layers`) with every layer matrix held as
    a `kernels.PackedWeight` (q, k and v concatenated as `wqkv`, gate and up as `w_gate_up`)
    and the output table added packed as `HEAD_PACKED` ([D, V], in place of any `head_t` copy),
    so a few-row forward runs its matmuls through the small-M CPU kernel (`pipeline.kernels`).
    `kernels.QuantWeight`s (`load_gguf(native=True)`) stay in their blocks, concatenated alike
    where q, k and v (or gate and up) share a format, else expanded to fp32 and packed; a
    quantized output table is read as it is, so `HEAD_PACKED` is not added.
    Memory: the head a second time (113 MB for SmolLM2), as `head_t`, and with `keep_plain`
    each layer matrix twice, packed and as it was, for prefill, where XLA's dot on the plain
    layout is faster (`kernels.matmul`; 425 MB more for SmolLM2). Call it once, outside jit."""
    layers = params["layers"]
    if isinstance(layers, dict):
        raise ValueError("with_packed_weights: unstack the layers first (unstack_layers)")
    table = params.get("lm_head", params["embed"])
    for name, w in [("head", table), *((k, layers[0][k]) for k in PACKED_LAYER_KEYS)]:
        if w.dtype != jnp.float32:
            raise ValueError(f"with_packed_weights: fp32 weights only, {name} is {w.dtype}")

    def packed(layer, *names):
        ws = [layer[n] for n in names]
        if (
            all(isinstance(w, kernels.QuantWeight) for w in ws)
            and len({(w.bits, w.offset is None) for w in ws}) == 1
        ):
            return ws[0] if len(ws) == 1 else kernels.concat_quant(ws)
        ws = [w.dequantized() if isinstance(w, kernels.QuantWeight) else w for w in ws]
        w = jnp.concatenate(ws, 1)
        return kernels.PackedWeight(kernels.pack(w), w if keep_plain else None)

    def pack_layer(layer):
        out = {k: w for k, w in layer.items() if k not in PACKED_LAYER_KEYS}
        # q, k, v in one product and gate, up in another: fewer, wider calls (each column's sum
        # is the same as in a product of its own).
        out["wqkv"] = packed(layer, "wq", "wk", "wv")
        out["w_gate_up"] = packed(layer, "w_gate", "w_up")
        out["wo"], out["w_down"] = packed(layer, "wo"), packed(layer, "w_down")
        return out

    out = {k: v for k, v in params.items() if k not in ("head_t", ONE_ROW_HEAD_T)}
    out["layers"] = tuple(pack_layer(layer) for layer in layers)
    if not isinstance(table, kernels.QuantWeight):  # else `lm_logits` reads its blocks
        out[HEAD_PACKED] = kernels.PackedWeight(kernels.pack(jnp.transpose(table)))
    return out


def forward_hidden(params, config: LlamaConfig, tokens, positions, cache: KVCache, mask):
    """[B, T], [B, T], cache, [B, T, S+T] -> hidden [B, T, D], new_k, new_v [N, B, T, Hkv, hd].

    `forward` without the head, for callers that need logits at only a few positions.
    The layer loop runs outside the batch vmap: each layer's cache `[B, Hkv, ...]` is then a
    plain slice, whereas vmapping the whole model over the cache's axis 1 transposes (copies) the
    entire cache on every call.
    """
    x = embed_rows(params["embed"], tokens)
    rope = jax.vmap(rope_tables, in_axes=(0, None, None))
    cos, sin = rope(positions, config.head_dim, config.rope_theta)
    block = jax.vmap(decoder_layer, in_axes=(None, None, 0, 0, 0, 0, 0, 0))

    def step(x, per_layer):
        layer, ck, cv = per_layer
        x, k, v = block(config, layer, x, ck, cv, cos, sin, mask)
        return x, (k, v)

    layers = params["layers"]
    if isinstance(layers, dict):
        stacked = (layers, _stacked(cache.k), _stacked(cache.v))
        x, (new_k, new_v) = jax.lax.scan(step, x, stacked)
    else:  # unstacked (see `unstack_layers`): one unrolled block per layer
        kvs = []
        for n, layer in enumerate(layers):
            x, kv = step(x, (layer, cache.k[n], cache.v[n]))
            kvs.append(kv)
        new_k, new_v = (jnp.stack(part) for part in zip(*kvs, strict=True))
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), new_k, new_v


def forward(params, config: LlamaConfig, tokens, positions, cache: KVCache, mask) -> ForwardOut:
    """[B, T] tokens, [B, T] positions, cache, [B, T, S+T] bool mask -> ForwardOut.

    Mask columns `0..S-1` are cache slots, `S..S+T-1` the new tokens. Does not write the cache.
    """
    _check_shapes(params, config, tokens, positions, cache, mask)
    hidden, new_k, new_v = forward_hidden(params, config, tokens, positions, cache, mask)
    return ForwardOut(lm_logits(params, hidden), hidden, new_k, new_v)


def _check_shapes(params, config, tokens, positions, cache, mask):
    b, t = tokens.shape
    s = cache.num_slots
    layers = params["layers"]
    n = len(layers) if isinstance(layers, (list, tuple)) else layers["attn_norm"].shape[0]
    if n != config.num_layers:
        raise ValueError(f"forward: params have {n} layers, config.num_layers={config.num_layers}")
    if positions.shape != (b, t):
        raise ValueError(f"forward: positions {positions.shape} must match tokens {(b, t)}")
    if (cache.num_layers, cache.k[0].shape[0]) != (config.num_layers, b):
        want = (config.num_layers, b)
        got = (cache.num_layers, cache.k[0].shape[0])
        raise ValueError(f"forward: cache has (layers, rows) {got}, must be (N, B)={want}")
    if mask.shape != (b, t, s + t):
        raise ValueError(f"forward: mask {mask.shape} must be (B, T, S+T)={(b, t, s + t)}")


def commit(cache: KVCache, new_k, new_v, take, count) -> KVCache:
    """cache, [N, B, T, Hkv, hd] x2, take [B, T'] int, count [B] -> cache.

    Row `b` writes `new_*[:, b, take[b, j]]` into slot `lengths[b] + j` for `j < count[b]`, then
    `lengths += count`. The caller sizes the cache: slots past `S` are dropped. A per-layer cache
    (`unstack_cache`) stays per-layer.

    One scatter per layer. Inside a decode loop a per-layer cache is updated in place, whereas
    XLA (CPU) copied a stacked one around the scatter. A select over the whole cache per token,
    the earlier way, made a batch-32 decode step 207 ms against 181 ms (measured, jax 0.10).
    """
    b, t = take.shape
    # Entries past `count` go to slot S, which `mode="drop"` discards.
    j = jnp.arange(t)[None, :]
    slots = jnp.where(j < count[:, None], cache.lengths[:, None] + j, cache.num_slots)
    rows = jnp.arange(b)[:, None]

    def pick(new):
        """[N, B, T, Hkv, hd] -> [B, T', N, Hkv, hd]: the kept tokens, slot index first."""
        picked = jnp.take_along_axis(new, take[None, :, :, None, None], axis=2)
        return jnp.moveaxis(picked, 0, 2)

    def write(buf, picked, index):
        """Scatter `picked` into every layer of `buf` at `index` (per layer: rows, ..., slots).

        Mixed advanced indices (rows, slots) and slices put the indexed [B, T'] dims first, so
        a layer takes `picked[:, :, n]` and the stacked form all of `picked` as it is.
        """
        if isinstance(buf, (tuple, list)):
            return tuple(
                layer.at[index].set(picked[:, :, n].astype(layer.dtype), mode="drop")
                for n, layer in enumerate(buf)
            )
        return buf.at[(slice(None), *index)].set(picked.astype(buf.dtype), mode="drop")

    whole = slice(None)
    k = write(cache.k, pick(new_k), (rows, whole, whole, slots))  # [B, Hkv, hd, S] per layer
    v = write(cache.v, pick(new_v), (rows, whole, slots))  # [B, Hkv, S, hd] per layer
    return KVCache(k, v, cache.lengths + count)


def _causal_mask_seq(length, num_slots: int, valid):
    """[], static S, [T] bool -> [T, S+T]: the filled cache slots, then causal over valid tokens.

    Every token sees itself, so padded tokens stay finite.
    """
    t = valid.shape[0]
    cache_cols = jnp.broadcast_to(jnp.arange(num_slots)[None, :] < length, (t, num_slots))
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    new_cols = ((j <= i) & valid[None, :]) | (i == j)
    return jnp.concatenate([cache_cols, new_cols], axis=-1)


def causal_mask(lengths, num_slots: int, num_new: int, valid=None):
    """[B], static S, static T, [B, T] bool | None -> [B, T, S+T] bool."""
    if valid is None:
        valid = jnp.ones((lengths.shape[0], num_new), bool)
    return jax.vmap(_causal_mask_seq, in_axes=(0, None, 0))(lengths, num_slots, valid)
