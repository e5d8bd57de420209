"""Speculative decoding on one host: draft, verify the packed tree in one target forward, accept.

The whole decode is one `lax.while_loop` over a fixed-shape `SpecState` (no host round trip per
step). Each step, for every row:
1. the draft function proposes W candidates [W, L+1] from (llm_state, llm_token, context);
2. `pipeline.tree` packs them into a prefix tree of `1 + W*L` nodes, and the target runs once over
   the tree with a tree attention mask on top of the KV cache;
3. the acceptance rule (`pipeline.accept`) picks the accepted prefix and the bonus token;
4. only the accepted path's keys/values are committed; the next llm_state is the hidden state of
   the last accepted token and the next llm_token is the bonus token.
Rows accept different counts and stop at EOS or their own max-new-tokens; finished rows ride along
but stop writing.

Randomness: row `b` uses `fold_in(key, row_ids[b])`. The target's token at output index p draws
with `fold_in(., p)`, as in autoregressive decoding (`pipeline.accept`), so a row's output is
its autoregressive output for the same key and row id at any temperature; the drafts of step `s`
draw with `fold_in(., s + 1)` split (they propose only). A row's output depends only on its
prompt, the key and its row id, not on the drafts, the batch around it or the devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import NO_TOKEN, Drafts, beam_search, sample_seq
from drafter.lookup import lookup_candidate
from drafter.model import TargetEmbeddings
from drafter.sampling import SamplingConfig, sample
from pipeline import policy
from pipeline import tree as tree_lib
from pipeline.accept import AcceptanceRule, TreeMatch
from pipeline.generate import PAD_ID, prefill
from pipeline.llm import (
    KVCache,
    LlamaConfig,
    commit,
    forward,
    init_cache,
    unstack_cache,
    unstack_layers,
)
from pipeline.policy import PolicyState, StepCosts


class DraftInputs(NamedTuple):
    """What a draft function sees for one prompt. The ReDrafter uses the first three; `context`
    (prompt then generated tokens, right-padded; `context[num_context - 1]` is llm_token) lets
    context-aware drafters (prompt lookup, test oracles) share the interface."""

    llm_state: jax.Array  # [D]
    llm_token: jax.Array  # [] int32
    key: jax.Array  # [] key
    context: jax.Array  # [C] int32
    num_context: jax.Array  # [] int32


# draft_fn(draft_params, DraftInputs) -> Drafts [W, ...] for one prompt; hashable (a jit static).
DraftFn = Callable[[Any, DraftInputs], Drafts]


@dataclass(frozen=True)
class BeamDraft:
    """ReDrafter beam search; draft_params = (drafter params, TargetEmbeddings)."""

    config: DrafterConfig
    beam: BeamConfig

    @property
    def slots(self) -> int:
        """Node slots of the tree its candidates pack into (`pipeline.tree.pack_tree`)."""
        return self.beam.tree_nodes

    def with_length(self, length: int) -> BeamDraft:
        """The same drafting, `length` tokens (a best-first tree's first `length`)."""
        return BeamDraft(self.config, _shorter(self.beam, length))

    def __call__(self, draft_params, inputs: DraftInputs) -> Drafts:
        params, target = draft_params
        return beam_search(params, self.config, target, inputs.llm_state, inputs.llm_token,
                           self.beam)  # fmt: skip


@dataclass(frozen=True)
class SampledDraft:
    """W independent ReDrafter samples (keys fold_in(key, w)); exact acceptance still holds.
    `beam.tree` does not apply: the samples are W full paths, packed into 1 + W*L slots."""

    config: DrafterConfig
    beam: BeamConfig
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)

    def __post_init__(self):
        if self.beam.cuts:  # the cuts keep a best-first tree's first paths; samples have no order
            raise ValueError(f"SampledDraft: BeamConfig.cuts {self.beam.cuts} apply to "
                             "best-first trees, not to sampled drafts")  # fmt: skip

    def with_length(self, length: int) -> SampledDraft:
        return SampledDraft(self.config, _shorter(self.beam, length), self.sampling)

    def __call__(self, draft_params, inputs: DraftInputs) -> Drafts:
        params, target = draft_params
        s = self.sampling
        rnn0 = jnp.zeros((self.config.hidden_size,), inputs.llm_state.dtype)

        def one(w):
            key = jax.random.fold_in(inputs.key, w)
            args = (inputs.llm_state, inputs.llm_token, rnn0, key, s.temperature)
            return sample_seq(
                params, self.config, target, *args, self.beam.length, s.top_k, s.top_p
            )

        return jax.vmap(one)(jnp.arange(self.beam.width))


