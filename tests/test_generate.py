"""Generation with the target LLM (pipeline/generate.py): greedy equals a naive loop of full
forwards, rows are independent of batch composition, EOS / max-new-tokens per row, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafter.sampling import SamplingConfig
from pipeline.generate import PAD_ID, generate, prefill
from pipeline.llm import LlamaConfig, causal_mask, forward, init_cache, init_params

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    tie_word_embeddings=False,  # a tiny tied model mostly repeats its input token
)
PARAMS = init_params(CONFIG, jax.random.key(0))
GREEDY = SamplingConfig()
# One sampled configuration shared by several tests: each distinct one costs a compile.
HOT = SamplingConfig(temperature=1.5, top_k=3, top_p=0.9)
STEPS = 6
fwd = jax.jit(forward, static_argnums=1)
prefill_jit = jax.jit(prefill, static_argnums=1)
PROMPTS = [[5, 9, 2, 31, 7], [12], [40, 3, 3]]


def pad(prompts, width=None):
    width = width or max(map(len, prompts))
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return jnp.asarray(out), jnp.asarray([len(p) for p in prompts], jnp.int32)


def full_forward(seq, width=12):
    """A cache-free causal forward of one sequence, padded to `width` (one compile for all)."""
    tokens = jnp.asarray([list(seq) + [0] * (width - len(seq))], jnp.int32)
    mask = causal_mask(jnp.zeros(1, jnp.int32), 0, width)
    return fwd(PARAMS, CONFIG, tokens, jnp.arange(width)[None], init_cache(CONFIG, 1, 0), mask)


def naive_greedy(prompt, steps=STEPS):
    """Append the argmax of a full forward `steps` times."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(full_forward(seq).logits[0, len(seq) - 1].argmax()))
    return seq[len(prompt) :]


def rows(gen):
    return [list(np.asarray(gen.tokens[b, : gen.lengths[b]])) for b in range(len(gen.lengths))]


def test_greedy_equals_naive_loop_of_full_forwards():
    prompts, lengths = pad(PROMPTS)
    gen = generate(PARAMS, CONFIG, prompts, lengths, GREEDY, jax.random.key(0), STEPS)
    np.testing.assert_array_equal(gen.lengths, [STEPS] * 3)
    want = [naive_greedy(p) for p in PROMPTS]
    assert rows(gen) == want
    assert len(set(sum(want, []))) > 3, "the test model should not just repeat one token"


