"""The target LLM (pipeline/llm.py): parity with an independent numpy Llama, KV-cache consistency,
padded batches, packed-tree masks, commit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline import llm
from pipeline.llm import (
    KVCache,
    LlamaConfig,
    causal_mask,
    commit,
    forward,
    init_cache,
    init_params,
    unstack_cache,
    unstack_layers,
)

CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=500.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_seq_len=64,
)
fwd = jax.jit(forward, static_argnums=1)


def random_params(config, seed=0, dtype=jnp.float32):
    """init_params with non-trivial norm weights, so a missing norm scale fails parity."""
    params = init_params(config, jax.random.key(seed), dtype)
    keys = jax.random.split(jax.random.key(seed + 1), 3)

    def jitter(k, w):
        return (w + 0.3 * jax.random.normal(k, w.shape)).astype(w.dtype)

    params["final_norm"] = jitter(keys[0], params["final_norm"])
    params["layers"]["attn_norm"] = jitter(keys[1], params["layers"]["attn_norm"])
    params["layers"]["mlp_norm"] = jitter(keys[2], params["layers"]["mlp_norm"])
    return params


# ---- an independent numpy Llama (float64, one sequence, no cache, HF conventions) ----


def np_rms(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    """x [T, H, hd] in HF rotate-half layout: dims i and i + hd/2 form one complex pair."""
    hd = x.shape[-1]
    freqs = theta ** (-np.arange(hd // 2) * 2.0 / hd)
    ang = pos[:, None] * freqs[None, :]
    re, im = x[..., : hd // 2], x[..., hd // 2 :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    return np.concatenate([re * c - im * s, re * s + im * c], axis=-1)


def np_llama(params, cfg: LlamaConfig, tokens):
    """[T] -> logits [T, V], hidden [T, D]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t, hd = len(tokens), cfg.head_dim
    pos = np.arange(t, dtype=np.float64)
    x = p["embed"][np.asarray(tokens)]
    for n in range(cfg.num_layers):
        lw = {k: v[n] for k, v in p["layers"].items()}
        h = np_rms(x, lw["attn_norm"], cfg.rms_norm_eps)
        q = np_rope((h @ lw["wq"]).reshape(t, cfg.num_heads, hd), pos, cfg.rope_theta)
        k = np_rope((h @ lw["wk"]).reshape(t, cfg.num_kv_heads, hd), pos, cfg.rope_theta)
        v = (h @ lw["wv"]).reshape(t, cfg.num_kv_heads, hd)
        k = np.repeat(k, cfg.group_size, axis=1)  # kv head j serves query heads j*G..j*G+G-1
        v = np.repeat(v, cfg.group_size, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(t, -1)
        x = x + o @ lw["wo"]
        h = np_rms(x, lw["mlp_norm"], cfg.rms_norm_eps)
        g = h @ lw["w_gate"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ lw["w_up"])) @ lw["w_down"]
    hidden = np_rms(x, p["final_norm"], cfg.rms_norm_eps)
    head = p["embed"] if cfg.tie_word_embeddings else p["lm_head"]
    return hidden @ head.T, hidden