def _shorter(beam: BeamConfig, length: int) -> BeamConfig:
    return BeamConfig(beam.width, length, beam.per_root, beam.tree, node_cost=beam.node_cost)


# In place of a beam, a lookup candidate must have matched at least this many tokens. Replayed on
# the 64 held-out answers at (1, 4) (ad-hoc): 2 or 3 raised tokens per call from 2.03 to 2.25, 1
# only to 2.11; also gating on the drafter's first-token log-probability did not beat 2.25.
IN_PLACE_MIN_NGRAM = 2


@dataclass(frozen=True)
class LookupDraft:
    """The base draft function's candidates plus one copied from the context (prompt lookup,
    `drafter.lookup`).

    By default the copy is an extra candidate: W + 1 of them, so the verified tree has
    `1 + (W + 1) * L` node slots; where the lookup finds nothing (or its copy runs out) it repeats
    the first beam, whose nodes the tree shares. `in_place` keeps W candidates (and the tree's
    size): the copy replaces the last beam when it matched at least IN_PLACE_MIN_NGRAM tokens.
    The copy is a function of the context only, so `TreeMatch` stays exact (greedy and
    sampling); it carries log-probability 0 (a deterministic proposal), and `log_probs` of the
    result is None.
    """

    base: Any  # DraftFn
    max_ngram: int = 4
    in_place: bool = False

    @property
    def beam(self) -> BeamConfig:
        return self.base.beam

    @property
    def slots(self) -> int | None:
        base = draft_slots(self.base)  # None: sized from the candidates, the added one too
        return base if self.in_place or base is None else base + self.beam.length

    def with_length(self, length: int) -> LookupDraft:
        return LookupDraft(self.base.with_length(length), self.max_ngram, self.in_place)

    def __call__(self, draft_params, inputs: DraftInputs) -> Drafts:
        drafts = self.base(draft_params, inputs)
        length = drafts.tokens.shape[1] - 1
        copied, valid, ngram = lookup_candidate(inputs.context, inputs.num_context, length,
                                                self.max_ngram)  # fmt: skip
        fill = drafts.tokens[-1 if self.in_place else 0, 1:]
        row = jnp.concatenate([drafts.tokens[0, :1], jnp.where(valid, copied, fill)])
        zeros = jnp.zeros((1, length), drafts.token_log_probs.dtype)
        if not self.in_place:
            return Drafts(
                tokens=jnp.concatenate([drafts.tokens, row[None]]),
                scores=jnp.concatenate([drafts.scores, jnp.zeros((1,), drafts.scores.dtype)]),
                token_log_probs=jnp.concatenate([drafts.token_log_probs, zeros]),
            )
        use = ngram >= IN_PLACE_MIN_NGRAM
        if self.beam.tree:  # the copy replaces the whole tree: its paths do not fit beside it
            rows = drafts.tokens.shape[0]
            return Drafts(
                tokens=jnp.where(use, jnp.broadcast_to(row, drafts.tokens.shape), drafts.tokens),
                scores=jnp.where(use, 0.0, drafts.scores),
                token_log_probs=jnp.where(use, jnp.zeros((rows, length)), drafts.token_log_probs),
            )
        return Drafts(
            tokens=drafts.tokens.at[-1].set(jnp.where(use, row, drafts.tokens[-1])),
            scores=drafts.scores.at[-1].set(jnp.where(use, 0.0, drafts.scores[-1])),
            token_log_probs=drafts.token_log_probs.at[-1].set(
                jnp.where(use, zeros[0], drafts.token_log_probs[-1])
            ),
        )