def test_prefill_matches_forward_at_the_last_prompt_token():
    prompts, lengths = pad(PROMPTS)
    pre = prefill_jit(PARAMS, CONFIG, prompts, lengths, init_cache(CONFIG, 3, 8))
    np.testing.assert_array_equal(pre.cache.lengths, lengths)
    for b, p in enumerate(PROMPTS):
        out = full_forward(p)
        t = len(p)
        np.testing.assert_allclose(pre.logits[b], out.logits[0, t - 1], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(pre.hidden[b], out.hidden[0, t - 1], atol=1e-4, rtol=1e-4)
        cached_k = pre.cache.slot_major()[0]
        np.testing.assert_allclose(cached_k[:, b, :t], out.new_k[:, 0, :t], atol=1e-5)


def test_sampled_rows_do_not_depend_on_batch_composition():
    key = jax.random.key(7)
    prompts, lengths = pad(PROMPTS)
    full = rows(generate(PARAMS, CONFIG, prompts, lengths, HOT, key, STEPS))
    # Two of the prompts in another order beside a new one, padded wider, with their row ids.
    other, other_len = pad([PROMPTS[2], [1, 2, 3, 4, 5, 6], PROMPTS[0]], width=7)
    part = rows(generate(PARAMS, CONFIG, other, other_len, HOT, key, STEPS, row_ids=[2, 9, 0]))
    assert [part[0], part[2]] == [full[2], full[0]]


def test_eos_and_max_new_tokens_per_row():
    free = [naive_greedy(p) for p in PROMPTS]
    eos = free[0][2]  # row 0 stops at its third token (or earlier, if that id came before)
    stop = [f.index(eos) + 1 if eos in f else STEPS for f in free]
    cfg = LlamaConfig(**{**CONFIG.__dict__, "eos_token_ids": (eos,)})
    prompts, lengths = pad(PROMPTS)
    gen = generate(
        PARAMS, cfg, prompts, lengths, GREEDY, jax.random.key(0), jnp.asarray([STEPS, 2, 0])
    )
    assert gen.tokens.shape == (3, STEPS)
    assert rows(gen) == [free[0][: stop[0]], free[1][: min(stop[1], 2)], []]
    np.testing.assert_array_equal(gen.tokens[0, stop[0] :], PAD_ID)
    np.testing.assert_array_equal(gen.tokens[2], PAD_ID)


def test_sampling_is_reproducible_and_honours_top_k():
    prompts, lengths = pad(PROMPTS)
    a = generate(PARAMS, CONFIG, prompts, lengths, HOT, jax.random.key(1), STEPS)
    b = generate(PARAMS, CONFIG, prompts, lengths, HOT, jax.random.key(1), STEPS)
    c = generate(PARAMS, CONFIG, prompts, lengths, HOT, jax.random.key(2), STEPS)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # Every token is among the top-3 of the model given the tokens before it.
    for gen in (a, c):
        for row, p in zip(rows(gen), PROMPTS, strict=True):
            logits = full_forward(p + row).logits[0]
            for i, tok in enumerate(row):
                assert tok in np.argsort(-np.asarray(logits[len(p) + i - 1]))[:3]


def test_tiny_top_p_collapses_to_greedy():
    prompts, lengths = pad(PROMPTS)
    greedy = generate(PARAMS, CONFIG, prompts, lengths, GREEDY, jax.random.key(0), STEPS)
    nucleus = SamplingConfig(temperature=2.0, top_p=1e-6)
    drawn = generate(PARAMS, CONFIG, prompts, lengths, nucleus, jax.random.key(3), STEPS)
    np.testing.assert_array_equal(drawn.tokens, greedy.tokens)


def test_bad_generate_input_is_named():
    prompts, lengths = pad(PROMPTS)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(PARAMS, CONFIG, prompts, jnp.asarray([5, 0, 3]), GREEDY, jax.random.key(0), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(PARAMS, CONFIG, prompts, lengths, GREEDY, jax.random.key(0), -1)
    with pytest.raises(ValueError, match="prompts"):
        generate(PARAMS, CONFIG, prompts[0], lengths, GREEDY, jax.random.key(0), 2)


def test_collected_states_are_the_hidden_states_each_token_came_from():
    """`collect_states`: states[b, j] is the final hidden state the LLM drew tokens[b, j] from,
    i.e. a full forward's hidden at position P-1+j; zeros past the row's length."""
    tokens, lengths = pad(PROMPTS)
    gen = generate(PARAMS, CONFIG, tokens, lengths, GREEDY, jax.random.key(0), [STEPS, 2, STEPS],
                   collect_states=True)  # fmt: skip
    assert gen.states.shape == (3, STEPS, CONFIG.hidden_size)
    for b, prompt in enumerate(PROMPTS):
        n = int(gen.lengths[b])
        seq = prompt + rows(gen)[b]
        ref = full_forward(seq).hidden[0, len(prompt) - 1 : len(prompt) - 1 + n]
        np.testing.assert_allclose(gen.states[b, :n], ref, atol=1e-4, rtol=1e-4)
        assert not np.asarray(gen.states[b, n:]).any()
    plain = generate(PARAMS, CONFIG, tokens, lengths, GREEDY, jax.random.key(0), STEPS)
    assert plain.states is None


def test_the_cache_is_fp32_whatever_the_weights_unless_told():
    from pipeline.generate import start

    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), PARAMS)
    toks, lengths = pad(PROMPTS)
    args = (toks, lengths, jnp.full((3,), 2), jax.random.key(0), jnp.arange(3))
    static = dict(config=CONFIG, sampling=GREEDY, num_tokens=2, eos_ids=())
    assert start(half, *args, **static).cache.k.dtype == jnp.float32
    assert start(PARAMS, *args, **static).cache.k.dtype == jnp.float32
    told = start(half, *args, **static, cache_dtype=jnp.bfloat16)
    assert told.cache.k.dtype == jnp.bfloat16 and told.cache.v.dtype == jnp.bfloat16