def run_fresh(params, cfg, tokens, slots=0):
    """Full causal forward of [B, T] tokens on an empty cache of `slots` slots."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    cache = init_cache(cfg, b, slots)
    mask = causal_mask(cache.lengths, slots, t)
    return fwd(params, cfg, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), cache, mask)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_numpy_reference(tied):
    cfg = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    params = random_params(cfg, seed=3)
    assert ("lm_head" in params) != tied
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=11)
    out = run_fresh(params, cfg, tokens[None])
    ref_logits, ref_hidden = np_llama(params, cfg, tokens)
    np.testing.assert_allclose(out.logits[0], ref_logits, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(out.hidden[0], ref_hidden, atol=2e-4, rtol=2e-4)
    unrolled = run_fresh(unstack_layers(params), cfg, tokens[None])
    assert isinstance(unstack_layers(params)["layers"], tuple)
    np.testing.assert_allclose(unrolled.logits, out.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(unrolled.new_v, out.new_v, atol=1e-6)


def test_rope_base_changes_logits():
    """The RoPE base is honoured (a model ignoring it would match both references)."""
    params = random_params(CONFIG)
    tokens = np.arange(9) % CONFIG.vocab_size
    other = LlamaConfig(**{**CONFIG.__dict__, "rope_theta": 10000.0})
    a, b = run_fresh(params, CONFIG, tokens[None]), run_fresh(params, other, tokens[None])
    np.testing.assert_allclose(b.logits[0], np_llama(params, other, tokens)[0], atol=2e-4)
    assert np.abs(np.asarray(a.logits - b.logits)).max() > 1e-2


@pytest.mark.parametrize(
    "layers,cache_form", [("stacked", "stacked"), ("stacked", "per_layer"), ("split", "per_layer")]
)
def test_kv_cached_decoding_equals_full_recomputation(layers, cache_form):
    """Decoding token by token from the cache, in every (params, cache) form decode loops use."""
    params = random_params(CONFIG)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(2, 10)), jnp.int32)
    full = run_fresh(params, CONFIG, tokens)
    slots, first = 16, 4
    cache = init_cache(CONFIG, 2, slots)
    out = fwd(
        params,
        CONFIG,
        tokens[:, :first],
        jnp.broadcast_to(jnp.arange(first), (2, first)),
        cache,
        causal_mask(cache.lengths, slots, first),
    )
    cache = commit(
        cache, out.new_k, out.new_v, jnp.tile(jnp.arange(first), (2, 1)), jnp.full(2, first)
    )
    if cache_form == "per_layer":
        cache = unstack_cache(cache)
    if layers == "split":
        params = unstack_layers(params)
    logits, hidden = [out.logits], [out.hidden]
    for i in range(first, 10):
        out = fwd(
            params,
            CONFIG,
            tokens[:, i : i + 1],
            cache.lengths[:, None],
            cache,
            causal_mask(cache.lengths, slots, 1),
        )
        cache = commit(
            cache, out.new_k, out.new_v, jnp.zeros((2, 1), jnp.int32), jnp.ones(2, jnp.int32)
        )
        logits.append(out.logits)
        hidden.append(out.hidden)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(jnp.concatenate(hidden, 1), full.hidden, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(cache.lengths, [10, 10])
    assert isinstance(cache.k, tuple) == (cache_form == "per_layer")
    np.testing.assert_allclose(cache.slot_major()[0][:, :, :10], full.new_k, atol=1e-5)


def test_padded_batch_rows_match_running_alone():
    """Right-padded prompts of different lengths, after a cached prefix of different lengths."""
    rng = np.random.default_rng(2)
    params = random_params(CONFIG)
    prefix_lens, new_lens, t, slots = [3, 0, 5], [6, 2, 4], 6, 8
    seqs = [rng.integers(0, 96, size=p + n) for p, n in zip(prefix_lens, new_lens, strict=True)]
    cache = init_cache(CONFIG, 3, slots)
    pre = np.zeros((3, 5), np.int32)
    for b, p in enumerate(prefix_lens):
        pre[b, :p] = seqs[b][:p]
    pre_valid = jnp.arange(5)[None] < jnp.asarray(prefix_lens)[:, None]
    out = fwd(
        params,
        CONFIG,
        jnp.asarray(pre),
        jnp.tile(jnp.arange(5), (3, 1)),
        cache,
        causal_mask(cache.lengths, slots, 5, pre_valid),
    )
    cache = commit(
        cache, out.new_k, out.new_v, jnp.tile(jnp.arange(5), (3, 1)), jnp.asarray(prefix_lens)
    )
    new = np.full((3, t), 7, np.int32)  # padding with a real token id: it must not leak
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens, strict=True)):
        new[b, :n] = seqs[b][p:]
    valid = jnp.arange(t)[None] < jnp.asarray(new_lens)[:, None]
    positions = cache.lengths[:, None] + jnp.arange(t)[None]
    out = fwd(
        params,
        CONFIG,
        jnp.asarray(new),
        positions,
        cache,
        causal_mask(cache.lengths, slots, t, valid),
    )
    for b, (p, n) in enumerate(zip(prefix_lens, new_lens, strict=True)):
        alone = run_fresh(params, CONFIG, seqs[b][None])
        np.testing.assert_allclose(out.logits[b, :n], alone.logits[0, p:], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.hidden[b, :n], alone.hidden[0, p:], atol=1e-4, rtol=1e-4)


def test_packed_tree_mask_matches_each_root_to_node_path():
    """A prefix in the cache, then a packed tree (node i's parent parents[i]) in one pass."""
    rng = np.random.default_rng(4)
    params = random_params(CONFIG)
    prefix = rng.integers(0, 96, size=5)
    parents = [-1, 0, 0, 1, 1, 2, 5, 3]  # node 0 is the root; node order is topological
    tree = rng.integers(0, 96, size=len(parents))
    paths = []
    for i, par in enumerate(parents):
        paths.append(([] if par < 0 else paths[par]) + [i])
    slots, t = 8, len(parents)
    cache = init_cache(CONFIG, 1, slots)
    out = fwd(
        params,
        CONFIG,
        jnp.asarray(prefix[None], jnp.int32),
        jnp.arange(5)[None],
        cache,
        causal_mask(cache.lengths, slots, 5),
    )
    cache = commit(cache, out.new_k, out.new_v, jnp.arange(5)[None], jnp.asarray([5]))
    mask = np.zeros((1, t, slots + t), bool)
    mask[0, :, :5] = True
    for i, path in enumerate(paths):
        mask[0, i, [slots + j for j in path]] = True
    depth = np.asarray([len(p) - 1 for p in paths])
    out = fwd(
        params,
        CONFIG,
        jnp.asarray(tree[None], jnp.int32),
        jnp.asarray(5 + depth[None]),
        cache,
        jnp.asarray(mask),
    )
    for i, path in enumerate(paths):
        seq = np.concatenate([prefix, tree[path]])
        alone = run_fresh(params, CONFIG, seq[None])
        np.testing.assert_allclose(out.logits[0, i], alone.logits[0, -1], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(out.new_k[:, 0, i], alone.new_k[:, 0, -1], atol=1e-5)


def test_attention_equals_a_dense_reference():
    """`attention` on the head-major cache equals softmax(q k^T) v written out per query head."""
    ks = jax.random.split(jax.random.key(9), 6)
    t, s, hq, hkv, hd = 3, 7, 4, 2, 8
    q = jax.random.normal(ks[0], (t, hq, hd))
    k, v = jax.random.normal(ks[1], (2, t, hkv, hd))
    ck, cv = jax.random.normal(ks[2], (2, s, hkv, hd))  # slot-major, as a reader thinks of it
    mask = jax.random.bernoulli(ks[3], 0.5, (t, s + t)).at[:, s:].set(jnp.eye(t, dtype=bool))
    out = llm.attention(q, k, v, jnp.transpose(ck, (1, 2, 0)), jnp.swapaxes(cv, 0, 1), mask)
    keys, values = np.concatenate([ck, k]), np.concatenate([cv, v])  # [S+T, Hkv, hd]
    want = np.zeros((t, hq, hd), np.float32)
    for h in range(hq):
        kv = h // (hq // hkv)
        scores = np.asarray(q[:, h]) @ keys[:, kv].T / np.sqrt(hd)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want[:, h] = probs @ values[:, kv]
    np.testing.assert_allclose(out, want.reshape(t, hq * hd), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])  # stacked arrays, `unstack_cache` tuples
@pytest.mark.parametrize("width", [3, 6])
def test_commit_writes_exactly_the_chosen_tokens(width, per_layer):
    n, b, s, t, h, d = 2, 3, 10, 8, 2, 3
    rng = np.random.default_rng(5)
    k0, v0 = rng.normal(size=(2, n, b, s, h, d)).astype(np.float32)
    new_k, new_v = rng.normal(size=(2, n, b, t, h, d)).astype(np.float32)
    lengths = np.asarray([1, s - 2, 0], np.int32)
    take = rng.integers(0, t, size=(b, width)).astype(np.int32)
    count = np.asarray([width, 2, 0], np.int32)  # row 1 fills the cache exactly
    cache = KVCache.from_slot_major(k0, v0, lengths)
    if per_layer:
        cache = unstack_cache(cache)
    out = commit(cache, jnp.asarray(new_k), jnp.asarray(new_v), jnp.asarray(take),
                 jnp.asarray(count))  # fmt: skip
    assert isinstance(out.k, tuple) == per_layer
    got_k, got_v = out.slot_major()
    want_k, want_v = k0.copy(), v0.copy()
    for row in range(b):
        for j in range(count[row]):
            want_k[:, row, lengths[row] + j] = new_k[:, row, take[row, j]]
            want_v[:, row, lengths[row] + j] = new_v[:, row, take[row, j]]
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_array_equal(out.lengths, lengths + count)


def test_causal_mask_layout():
    valid = jnp.asarray([[True, True, False], [True, True, True]])
    mask = np.asarray(causal_mask(jnp.asarray([2, 0]), 3, 3, valid))
    np.testing.assert_array_equal(mask[0, :, :3], [[1, 1, 0]] * 3)
    np.testing.assert_array_equal(mask[1, :, :3], np.zeros((3, 3)))
    np.testing.assert_array_equal(mask[0, :, 3:], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(mask[1, :, 3:], np.tril(np.ones((3, 3))))


def test_bf16_weights_stay_close_to_fp32():
    params = random_params(CONFIG)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = jnp.arange(12)[None] % 96
    a, b = run_fresh(params, CONFIG, tokens), run_fresh(half, CONFIG, tokens)
    assert b.logits.dtype == jnp.float32
    assert np.abs(np.asarray(a.logits - b.logits)).max() < 0.1 * np.abs(np.asarray(a.logits)).max()
    np.testing.assert_array_equal(a.logits.argmax(-1), b.logits.argmax(-1))


def _exact(a, b):
    """The float64 product of two fp32 operands `[..., M, K] x [..., K, N]` (the reference)."""
    return np.einsum("...mk,...kn->...mn", np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_bf16_weights_do_not_round_the_activations():
    """With bf16 weights every product (dense, head, attention against a bf16 cache) equals the
    fp32 product with the rounded weights to about fp32 accuracy: `_split` feeds the activations
    as two bf16 parts. Rounding them to bf16 instead errs ~1000x more, which is what made bf16
    speculative decoding drift from bf16 autoregressive decoding (README, bf16)."""
    rng = np.random.default_rng(0)
    bf16, f32 = jnp.bfloat16, jnp.float32
    x = jnp.asarray(rng.normal(size=(5, 64)), f32)
    w = jnp.asarray(rng.normal(size=(64, 48)), bf16)
    want = _exact(x, w.astype(f32))
    scale = np.abs(want).max()
    assert np.abs(np.asarray(llm._dense(x, w)) - want).max() < 2e-5 * scale
    rounded = _exact(x.astype(bf16).astype(f32), w.astype(f32))
    assert np.abs(rounded - want).max() > 2e-4 * scale  # so the bound above has power
    logits = np.asarray(llm.lm_logits({"embed": w.T}, x))  # a tied head reads [V, D]
    assert np.abs(logits - want).max() < 2e-5 * scale
    a = jnp.asarray(rng.normal(size=(3, 6, 16)), f32)
    b = jnp.asarray(rng.normal(size=(3, 16, 10)), bf16)
    want = _exact(a, b.astype(f32))
    assert np.abs(np.asarray(llm._batch_dot(a, b)) - want).max() < 2e-5 * np.abs(want).max()
    np.testing.assert_array_equal(llm._dense(x, w.astype(f32)), x @ w.astype(f32))  # fp32 as is


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_head_gives_the_same_logits(tied, dtype):
    """`with_transposed_head` adds a `[D, V]` copy of the output table (the untied head if there is
    one, else the embedding); `lm_logits` reads it for 2..TRANSPOSED_HEAD_MAX_ROWS rows and the
    stored `[V, D]` table otherwise, with the same logits either way (fp32 sums in another order)
    and the same greedy tokens through the whole forward pass."""
    cfg = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    params = jax.tree.map(lambda a: a.astype(dtype), random_params(cfg, seed=5))
    table = params["embed"] if tied else params["lm_head"]
    held = llm.with_transposed_head(params)
    assert held["head_t"].shape == (cfg.hidden_size, cfg.vocab_size)
    assert held["head_t"].dtype == dtype
    np.testing.assert_array_equal(held["head_t"], table.T)
    if not tied:  # the head, not the embedding, is what gets transposed
        assert not np.array_equal(held["head_t"], params["embed"].T)
    rng = np.random.default_rng(1)
    for rows in (1, 2, 5, llm.TRANSPOSED_HEAD_MAX_ROWS, llm.TRANSPOSED_HEAD_MAX_ROWS + 1):
        hidden = jnp.asarray(rng.normal(size=(rows, cfg.hidden_size)), jnp.float32)
        want = np.asarray(llm.lm_logits(params, hidden))
        got = np.asarray(llm.lm_logits(held, hidden))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Which table a row count reads: poison the copy and see where the logits change.
    poisoned = {**held, "head_t": jnp.zeros_like(held["head_t"])}
    for rows, reads_copy in ((1, False), (2, True), (llm.TRANSPOSED_HEAD_MAX_ROWS, True),
                             (llm.TRANSPOSED_HEAD_MAX_ROWS + 1, False)):  # fmt: skip
        hidden = jnp.asarray(rng.normal(size=(rows, cfg.hidden_size)), jnp.float32)
        zero = not np.asarray(llm.lm_logits(poisoned, hidden)).any()
        assert zero == reads_copy, rows
    # `one_row=True` (a machine where [D, V] wins one row): one row reads the copy too, alike.
    one = llm.with_transposed_head(params, one_row=True)
    assert llm.ONE_ROW_HEAD_T in one and llm.ONE_ROW_HEAD_T not in held
    hidden = jnp.asarray(rng.normal(size=(1, cfg.hidden_size)), jnp.float32)
    want = np.asarray(llm.lm_logits(params, hidden))
    np.testing.assert_allclose(np.asarray(llm.lm_logits(one, hidden)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())  # fmt: skip
    assert not np.asarray(llm.lm_logits({**one, "head_t": poisoned["head_t"]}, hidden)).any()
    tokens = rng.integers(0, cfg.vocab_size, size=(1, 7))
    a, b = run_fresh(params, cfg, tokens), run_fresh(held, cfg, tokens)
    np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-5 * np.abs(a.logits).max())
    np.testing.assert_array_equal(b.logits.argmax(-1), a.logits.argmax(-1))


def test_bad_config_and_shapes_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(96, 32, 48, 2, num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig(96, 0, 48, 2, 4, 2, 8)
    params = random_params(CONFIG)
    cache = init_cache(CONFIG, 1, 4)
    with pytest.raises(ValueError, match="mask"):
        forward(
            params,
            CONFIG,
            jnp.zeros((1, 2), jnp.int32),
            jnp.zeros((1, 2), jnp.int32),
            cache,
            jnp.ones((1, 2, 5), bool),
        )


@pytest.mark.parametrize("tied", [True, False])
def test_bench_cost_model_counts_the_params(tied):
    """benchmarks/llm.py's bound: every matmul weight once per token, every byte read per step."""
    from benchmarks.llm import _costs

    cfg = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    params = init_params(cfg, jax.random.key(0))
    cost = _costs(cfg, params)
    matmul = sum(w.size for w in params["layers"].values() if w.ndim == 3)
    head = params["embed"] if tied else params["lm_head"]
    assert cost["flops_per_token"] == 2 * (matmul + head.size)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert cost["weight_bytes"] == total - (0 if tied else params["embed"].nbytes)