def target_embeddings(llm_params) -> TargetEmbeddings:
    """The target's tables the drafter reads; a tied target's head is its embedding."""
    return TargetEmbeddings(llm_params["embed"], llm_params.get("lm_head", llm_params["embed"]))


class SpecState(NamedTuple):
    """The while-loop carry (leading B on all but `step` and `policy`)."""

    cache: KVCache
    context: jax.Array  # [B, C] prompt then generated tokens
    num_prompt: jax.Array  # [B]
    num_out: jax.Array  # [B] generated so far
    max_new: jax.Array  # [B]
    done: jax.Array  # [B] bool
    llm_state: jax.Array  # [B, D] hidden state of the last committed token
    llm_token: jax.Array  # [B] the target's latest token (not yet in the cache)
    keys: jax.Array  # [B] per-row keys
    calls: jax.Array  # [B] verify calls made while the row was active
    accepted: jax.Array  # [B, L+1] how often 0..L drafted tokens were accepted
    drafted: jax.Array  # [B] drafted tokens verified (tree node slots past the root), summed
    by_size: jax.Array  # [B, S+1] verify steps by size while active (0: none drafted verified)
    step: jax.Array  # []
    policy: PolicyState  # batch-level (`pipeline.policy`)


class SpecOut(NamedTuple):
    """tokens [B, M] (first `lengths[b]` real, EOS included, rest PAD_ID), lengths [B], calls [B]
    verify calls (prefill not counted), accepted [B, L+1] histogram of accepted draft lengths,
    drafted [B] drafted-token slots verified over those calls (fewer than calls x L where a
    best-first tree was cut, `BeamConfig.cuts`), by_size [B, S+1] the row's verify calls by the
    size the policy chose (index 0: the root alone, an autoregressive step; i: `sizes[i-1]`)."""

    tokens: jax.Array
    lengths: jax.Array
    calls: jax.Array
    accepted: jax.Array
    drafted: jax.Array
    by_size: jax.Array


def _emit(state: SpecState, emitted, num_emitted, eos_ids: tuple[int, ...]):
    """Append `emitted[b, :num_emitted[b]]` ([B, E]) to active rows, cut at EOS / max_new."""
    b, e = emitted.shape
    j = jnp.arange(e)[None, :]
    is_eos = jnp.isin(emitted, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else emitted < -1
    is_eos = is_eos & (j < num_emitted[:, None])
    upto_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1, num_emitted)
    keep = jnp.where(state.done, 0, jnp.minimum(upto_eos, state.max_new - state.num_out))
    cols = jnp.where(j < keep[:, None], (state.num_prompt + state.num_out)[:, None] + j, 10**9)
    context = state.context.at[jnp.arange(b)[:, None], cols].set(emitted, mode="drop")
    num_out = state.num_out + keep
    hit_eos = (is_eos & (j < keep[:, None])).any(1)
    done = state.done | hit_eos | (num_out >= state.max_new)
    return state._replace(context=context, num_out=num_out, done=done)


def _draft_keys(state: SpecState):
    """[B] keys the drafts of this step draw with (never the target's: see `pipeline.accept`)."""
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, state.step + 1)
    return jax.vmap(jax.random.split)(step_keys)[:, 0]


def draft_step(draft_fn: DraftFn, draft_params, state: SpecState, keys) -> Drafts:
    """Drafts [B, W, ...] for every row of `state`."""
    inputs = DraftInputs(state.llm_state, state.llm_token, keys, state.context,
                         state.num_prompt + state.num_out)  # fmt: skip
    return jax.vmap(draft_fn, in_axes=(None, 0))(draft_params, inputs)


def draft_slots(draft_fn: DraftFn) -> int | None:
    """Node slots of the trees a draft function's candidates pack into (its `slots`; None: room
    for any candidates, 1 + W*L)."""
    return getattr(draft_fn, "slots", None)


