"""Acceptance: which drafted tokens of a verified tree to keep, and the target's bonus token.

One interface, `AcceptanceRule`: `rule(key, candidates[W, L+1], draft_log_probs[W, L], tree,
logits[n, V], position) -> Accepted`, written for one prompt (the decode loop vmaps it over the
batch). `key` is the prompt's own key and `position` the output index of the token after the
tree's root: the target's token at output index p is drawn with `fold_in(key, p)`, as
autoregressive decoding draws it (`pipeline.generate`), so at any temperature a prompt's
speculative output is token-for-token its autoregressive output for the same seed, whatever the
drafts, the tree, its cuts, the batch or the devices.

`TreeMatch` is the rule the decoder uses. At every tree node it picks the target's own token from
that node's logits (`drafter.sampling.sample`: the argmax at temperature 0, a draw from the
temperature/top-k/top-p-warped distribution otherwise) and descends from the root while the
picked token is a child; the token picked at the last node reached is the bonus token.
- greedy (temperature 0): the longest candidate prefix equal to the target's argmax chain, plus
  the argmax after it, so the output is token-for-token greedy autoregressive decoding.
- sampling: the token after a node of depth d is drawn with the key of output index
  `position + d`, the key autoregressive decoding draws that index with. Nodes of one depth
  share it, but only one of them is on the emitted path, and which one depends only on draws at
  smaller indices; so every emitted token is a fresh draw from the target's conditional given
  everything emitted before it, and it is the very token autoregressive decoding draws (the
  same key, the same conditional). Deterministic (beam) drafts lose nothing by this: there is
  no draft distribution to correct for.

`ReferenceRule` reproduces the reference implementation's per-beam `min(1, p/q)` test with
"longest accepted beam wins". It is biased (the longest of several independent tests is not a
valid rejection sampler, and beam drafts are not draws from q); it exists so the losslessness test
can show it detects that bias. Do not decode with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from drafter.sampling import SamplingConfig, greedy, sample, warp_log_probs
from pipeline.tree import Tree


class Accepted(NamedTuple):
    """The outcome for one prompt (batched: leading B)."""

    beam: jax.Array  # [] int32 candidate whose prefix was accepted
    length: jax.Array  # [] int32 accepted drafted tokens, 0..L (the bonus token not counted)
    bonus: jax.Array  # [] int32 the target's token after the accepted prefix
    last_node: jax.Array  # [] int32 tree node of the last accepted token (llm_token if none)


class AcceptanceRule(Protocol):
    def __call__(self, key, candidates, draft_log_probs, tree: Tree, logits,
                 position=0) -> Accepted:  # fmt: skip
        """key, [W, L+1], [W, L], Tree, [n, V], [] -> Accepted."""
        ...


def position_keys(key, position, depths):
    """[n] keys: the one autoregressive decoding draws output index `position + depths[i]`
    with (`pipeline.generate._pick`)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, position + depths)


def leading_true(ok):
    """[W, L] bool -> [W] int32 length of each row's all-True prefix."""
    return jnp.cumprod(ok.astype(jnp.int32), axis=-1).sum(axis=-1)


def _best(candidates, node_of, ok) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Longest accepted prefix (first such candidate) -> (beam, length, last node)."""
    lengths = leading_true(ok)
    beam = jnp.argmax(lengths).astype(jnp.int32)
    length = lengths[beam].astype(jnp.int32)
    return beam, length, node_of[beam, length]


@dataclass(frozen=True)
class TreeMatch:
    """Descend the tree while the target's own token (argmax or draw) is a drafted child."""

    sampling: SamplingConfig = SamplingConfig()

    def __call__(self, key, candidates, draft_log_probs, tree: Tree, logits,
                 position=0) -> Accepted:  # fmt: skip
        """key, [W, L+1], [W, L] (unused), Tree, [n, V], [] -> Accepted."""
        s = self.sampling
        if s.greedy:  # static: the argmax, as `sample` takes it, with no warping or draws
            target = jax.vmap(greedy)(logits)
        else:
            keys = position_keys(key, position, tree.depths)
            pick = jax.vmap(lambda k, x: sample(k, x, s.temperature, s.top_k, s.top_p))
            target = pick(keys, logits)  # [n] the target's token after each node
        ok = candidates[:, 1:] == target[tree.node_of[:, :-1]]
        beam, length, last = _best(candidates, tree.node_of, ok)
        return Accepted(beam, length, target[last], last)


def greedy_rule() -> TreeMatch:
    """The target's argmax chain: output identical to greedy autoregressive decoding."""
    return TreeMatch(SamplingConfig())


def sampling_rule(sampling: SamplingConfig) -> TreeMatch:
    """Exact speculative sampling from the warped target (greedy if temperature is 0)."""
    return TreeMatch(sampling)


@dataclass(frozen=True)
class ReferenceRule:
    """The reference's biased rule: independent p/q tests per beam, the longest accepted wins.

    On rejection the bonus token is drawn from `relu(p - q)`, renormalised. The reference
    subtracts the drafter's whole distribution there; the Drafts contract carries only q of the
    drafted token, so that is the part subtracted (on all-accepted beams it draws from p).
    """

    sampling: SamplingConfig = SamplingConfig(temperature=1.0)

    def __call__(self, key, candidates, draft_log_probs, tree: Tree, logits,
                 position=0) -> Accepted:  # fmt: skip
        """key, [W, L+1], [W, L], Tree, [n, V], [] -> Accepted."""
        s = self.sampling
        key = jax.random.fold_in(key, position)
        warp = jax.vmap(lambda x: warp_log_probs(x, s.temperature, s.top_k, s.top_p))
        log_p = warp(logits)  # [n, V]
        key_test, key_bonus = jax.random.split(key)
        drafted = candidates[:, 1:]
        p_drafted = jnp.take_along_axis(log_p[tree.node_of[:, :-1]], drafted[..., None], -1)[..., 0]
        u = jax.random.uniform(key_test, drafted.shape)
        passed = u < jnp.exp(p_drafted - draft_log_probs)
        beam, length, last = _best(candidates, tree.node_of, passed)
        at = jnp.minimum(length, drafted.shape[1] - 1)  # the rejected depth (if any)
        q_rejected = jnp.exp(draft_log_probs[beam, at])
        p_last = jnp.exp(log_p[last])
        residual = jax.nn.relu(p_last - q_rejected * jax.nn.one_hot(drafted[beam, at], p_last.size))
        use_residual = (length < drafted.shape[1]) & (residual.sum() > 0)
        probs = jnp.where(use_residual, residual, p_last)
        bonus = jax.random.categorical(key_bonus, jnp.log(probs)).astype(jnp.int32)
        return Accepted(beam, length, bonus, last)
