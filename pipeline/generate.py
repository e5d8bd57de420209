"""Prefill and plain autoregressive generation with the target LLM, under jit.

The whole decode is one `lax.while_loop` over a fixed-shape `DecodeState`: no host sync per
token. Each step forwards every row's last token, commits its key/value and picks the next token
with `drafter.sampling.sample` (greedy when the temperature is 0). A row stops at one of the EOS
ids or at its own `max_new_tokens`; finished rows still ride along in the batch but stop writing.

Randomness is explicit: row `b` draws with `fold_in(fold_in(key, row_ids[b]), step)`, so its
tokens depend on its prompt, `key` and its row id only, not on which other rows share the batch.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drafter.sampling import SamplingConfig, sample
from pipeline.llm import (
    KVCache,
    LlamaConfig,
    causal_mask,
    commit,
    forward,
    forward_hidden,
    init_cache,
    lm_logits,
    unstack_cache,
    unstack_layers,
)

# What `Generated.tokens` holds past a row's length.
PAD_ID = 0


class Prefilled(NamedTuple):
    """The cache with the prompts appended, and logits `[B, V]` / hidden `[B, D]` at each row's
    last prompt token (the hidden is what the drafter starts from)."""

    cache: KVCache
    logits: jax.Array
    hidden: jax.Array


class DecodeState(NamedTuple):
    """The while-loop carry. tokens `[B, M]` generated so far, lengths `[B]` how many, done `[B]`,
    last `[B]` the token to forward next, keys `[B]` per-row base keys, max_new `[B]`, step `[]`."""

    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    last: jax.Array
    keys: jax.Array
    max_new: jax.Array
    step: jax.Array
    cache: KVCache
    states: jax.Array | None = None  # [B, M, D] the state each token came from (if collected)


class Generated(NamedTuple):
    """tokens `[B, M]` (row `b`'s first `lengths[b]` are real, EOS included; the rest PAD_ID).

    states `[B, M, D]` (only with `collect_states`): `states[b, j]` is the final-norm hidden state
    the LLM produced `tokens[b, j]` from (the drafter's training input; zeros past the length).
    """

    tokens: jax.Array
    lengths: jax.Array
    states: jax.Array | None = None


def prefill(params, config: LlamaConfig, prompts, prompt_lengths, cache: KVCache) -> Prefilled:
    """[B, T] right-padded prompts, [B] lengths (>= 1), cache -> Prefilled.

    Appends each prompt after the row's current cache length (positions continue from there).
    The head runs only at the last prompt token.
    """
    b, t = prompts.shape
    valid = jnp.arange(t)[None, :] < prompt_lengths[:, None]
    positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
    mask = causal_mask(cache.lengths, cache.num_slots, t, valid)
    hidden, new_k, new_v = forward_hidden(params, config, prompts, positions, cache, mask)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    take = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = commit(cache, new_k, new_v, take, prompt_lengths)
    return Prefilled(cache, lm_logits(params, last), last)


def _pick(logits, keys, step, sampling: SamplingConfig):
    """[B, V], [B] keys, [] -> [B] int32 tokens."""
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    pick = jax.vmap(sample, in_axes=(0, 0, None, None, None))
    return pick(step_keys, logits, sampling.temperature, sampling.top_k, sampling.top_p)


def _emit(state: DecodeState, tok, eos_ids: tuple[int, ...], hidden) -> DecodeState:
    """Append `tok` [B] (drawn from `hidden` [B, D]) to the rows not yet done; update `done`."""
    b, m = state.tokens.shape
    # Done rows write to column M, which `mode="drop"` discards.
    cols = jnp.where(state.done, m, state.lengths)
    tokens = state.tokens.at[jnp.arange(b), cols].set(tok, mode="drop")
    if state.states is not None:
        states = state.states.at[jnp.arange(b), cols].set(hidden, mode="drop")
        state = state._replace(states=states)
    lengths = state.lengths + (~state.done).astype(jnp.int32)
    hit_eos = jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else False
    done = state.done | hit_eos | (lengths >= state.max_new)
    return state._replace(tokens=tokens, lengths=lengths, done=done, last=tok, step=state.step + 1)


def start(
    params,
    prompts,
    prompt_lengths,
    max_new,
    key,
    row_ids,
    *,
    config: LlamaConfig,
    sampling: SamplingConfig,
    num_tokens: int,
    eos_ids: tuple[int, ...],
    cache_dtype=None,
    collect_states: bool = False,
) -> DecodeState:
    """Prefill [B, T] prompts into a fresh cache of T + M slots and pick each row's first token.

    max_new `[B]` (<= num_tokens = M), row_ids `[B]`; `collect_states` keeps each token's hidden
    state (see `Generated.states`). The cache takes `cache_dtype`, by default fp32 whatever the
    weights' dtype, as in `pipeline.speculative` (a bf16 cache rounds each key/value, and the two
    decodes' last-bit differences then grow until tokens differ; see `pipeline.llm`).
    """
    b, t = prompts.shape
    cache = init_cache(config, b, t + num_tokens, cache_dtype or jnp.float32)
    pre = prefill(params, config, prompts, prompt_lengths, cache)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)
    state = DecodeState(
        tokens=jnp.full((b, num_tokens), PAD_ID, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=max_new <= 0,
        last=jnp.zeros((b,), jnp.int32),
        keys=keys,
        max_new=max_new,
        step=jnp.zeros((), jnp.int32),
        cache=pre.cache,
        states=jnp.zeros((b, num_tokens, config.hidden_size), jnp.float32)
        if collect_states
        else None,
    )
    return _emit(state, _pick(pre.logits, keys, state.step, sampling), eos_ids, pre.hidden)


def decode(
    params,
    state: DecodeState,
    *,
    config: LlamaConfig,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
) -> Generated:
    """Run the `lax.while_loop` until every row is done.

    Stacked layers and the cache are split once here, before the loop (see `unstack_layers`,
    `unstack_cache`), so each step reads weights and keys/values in place instead of copying
    every layer out of the stacked arrays.
    """
    params = unstack_layers(params)
    state = state._replace(cache=unstack_cache(state.cache))
    b = state.last.shape[0]
    num_slots = state.cache.num_slots

    def step(state: DecodeState) -> DecodeState:
        lengths = state.cache.lengths
        mask = causal_mask(lengths, num_slots, 1)
        out = forward(params, config, state.last[:, None], lengths[:, None], state.cache, mask)
        keep = (~state.done).astype(jnp.int32)
        cache = commit(state.cache, out.new_k, out.new_v, jnp.zeros((b, 1), jnp.int32), keep)
        tok = _pick(out.logits[:, 0], state.keys, state.step, sampling)
        return _emit(state._replace(cache=cache), tok, eos_ids, out.hidden[:, 0])

    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    return Generated(final.tokens, final.lengths, final.states)


_STATIC = ("config", "sampling", "num_tokens", "eos_ids", "cache_dtype", "collect_states")
start_jit = jax.jit(start, static_argnames=_STATIC)
decode_jit = jax.jit(decode, static_argnames=("config", "sampling", "eos_ids"))


@partial(jax.jit, static_argnames=_STATIC)
def generate_core(
    params,
    prompts,
    prompt_lengths,
    max_new,
    key,
    row_ids,
    *,
    config,
    sampling,
    num_tokens,
    eos_ids,
    cache_dtype=None,
    collect_states=False,
) -> Generated:
    """`generate` as one pure jitted function of arrays (for callers that shard it)."""
    state = start(
        params,
        prompts,
        prompt_lengths,
        max_new,
        key,
        row_ids,
        config=config,
        sampling=sampling,
        num_tokens=num_tokens,
        eos_ids=eos_ids,
        cache_dtype=cache_dtype,
        collect_states=collect_states,
    )
    return decode(params, state, config=config, sampling=sampling, eos_ids=eos_ids)


def generate(
    params,
    config: LlamaConfig,
    prompts,
    prompt_lengths,
    sampling: SamplingConfig,
    key,
    max_new_tokens,
    *,
    row_ids=None,
    eos_token_ids=None,
    cache_dtype=None,
    collect_states: bool = False,
) -> Generated:
    """[B, T] right-padded prompts, [B] lengths, sampling, key, [B] | int -> Generated [B, M].

    `M = max(max_new_tokens)`. EOS ids default to `config.eos_token_ids`; row ids to `arange(B)`.
    `collect_states` also returns each token's hidden state (`Generated.states`).
    Validates on the host, then runs `generate_core` (compiled once per shape and config).
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ValueError(f"generate: prompts must be [B, T], got shape {prompts.shape}")
    b, t = prompts.shape
    lengths = np.asarray(prompt_lengths, np.int32)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(
            f"generate: prompt_lengths must be [B]={b} values in 1..{t}, got {lengths}"
        )
    max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,))
    if max_new.min() < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new}")
    row_ids = np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
    if row_ids.shape != (b,):
        raise ValueError(f"generate: row_ids must be [B]={b}, got shape {row_ids.shape}")
    eos = config.eos_token_ids if eos_token_ids is None else tuple(int(e) for e in eos_token_ids)
    num_tokens = max(int(max_new.max()), 1)
    return generate_core(
        params,
        prompts,
        jnp.asarray(lengths),
        jnp.asarray(max_new),
        key,
        jnp.asarray(row_ids),
        config=config,
        sampling=sampling,
        num_tokens=num_tokens,
        eos_ids=eos,
        cache_dtype=cache_dtype,
        collect_states=collect_states,
    )