def verify_step(llm_params, config: LlamaConfig, cache: KVCache, candidates,
                slots: int | None = None):  # fmt: skip
    """[B, W, L+1] -> (Tree [B, ...], ForwardOut over the B x `slots` tree nodes; default
    1 + W*L)."""
    trees = tree_lib.pack_trees(candidates, slots)
    slots = cache.num_slots
    mask = jax.vmap(tree_lib.attention_mask, in_axes=(0, 0, None))(trees, cache.lengths, slots)
    positions = jax.vmap(tree_lib.positions)(trees, cache.lengths)
    return trees, forward(llm_params, config, trees.tokens, positions, cache, mask)


class Verified(NamedTuple):
    """One verify step's outcome per row, in shapes that do not depend on the tree's size."""

    beam: jax.Array  # [B] the accepted candidate
    length: jax.Array  # [B] drafted tokens accepted
    bonus: jax.Array  # [B] the target's token after them
    take: jax.Array  # [B, L+1] tree nodes of the accepted path
    new_k: jax.Array  # [N, B, T, Hkv, hd] every node's keys (T: the largest tree's slots)
    new_v: jax.Array
    hidden: jax.Array  # [B, D] hidden state of the last accepted node


def _verify_accept(llm_params, config, state: SpecState, drafts: Drafts, slots, rule,
                   pad_to: int | None = None) -> Verified:  # fmt: skip
    """Verify `drafts` as trees of `slots` nodes and accept per row; new keys/values padded
    with zeros to `pad_to` nodes (never read: `take` points at real nodes only)."""
    trees, out = verify_step(llm_params, config, state.cache, drafts.tokens, slots)
    acc = jax.vmap(rule)(state.keys, drafts.tokens, drafts.token_log_probs, trees, out.logits,
                         state.num_out)  # fmt: skip
    rows = jnp.arange(drafts.tokens.shape[0])
    new_k, new_v = out.new_k, out.new_v
    if pad_to is not None and pad_to > new_k.shape[2]:
        pad = [(0, 0)] * new_k.ndim
        pad[2] = (0, pad_to - new_k.shape[2])
        new_k, new_v = jnp.pad(new_k, pad), jnp.pad(new_v, pad)
    return Verified(acc.beam, acc.length, acc.bonus, trees.node_of[rows, acc.beam], new_k, new_v,
                    out.hidden[rows, acc.last_node])  # fmt: skip


def _commit_emit(state: SpecState, drafts: Drafts, ver: Verified, eos_ids, verified):
    """Commit the accepted path, emit the accepted tokens and the bonus; `verified` ([] or [B])
    the drafted-token slots this step verified."""
    b, _, depth1 = drafts.tokens.shape
    rows = jnp.arange(b)
    active = ~state.done
    cache = commit(state.cache, ver.new_k, ver.new_v, ver.take,
                   jnp.where(active, ver.length + 1, 0))  # fmt: skip
    drafted = drafts.tokens[rows, ver.beam, 1:]  # [B, L]
    emitted = jnp.concatenate([drafted, jnp.zeros((b, 1), jnp.int32)], 1)
    emitted = emitted.at[rows, ver.length].set(ver.bonus)
    hit = jax.nn.one_hot(ver.length, depth1, dtype=jnp.int32) * active[:, None]
    state = state._replace(
        cache=cache,
        llm_state=jnp.where(active[:, None], ver.hidden, state.llm_state),
        llm_token=jnp.where(active, ver.bonus, state.llm_token),
        calls=state.calls + active.astype(jnp.int32),
        accepted=state.accepted + hit,
        drafted=state.drafted + active.astype(jnp.int32) * verified,
        step=state.step + 1,
    )
    return _emit(state, emitted, ver.length + 1, eos_ids)


