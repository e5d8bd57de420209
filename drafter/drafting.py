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

    With `beam.tree` it returns `best_first`'s tree instead (L candidates, one per drafted token).
    """
    check_target(config, target)
    if beam.tree:
        if return_log_probs:
            raise ValueError("a best-first tree (BeamConfig.tree) records no draft distributions")
        return best_first(params, config, target, llm_state, llm_token, beam)
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


# A Drafts position that holds no token: past the end of a best-first tree path (`best_first`).
# Never a token id, nor the -1 that marks "past the answer" in replayed continuations.
NO_TOKEN = -2


class _Pool(NamedTuple):
    """Best-first frontier, [P] each: children seen but not yet chosen (score -inf: none)."""

    scores: jax.Array  # path log-probability of the child
    ids: jax.Array  # its draft id
    parents: jax.Array  # the tree node it would hang from


class _Nodes(NamedTuple):
    """Best-first tree, [L+1, ...] each; node 0 is the LLM's token."""

    ids: jax.Array  # draft ids (node 0: unused)
    parents: jax.Array  # parent node (node 0: -1)
    depths: jax.Array
    token_log_probs: jax.Array  # of the node's token given its parent
    scores: jax.Array  # path log-probability
    states: jax.Array  # [L+1, H] RNN state after the node's token


def best_first(
    params,
    config: DrafterConfig,
    target: TargetEmbeddings,
    llm_state,
    llm_token,
    beam: BeamConfig,
) -> Drafts:
    """[D], [] -> Drafts [L, L+1]: a best-first tree of L = `beam.length` drafted tokens.

    The root is the LLM's token; its RNN step gives the distribution of the first drafted token.
    Then L times: among the top-`beam.width` children of every node so far (the frontier), take
    the one with the highest path log-probability into the tree, and (unless it is the last) run
    the RNN from its parent's state through it to see its own top-W children. Under greedy
    verification a tree's expected accepted length is the sum of its nodes' probabilities of
    being on the target's path, which the drafter's path probability estimates, and a child is
    never more probable than its parent, so this picks the L most probable nodes the frontier
    shows (EAGLE-2's dynamic tree, with the RNN's state per node). With width 1 it is the
    greedy chain, beam search at (1, L).

    Candidate w is the path from the root to the (w+1)-th chosen token: tokens [L, L+1] with
    NO_TOKEN past the path's end (`pipeline.tree` gives those no node), token_log_probs 0 there.
    Chosen scores never increase, so `scores` (each path's log-probability) is sorted
    descending. Nodes are chosen in that order too, so a parent precedes its children.
    """
    length, vocab = beam.length, config.draft_vocab
    width = min(beam.width, vocab)
    step = _step_fn(params, config, target, llm_state)
    llm_token = jnp.asarray(llm_token, jnp.int32)
    state0, log_probs = step(jnp.zeros((config.hidden_size,), llm_state.dtype), llm_token)
    size = width * length  # the root's children, then each expanded node's
    top_lp, top_ids = jax.lax.top_k(log_probs, width)
    pool = _Pool(
        jnp.full((size,), -jnp.inf, log_probs.dtype).at[:width].set(top_lp),
        jnp.zeros((size,), jnp.int32).at[:width].set(top_ids),
        jnp.zeros((size,), jnp.int32),
    )
    zeros = jnp.zeros((length + 1,), jnp.int32)
    nodes = _Nodes(
        ids=zeros,
        parents=zeros.at[0].set(-1),
        depths=zeros,
        token_log_probs=jnp.zeros((length + 1,), log_probs.dtype),
        scores=jnp.zeros((length + 1,), log_probs.dtype),
        states=jnp.zeros((length + 1,) + state0.shape, state0.dtype).at[0].set(state0),
    )

    def choose(pool: _Pool, nodes: _Nodes, i):
        best = argmax(pool.scores)
        parent, draft_id, score = pool.parents[best], pool.ids[best], pool.scores[best]
        nodes = nodes._replace(
            ids=nodes.ids.at[i].set(draft_id),
            parents=nodes.parents.at[i].set(parent),
            depths=nodes.depths.at[i].set(nodes.depths[parent] + 1),
            token_log_probs=nodes.token_log_probs.at[i].set(score - nodes.scores[parent]),
            scores=nodes.scores.at[i].set(score),
        )
        return pool._replace(scores=pool.scores.at[best].set(-jnp.inf)), nodes

    def expand(carry, i):
        pool, nodes = choose(*carry, i)
        token = to_target_ids(target, nodes.ids[i])
        state, child_lp = step(nodes.states[nodes.parents[i]], token)
        top_lp, top_ids = jax.lax.top_k(child_lp, width)
        at = (i * width,)
        pool = _Pool(
            jax.lax.dynamic_update_slice(pool.scores, nodes.scores[i] + top_lp, at),
            jax.lax.dynamic_update_slice(pool.ids, top_ids.astype(jnp.int32), at),
            jax.lax.dynamic_update_slice(pool.parents, jnp.full((width,), i, jnp.int32), at),
        )
        nodes = nodes._replace(states=nodes.states.at[i].set(state.astype(nodes.states.dtype)))
        return (pool, nodes), None

    (pool, nodes), _ = jax.lax.scan(expand, (pool, nodes), jnp.arange(1, length))
    _, nodes = choose(pool, nodes, length)
    return _tree_paths(target, nodes, llm_token)


def _tree_paths(target: TargetEmbeddings, nodes: _Nodes, llm_token) -> Drafts:
    """Best-first nodes -> Drafts [L, L+1]: row w is the path to node w+1, NO_TOKEN past it."""
    length = nodes.ids.shape[0] - 1
    tokens = jnp.full((length, length + 1), NO_TOKEN, jnp.int32).at[:, 0].set(llm_token)
    token_lp = jnp.zeros((length, length + 1), nodes.token_log_probs.dtype)
    rows = jnp.arange(length)
    node = rows + 1
    for _ in range(length):  # walk every path up to the root, writing it back to front
        depth = nodes.depths[node]
        at = jnp.where(node > 0, depth, length + 1)  # the root's column is written already
        tokens = tokens.at[rows, at].set(to_target_ids(target, nodes.ids[node]), mode="drop")
        token_lp = token_lp.at[rows, at].set(nodes.token_log_probs[node], mode="drop")
        node = jnp.maximum(nodes.parents[node], 0)
    return Drafts(tokens, nodes.scores[1:], token_lp[:, 1:])


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
