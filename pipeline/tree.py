"""Pack a prompt's W draft candidates into a prefix tree the target verifies in one forward pass.

The reference calls this dynamic tree attention: candidates from beam search share prefixes (all
share column 0, the token the target produced last), so each distinct prefix is stored once as a
node. The tree is padded to a fixed `num_nodes(W, L) = 1 + W*L` nodes (or the fewer slots a
best-first tree needs) so the verifier jits once; padding nodes attend only to themselves and are
never read back.

Nodes are numbered breadth-first (depth-major, then by the first candidate that reaches them), so
a parent always precedes its children and node 0 is the root. Written for one prompt; `pack_trees`
is the vmapped batch version.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from drafter.drafting import NO_TOKEN


class Tree(NamedTuple):
    """A packed prefix tree of `n = 1 + W*L` node slots (batched: leading `B` on every field)."""

    tokens: jax.Array  # [n] int32 node token (0 on padding nodes)
    parents: jax.Array  # [n] int32 parent node, -1 for the root and padding nodes
    depths: jax.Array  # [n] int32 depth; the root (column 0) has depth 0
    valid: jax.Array  # [n] bool, False on padding nodes
    mask: jax.Array  # [n, n] bool, mask[i, j]: node j is an ancestor of node i or i itself
    node_of: jax.Array  # [W, L+1] int32, the node holding candidate w's token at depth d
    num_nodes: jax.Array  # [] int32 real (non-padding) nodes


def num_nodes(width: int, length: int) -> int:
    """Node slots of a padded tree: the shared root plus at most W*L distinct drafted tokens."""
    return 1 + width * length


def _first_sharing(candidates):
    """[W, L+1] -> [W, L+1]: the smallest candidate index with the same prefix up to depth d."""
    same_token = candidates[:, None, :] == candidates[None, :, :]  # [W, W', L+1]
    same_prefix = jnp.cumprod(same_token, axis=-1).astype(bool)
    return jnp.argmax(same_prefix, axis=1).astype(jnp.int32)  # candidate w itself always matches


def _number_nodes(first, real):
    """[W, L+1] first-sharer, [W, L+1] bool real token -> [W, L+1] breadth-first node index of
    each (candidate, depth) (0 where there is no token), real node count."""
    width, depth1 = first.shape
    owns = (first == jnp.arange(width, dtype=jnp.int32)[:, None]) & real  # opens a new node
    index_dw = jnp.cumsum(owns.T.reshape(-1)).reshape(depth1, width) - 1  # depth-major order
    node_of = index_dw.T[first, jnp.arange(depth1)[None, :]].astype(jnp.int32)
    return jnp.where(real, node_of, 0), owns.sum()


def _ancestor_mask(node_of, real, n: int):
    """[W, L+1] -> [n, n] bool ancestor-or-self mask; padding nodes see only themselves."""
    depth1 = node_of.shape[1]
    node_of = jnp.where(real, node_of, n)  # positions without a token write nothing
    d = jnp.arange(depth1)
    rows = jnp.broadcast_to(node_of[:, :, None], node_of.shape + (depth1,))
    cols = jnp.broadcast_to(node_of[:, None, :], node_of.shape + (depth1,))
    # Only "ancestor" pairs are written; the others go to an out-of-range row and are dropped.
    rows = jnp.where(d[None, None, :] <= d[None, :, None], rows, n)
    mask = jnp.zeros((n, n), bool).at[rows, cols].set(True, mode="drop")
    return mask | (jnp.eye(n, dtype=bool) & ~mask.any(axis=1, keepdims=True))


def pack_tree(candidates, slots: int | None = None) -> Tree:
    """[W, L+1] int32 candidates (column 0 shared by all) -> Tree of `slots` node slots (default
    `1 + W*L`, room for any candidates).

    Duplicate candidates map to the same nodes. A candidate may end early: NO_TOKEN past its end
    gets no node (`node_of` 0 there; nothing past an accepted prefix is read), as the paths of a
    best-first tree (`drafter.drafting.best_first`) do, whose L paths fit in `1 + L` slots.
    Preconditions: column 0 is the same token in every row (the Drafts contract), and the
    candidates hold at most `slots` distinct prefixes; otherwise the extra nodes are dropped.
    """
    width, depth1 = candidates.shape
    n = num_nodes(width, depth1 - 1) if slots is None else slots
    real = candidates != NO_TOKEN
    node_of, count = _number_nodes(_first_sharing(candidates), real)
    depth = jnp.broadcast_to(jnp.arange(depth1, dtype=jnp.int32), node_of.shape)
    parent = jnp.concatenate([jnp.full((width, 1), -1, jnp.int32), node_of[:, :-1]], axis=1)
    write_at = jnp.where(real, node_of, n)
    put = lambda fill, values: (
        jnp.full((n,), fill, values.dtype).at[write_at].set(values, mode="drop")
    )
    return Tree(
        tokens=put(0, candidates.astype(jnp.int32)),
        parents=put(-1, parent),
        depths=put(0, depth),
        valid=put(False, jnp.ones(node_of.shape, bool)),
        mask=_ancestor_mask(node_of, real, n),
        node_of=node_of,
        num_nodes=count.astype(jnp.int32),
    )


def pack_trees(candidates, slots: int | None = None) -> Tree:
    """[B, W, L+1] -> Tree with a leading B on every field (vmapped pack_tree)."""
    return jax.vmap(lambda c: pack_tree(c, slots))(candidates)


def attention_mask(tree: Tree, cache_length, cache_slots: int):
    """Tree, [], static S -> [n, S+n] bool: every node sees the valid cache slots and its ancestors.

    Columns 0..S-1 are cache slots (those `>= cache_length` hold garbage), S..S+n-1 the tree nodes,
    as `pipeline.llm.forward` expects. Batched callers vmap.
    """
    cache = jnp.arange(cache_slots) < cache_length
    cache = jnp.broadcast_to(cache, (tree.mask.shape[0], cache_slots))
    return jnp.concatenate([cache, tree.mask], axis=1)


def positions(tree: Tree, cache_length):
    """Tree, [] -> [n] int32 position of each node: the root sits right after the cache."""
    return (cache_length + tree.depths).astype(jnp.int32)