def cut_tree(drafts: Drafts, k: int, row_k=None) -> Drafts:
    """The first `k` drafted tokens of a best-first tree ([B, L, L+1] Drafts, one path per
    token): its first k paths, nothing deeper than k; also a lookup copy that replaced the tree
    (every row the same chain) cut to its first k tokens. row_k [B] (<= k) cuts each row's tree
    further, to its own size: the paths past it keep only the root, which adds no node. With
    k = 1 and row_k 0, any candidates ([B, W, L+1]) cut to their root alone."""
    tokens = drafts.tokens[:, :k]
    limit = jnp.full((tokens.shape[0],), k) if row_k is None else row_k
    depth = jnp.arange(tokens.shape[-1])[None, None, :]
    path = jnp.arange(k)[None, :, None]
    drop = (depth > limit[:, None, None]) | ((path >= limit[:, None, None]) & (depth > 0))
    return Drafts(
        tokens=jnp.where(drop, NO_TOKEN, tokens),
        scores=drafts.scores[:, :k],
        token_log_probs=jnp.where(drop[..., 1:], 0.0, drafts.token_log_probs[:, :k]),
    )


def default_costs(draft_fn: DraftFn, length: int) -> StepCosts:
    """Unmeasured costs: the draft tree's linear model (`StepCosts.for_beam`), or for a draft
    function without a `beam` one size, L, at a unit cost; every step drafts."""
    beam = getattr(draft_fn, "beam", None)
    return StepCosts.for_beam(beam) if beam is not None else StepCosts((length,), (0.0,), (1.0,))


def draft_fns_by_size(draft_fn: DraftFn, sizes: tuple[int, ...]) -> list:
    """One draft function per size in `sizes` (ascending, the last `draft_fn`'s own). A
    best-first tree of k tokens is the first k of a longer one, so a smaller draft is drafted at
    its own size (`with_length`); a draft function that cannot shorten drafts in full and is
    cut."""
    shorter = getattr(draft_fn, "with_length", None)
    return [shorter(k) if shorter and k != sizes[-1] else draft_fn for k in sizes]


def _padded(drafts: Drafts, like) -> Drafts:
    """[B, W', L'+1] Drafts padded to `like`'s [B, W, L+1] shapes: NO_TOKEN tokens, paths of
    probability 0 (log -inf), so a smaller tree looks like the first part of the largest."""
    rows, depth = (
        like.tokens.shape[1] - drafts.tokens.shape[1],
        like.tokens.shape[2] - drafts.tokens.shape[2],
    )
    return Drafts(
        tokens=jnp.pad(drafts.tokens, ((0, 0), (0, rows), (0, depth)), constant_values=NO_TOKEN),
        scores=jnp.pad(drafts.scores, ((0, 0), (0, rows)), constant_values=-jnp.inf),
        token_log_probs=jnp.pad(drafts.token_log_probs, ((0, 0), (0, rows), (0, depth))),
    )


def _root_only(state: SpecState, like) -> Drafts:
    """Candidates of `like`'s shapes holding the LLM's token alone: an autoregressive step."""
    b, w, depth1 = like.tokens.shape
    tokens = jnp.full((b, w, depth1), NO_TOKEN, jnp.int32).at[:, 0, 0].set(state.llm_token)
    return Drafts(tokens, jnp.full((b, w), -jnp.inf), jnp.zeros((b, w, depth1 - 1)))


