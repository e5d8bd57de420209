"""Drafting with the ReDrafter head, written for one sequence (sampling) or one prompt (beams).

`jax.vmap` adds the beam and batch axes. Everything that varies per sequence (LLM state and token,
initial RNN state, key, temperature) is an argument, so the functions are point-free and vmappable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from drafter.config import BeamConfig, DrafterConfig
from drafter.model import (
    TargetEmbeddings,
    check_target,
    context,
    features,
    head_product,
    logits_to_log_probs,
    rnn_step,
    to_target_ids,
)
from drafter.sampling import argmax, draw, warp_log_probs


class Drafts(NamedTuple):
    """Drafted continuations of one prompt ([W, ...]); batched functions add a leading B.

    tokens: [W, L+1] int32 target ids; column 0 is the LLM's token.
    scores: [W] log-probability of each draft (the sum of token_log_probs); sorted descending
        for beam search (per root: in the order of the first tokens' log-probabilities), in key
        order for independent sampling.
    token_log_probs: [W, L] log-probability of each drafted token under the distribution it was
        chosen from.
    log_probs: [W, L, V_draft] | None that distribution itself, over draft ids (for acceptance).
    """

    tokens: jax.Array
    scores: jax.Array
    token_log_probs: jax.Array
    log_probs: jax.Array | None = None


def _step_fn(params, config: DrafterConfig, target: TargetEmbeddings, llm_state):
    """Close over what is constant for one prompt: its context half and the LM head.

    Returns step: [H], [] target id -> [H], [V_draft] (vmappable over beams).
    """
    head = head_product(params, config, target)
    ctx = context(params, config, llm_state)

    def step(rnn_state, token):
        rnn_state = rnn_step(params, target.embed[token], rnn_state)
        x = features(params, config, llm_state, ctx, rnn_state)
        return rnn_state, logits_to_log_probs(config, head(x))

    return step


def sample_seq(
    params,
    config: DrafterConfig,
    target: TargetEmbeddings,
    llm_state,
    llm_token,
    rnn_state0,
    key,
    temperature,
    length: int,
    top_k: int | None = None,
    top_p=None,
    return_log_probs: bool = False,
) -> Drafts:
    """[D], [], [H], key, [] -> Drafts(tokens [L+1], scores [], token_log_probs [L],
    log_probs [L, V_draft] | None): one draft of `length` tokens, sampled (greedy at temperature 0).

    The recorded distribution is the warped one (temperature, top-k, top-p) that tokens are drawn
    from, which is what speculative sampling's acceptance test needs.
    """
    check_target(config, target)
    step = _step_fn(params, config, target, llm_state)

    def advance(rnn_state, token, step_key):
        new_state, log_probs = step(rnn_state, token)
        warped = warp_log_probs(log_probs, temperature, top_k, top_p)
        draft_id = draw(step_key, warped, temperature)
        # Keep the carry's dtype when params and states differ in precision.
        out = (draft_id, warped[draft_id], warped if return_log_probs else None)
        return (new_state.astype(rnn_state.dtype), to_target_ids(target, draft_id)), out

    # The first step is peeled off the scan: beams vmapped with a shared (unbatched) rnn_state0
    # and llm_token then run its RNN, head and warp once per prompt instead of once per beam.
    keys = jax.random.split(key, length)
    llm_token = jnp.asarray(llm_token, jnp.int32)
    carry, first = advance(rnn_state0, llm_token, keys[0])
    _, rest = jax.lax.scan(lambda c, k: advance(*c, k), carry, keys[1:])
    ids, token_lp, log_probs = jax.tree.map(lambda f, r: jnp.concatenate([f[None], r]), first, rest)
    tokens = jnp.concatenate([llm_token[None], to_target_ids(target, ids)])
    return Drafts(tokens, jnp.sum(token_lp), token_lp, log_probs)


def sample_drafts(
    params,
    config: DrafterConfig,
    target: TargetEmbeddings,
    llm_states,
    llm_tokens,
    base_key,
    sequence_ids,
    temperature,
    beam: BeamConfig,
    top_k: int | None = None,
    top_p=None,
    return_log_probs: bool = False,
) -> Drafts:
    """[B, D], [B], key, [B], [] | [B] -> Drafts [B, W, ...]: `beam.width` independent samples per
    prompt, `sample_seq` vmapped over beams and then over the batch.

    Beam w of sequence i uses key fold_in(fold_in(base_key, sequence_ids[i]), w), so results do
    not depend on batch composition, padding or device count.
    """
    batch, width = llm_states.shape[0], beam.width
    temperatures = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
    rnn_state0 = jnp.zeros((config.hidden_size,), llm_states.dtype)

    def one(rnn0, key, llm_state, llm_token, temp):
        return sample_seq(
            params,
            config,
            target,
            llm_state,
            llm_token,
            rnn0,
            key,
            temp,
            beam.length,
            top_k,
            top_p,
            return_log_probs,
        )

    # rnn_state0 and the prompt are shared by its beams (unbatched), so the first step runs once.
    over_beams = jax.vmap(one, in_axes=(None, 0, None, None, None))

    def per_prompt(llm_state, llm_token, sequence_id, temp):
        seq_key = jax.random.fold_in(base_key, sequence_id)
        keys = jax.vmap(lambda w: jax.random.fold_in(seq_key, w))(jnp.arange(width))
        return over_beams(rnn_state0, keys, llm_state, llm_token, temp)

    return jax.vmap(per_prompt)(llm_states, llm_tokens, sequence_ids, temperatures)


class _Level(NamedTuple):
    """One beam-search step's choice, [W] each: which parent beam grew by which draft id."""

    ids: jax.Array
    parents: jax.Array
    token_log_probs: jax.Array
    log_probs: jax.Array | None  # [W, V_draft] of the W parents, before selection


def _grow(step, target, width: int, return_log_probs: bool, per_root: bool = False):
    """The scan body of beam search after its first step: joint top-W over W x V_draft, or with
    `per_root` each beam's own argmax (its parent is itself)."""

    def body(carry, _):
        rnn_states, scores, tokens = carry
        rnn_states, log_probs = jax.vmap(step)(rnn_states, tokens)  # [W, H], [W, V]
        vocab = log_probs.shape[-1]
        if per_root:
            parents = jnp.arange(width)
            ids = argmax(log_probs)
            scores = scores + log_probs[parents, ids]
        else:
            joint = (scores[:, None] + log_probs).reshape(-1)
            scores, flat = jax.lax.top_k(joint, width)
            parents, ids = flat // vocab, flat % vocab
        level = _Level(
            ids, parents, log_probs[parents, ids], log_probs if return_log_probs else None
        )
        return (rnn_states[parents], scores, to_target_ids(target, ids)), level

    return body


def _backtrack(levels: _Level):
    """Follow parent pointers from the final beams through levels [L, W, ...] to read each beam's
    ids, token log-probs and distributions ([W, L] / [W, L, V_draft]), instead of gathering
    growing histories at every step."""

    def back(beam_idx, level: _Level):
        parent = level.parents[beam_idx]
        dist = None if level.log_probs is None else level.log_probs[parent]
        return parent, (level.ids[beam_idx], level.token_log_probs[beam_idx], dist)

    final = jnp.arange(levels.ids.shape[1])
    _, (ids, token_lp, dists) = jax.lax.scan(back, final, levels, reverse=True)
    dists = None if dists is None else jnp.swapaxes(dists, 0, 1)
    return ids.T, token_lp.T, dists


def beam_search(
    params,
    config: DrafterConfig,
    target: TargetEmbeddings,
    llm_state,
    llm_token,
    beam: BeamConfig,
    return_log_probs: bool = False,
) -> Drafts:
    """[D], [] -> Drafts [W, ...]: the reference's beam search for one prompt.

    Every beam starts from the LLM's token with a zero RNN state. The first step would give all W
    beams the same state and distribution, so it is computed once and its top-W tokens seed W
    distinct beams (the reference instead scores beams 1..W-1 as log 0). Each later step takes the
    joint top-W over W x V_draft (beam log-prob + token log-prob); with `beam.per_root` each beam
    instead extends itself by its own argmax, so the W beams keep their W distinct first tokens,
    in the order of those tokens' log-probabilities (scores then need not be sorted).

    With `reference_logits` the beams equal the reference's when W <= 50 (its top-50 mask): for
    wider beams the reference can also pick masked tokens of its log-0 beams at the first step.
    """
    check_target(config, target)
    width, vocab = beam.width, config.draft_vocab
    if width > vocab:
        raise ValueError(f"BeamConfig.width ({width}) must be <= the draft vocabulary ({vocab})")
    step = _step_fn(params, config, target, llm_state)
    llm_token = jnp.asarray(llm_token, jnp.int32)
    rnn_state, log_probs = step(jnp.zeros((config.hidden_size,), llm_state.dtype), llm_token)
    scores, ids = jax.lax.top_k(log_probs, width)
    # All W beams share step 0's distribution; parent 0 stands for each.
    first_dist = jnp.broadcast_to(log_probs, (width, vocab)) if return_log_probs else None
    levels = jax.tree.map(lambda x: x[None], _Level(ids, jnp.zeros_like(ids), scores, first_dist))
    if beam.length > 1:
        carry = (
            jnp.broadcast_to(rnn_state, (width, rnn_state.shape[0])),
            scores,
            to_target_ids(target, ids),
        )
        body = _grow(step, target, width, return_log_probs, beam.per_root)
        (_, scores, _), later = jax.lax.scan(body, carry, None, length=beam.length - 1)
        levels = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), levels, later)
    ids, token_lp, dists = _backtrack(levels)
    tokens = jnp.concatenate([jnp.full((width, 1), llm_token), to_target_ids(target, ids)], 1)
    return Drafts(tokens, scores, token_lp, dists)


def draft_batch(
    params,
    config: DrafterConfig,
    target: TargetEmbeddings,
    llm_states,
    llm_tokens,
    beam: BeamConfig,
    return_log_probs: bool = False,
) -> Drafts:
    """[B, D], [B] -> Drafts [B, W, ...]: `beam_search` vmapped over the batch."""

    def one(llm_state, llm_token):
        return beam_search(params, config, target, llm_state, llm_token, beam, return_log_probs)

    return jax.vmap(one)(llm_states, llm_tokens)