def decode(llm_params, draft_params, state: SpecState, *, config: LlamaConfig, draft_fn: DraftFn,
           rule: AcceptanceRule, eos_ids: tuple[int, ...],
           costs: StepCosts | None = None) -> SpecState:  # fmt: skip
    """Run draft -> verify -> accept until every row is done, each step's sizes chosen by the
    goodput policy (`pipeline.policy`) from `costs` (None: the draft tree's linear model,
    `StepCosts.for_beam`, which always drafts).

    Per step the policy picks how many tokens to draft (0: none, an autoregressive step; a
    best-first tree of k tokens is the first k of the largest) and then how many of them to
    verify (a tree is cut to its first k paths, `cut_tree`; beams verify all or none). One
    compiled draft and one verify per size under `lax.switch`, which runs only the chosen one.
    The cache is committed outside the switch, so no branch carries it.

    Stacked layers and the cache are split once, before the loop (see `pipeline.llm`'s
    `unstack_layers` and `unstack_cache`): XLA copies every layer's weights and keys/values out
    of stacked arrays on each verify call.
    """
    llm_params = unstack_layers(llm_params)
    state = state._replace(cache=unstack_cache(state.cache))
    beam = getattr(draft_fn, "beam", None)
    costs = costs or default_costs(draft_fn, state.accepted.shape[1] - 1)
    if beam is not None and costs.sizes != beam.verify_sizes:
        raise ValueError(f"StepCosts.sizes {costs.sizes} must be the tree's verify sizes "
                         f"{beam.verify_sizes}")  # fmt: skip
    sizes, tree = costs.sizes, beam is not None and beam.tree
    fns = draft_fns_by_size(draft_fn, sizes)
    full_slots = draft_slots(draft_fn)

    def step(state: SpecState) -> SpecState:
        active = ~state.done
        n_active = active.sum().astype(jnp.float32)
        drafted, unprobed = policy.draft_choice(state.policy, costs, n_active)
        keys = _draft_keys(state)
        like = jax.eval_shape(lambda: draft_step(draft_fn, draft_params, state, keys))
        like = Drafts(like.tokens, like.scores, like.token_log_probs)

        def drafting(fn):
            def run():
                d = draft_step(fn, draft_params, state, keys)
                return _padded(Drafts(d.tokens, d.scores, d.token_log_probs), like)

            return run

        branches = [lambda: _root_only(state, like)] + [drafting(fn) for fn in fns]
        drafts = jax.lax.switch(drafted, branches)
        expected = policy.expected_accepted(drafts, sizes, tree)
        verified = policy.verify_choice(state.policy, costs, expected, active, drafted, unprobed)
        slots = full_slots or 1 + like.tokens.shape[1] * (like.tokens.shape[2] - 1)

        def verifying(i):
            def run(drafts):
                if i == 0:
                    cut, nodes = (
                        cut_tree(drafts, 1, jnp.zeros(drafts.tokens.shape[:1], jnp.int32)),
                        1,
                    )
                elif tree:
                    cut, nodes = cut_tree(drafts, sizes[i - 1]), 1 + sizes[i - 1]
                else:
                    cut, nodes = drafts, slots
                return _verify_accept(llm_params, config, state, cut, nodes, rule, pad_to=slots)

            return run

        ver = jax.lax.switch(verified, [verifying(i) for i in range(len(sizes) + 1)], drafts)
        nodes = jnp.asarray([0] + [k if tree else slots - 1 for k in sizes])[verified]
        observed = policy.accepted_by_size(drafts, ver.beam, ver.length, sizes, tree)
        pol = policy.update(state.policy, costs, expected, active, drafted, verified, observed,
                            unprobed)  # fmt: skip
        by_size = (
            state.by_size
            + jax.nn.one_hot(verified, len(sizes) + 1, dtype=jnp.int32) * active[:, None]
        )
        state = state._replace(policy=pol, by_size=by_size)
        return _commit_emit(state, drafts, ver, eos_ids, nodes)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)


def start(llm_params, prompts, prompt_lengths, max_new, key, row_ids, *, config: LlamaConfig,
          sampling: SamplingConfig, num_tokens: int, length: int,
          eos_ids: tuple[int, ...], costs: StepCosts | None = None) -> SpecState:  # fmt: skip
    """Prefill [B, T] right-padded prompts into a cache of T + M + L slots; pick the first token.

    max_new [B] (<= num_tokens = M), row_ids [B], `length` = L (the draft length), `costs` the
    policy's (None: one size, L). The cache is fp32 whatever the weights' dtype, as
    `pipeline.generate`'s by default.
    """
    costs = costs or StepCosts((length,), (0.0,), (1.0,))
    b, t = prompts.shape
    slots = t + num_tokens + length
    cache = init_cache(config, b, slots, jnp.float32)
    pre = prefill(llm_params, config, prompts, prompt_lengths, cache)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)
    first_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0)
    pick = jax.vmap(sample, in_axes=(0, 0, None, None, None))
    first = pick(first_keys, pre.logits, sampling.temperature, sampling.top_k, sampling.top_p)
    context = jnp.zeros((b, slots + 1), jnp.int32).at[:, :t].set(prompts)
    state = SpecState(
        cache=pre.cache,
        context=context,
        num_prompt=prompt_lengths.astype(jnp.int32),
        num_out=jnp.zeros((b,), jnp.int32),
        max_new=max_new.astype(jnp.int32),
        done=max_new <= 0,
        llm_state=pre.hidden,
        llm_token=first,
        keys=keys,
        calls=jnp.zeros((b,), jnp.int32),
        accepted=jnp.zeros((b, length + 1), jnp.int32),
        drafted=jnp.zeros((b,), jnp.int32),
        by_size=jnp.zeros((b, 1 + len(costs.sizes)), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        policy=policy.init_state(costs),
    )
    return _emit(state, first[:, None], jnp.ones((b,), jnp.int32), eos_ids)


def finish(state: SpecState, num_tokens: int) -> SpecOut:
    """Cut each row's generated tokens out of its context: [B, M], PAD_ID past the length."""
    cut = jax.vmap(lambda c, p: jax.lax.dynamic_slice(c, (p,), (num_tokens,)))
    tokens = cut(state.context, state.num_prompt)
    tokens = jnp.where(jnp.arange(num_tokens)[None, :] < state.num_out[:, None], tokens, PAD_ID)
    return SpecOut(tokens, state.num_out, state.calls, state.accepted, state.drafted, state.by_size)


def generate_core(llm_params, draft_params, prompts, prompt_lengths, max_new, key, row_ids,
                  config: LlamaConfig, draft_fn: DraftFn, rule: AcceptanceRule,
                  sampling: SamplingConfig, num_tokens: int, length: int,
                  eos_ids: tuple[int, ...], costs: StepCosts | None = None) -> SpecOut:  # fmt: skip
    """Prefill, decode and cut, as one pure function of arrays (arguments 7.. are static;
    `costs`: the policy's, `decode`).

    Positional so `sharding.shard_jit` can shard arguments 2, 3, 4 and 6 over the batch.
    """
    costs = costs or default_costs(draft_fn, length)
    static = dict(config=config, sampling=sampling, length=length, eos_ids=eos_ids)
    state = start(llm_params, prompts, prompt_lengths, max_new, key, row_ids, num_tokens=num_tokens,
                  costs=costs, **static)  # fmt: skip
    state = decode(llm_params, draft_params, state, config=config, draft_fn=draft_fn, rule=rule,
                   eos_ids=eos_ids, costs=costs)  # fmt: skip
    return finish(state, num_tokens)


GENERATE_STATIC = (7, 8, 9, 10, 11, 12, 13, 14)
GENERATE_BATCH = (2, 3, 4, 6)
generate_jit = jax.jit(generate_core, static_argnums=GENERATE_STATIC)


def draft_core(llm_params, draft_params, prompts, prompt_lengths, key, row_ids,
               config: LlamaConfig, draft_fn: DraftFn, sampling: SamplingConfig,
               length: int) -> Drafts:  # fmt: skip
    """Prefill, pick the first token and draft once: Drafts [B, W, ...] (no verification).

    Arguments 6.. are static; 2, 3 and 5 are the batch arguments.
    """
    b = prompts.shape[0]
    max_new = jnp.full((b,), 2, jnp.int32)
    state = start(llm_params, prompts, prompt_lengths, max_new, key, row_ids, config=config,
                  sampling=sampling, num_tokens=2, length=length, eos_ids=())  # fmt: skip
    return draft_step(draft_fn, draft_params, state, _draft_keys(state))


DRAFT_STATIC = (6, 7, 8, 9)
DRAFT_BATCH = (2, 3, 5)


def draft_length(draft_fn: DraftFn) -> int:
    """L of a draft function (its `beam.length`, as BeamDraft and SampledDraft carry)."""
    beam = getattr(draft_fn, "beam", None)
    if beam is None:
        raise ValueError(f"{draft_fn!r} has no `beam` (BeamConfig) to read the draft length from")
    return beam.length


def default_rule(sampling: SamplingConfig) -> AcceptanceRule:
    """The exact rule for `sampling` (greedy at temperature 0)."""
    return TreeMatch(sampling)
