"""pipeline.tree: prefix-tree packing against a plain-Python trie, masks, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafter.drafting import NO_TOKEN
from pipeline import tree as tree_lib

PACK = jax.jit(tree_lib.pack_tree)


def python_trie(candidates):
    """An independent breadth-first trie: {prefix tuple: node index} over [W, L+1] candidates
    (a prefix ending in NO_TOKEN is no node)."""
    width, depth1 = candidates.shape
    nodes = {}
    for d in range(depth1):
        for w in range(width):
            prefix = tuple(int(t) for t in candidates[w, : d + 1])
            if prefix[-1] != NO_TOKEN:
                nodes.setdefault(prefix, len(nodes))
    return nodes


def random_candidates(rng, width, length, vocab):
    c = rng.integers(0, vocab, size=(width, length + 1))
    c[:, 0] = c[0, 0]
    return c


def check_against_trie(candidates, t, n=None):
    width, depth1 = candidates.shape
    n = tree_lib.num_nodes(width, depth1 - 1) if n is None else n
    trie = python_trie(candidates)
    t = tree_lib.Tree(*(np.asarray(x) for x in t))
    assert int(t.num_nodes) == len(trie)
    assert t.tokens.shape == (n,) and t.mask.shape == (n, n)
    for prefix, i in trie.items():
        assert int(t.tokens[i]) == prefix[-1]
        assert int(t.depths[i]) == len(prefix) - 1
        assert int(t.parents[i]) == (trie[prefix[:-1]] if len(prefix) > 1 else -1)
        ancestors = {trie[prefix[: k + 1]] for k in range(len(prefix))}
        assert set(np.flatnonzero(np.asarray(t.mask[i]))) == ancestors
        assert bool(t.valid[i])
    for w in range(width):
        for d in range(depth1):
            prefix = tuple(int(x) for x in candidates[w, : d + 1])
            assert int(t.node_of[w, d]) == trie.get(prefix, 0)  # 0 past a path's end
    for i in range(len(trie), n):  # padding: invisible to others, sees itself only
        assert not bool(t.valid[i]) and int(t.parents[i]) == -1
        assert np.flatnonzero(np.asarray(t.mask[i])).tolist() == [i]
        assert not bool(t.mask[: len(trie), i].any())


@pytest.mark.parametrize("width,length,vocab", [(1, 1, 5), (4, 3, 2), (5, 4, 3), (3, 2, 50)])
def test_pack_tree_matches_python_trie(width, length, vocab):
    rng = np.random.default_rng(width * 100 + length * 10 + vocab)
    for _ in range(3):
        c = random_candidates(rng, width, length, vocab)
        check_against_trie(c, PACK(jnp.asarray(c, jnp.int32)))


def test_duplicates_and_all_distinct():
    same = np.tile(np.array([[7, 1, 2, 3]]), (4, 1))
    t = PACK(jnp.asarray(same))
    assert int(t.num_nodes) == 4
    assert np.all(np.asarray(t.node_of) == np.arange(4)[None, :])
    distinct = np.array([[7, 1, 1], [7, 2, 2], [7, 3, 3]])
    t = PACK(jnp.asarray(distinct))
    assert int(t.num_nodes) == tree_lib.num_nodes(3, 2)  # the padded size is exactly filled
    check_against_trie(distinct, t)


def test_parents_precede_children_and_paths_spell_candidates():
    rng = np.random.default_rng(0)
    c = random_candidates(rng, 6, 4, 3)
    t = tree_lib.Tree(*(np.asarray(x) for x in PACK(jnp.asarray(c))))
    parents = t.parents
    for i in range(int(t.num_nodes)):
        assert parents[i] < i
    for w in range(6):  # walking up from the leaf spells the candidate backwards
        node, spelled = int(t.node_of[w, -1]), []
        while node != -1:
            spelled.append(int(t.tokens[node]))
            node = int(parents[node])
        assert spelled[::-1] == c[w].tolist()


def test_pack_trees_is_the_vmapped_per_prompt_packing():
    rng = np.random.default_rng(1)
    batch = np.stack([random_candidates(rng, 4, 3, 3) for _ in range(5)])
    packed = jax.jit(tree_lib.pack_trees)(jnp.asarray(batch))
    for b in range(5):
        single = PACK(jnp.asarray(batch[b]))
        for field, x in zip(tree_lib.Tree._fields, packed, strict=True):
            np.testing.assert_array_equal(np.asarray(x[b]), np.asarray(getattr(single, field)))


def test_attention_mask_and_positions():
    c = np.array([[4, 1, 2], [4, 1, 3]])
    t = PACK(jnp.asarray(c))
    m = np.asarray(tree_lib.attention_mask(t, 3, 6))
    n = tree_lib.num_nodes(2, 2)
    assert m.shape == (n, 6 + n)
    assert m[:, :3].all() and not m[:, 3:6].any()  # slots >= cache length are garbage
    np.testing.assert_array_equal(m[:, 6:], np.asarray(t.mask))
    np.testing.assert_array_equal(
        np.asarray(tree_lib.positions(t, 3))[: int(t.num_nodes)], [3, 4, 5, 5]
    )


@pytest.mark.parametrize("width,length,vocab", [(4, 4, 3), (6, 5, 2), (5, 5, 50)])
def test_paths_ending_early_pack_into_as_many_slots_as_nodes(width, length, vocab):
    """Candidates cut short by NO_TOKEN (a best-first tree's paths) get no nodes past their ends,
    and fit a tree of exactly their distinct prefixes plus spare slots."""
    rng = np.random.default_rng(width * 100 + length * 10 + vocab)
    for spare in (0, 2):
        c = random_candidates(rng, width, length, vocab)
        ends = rng.integers(1, length + 2, size=width)  # row w keeps columns < ends[w]
        c = np.where(np.arange(length + 1)[None] < ends[:, None], c, NO_TOKEN)
        slots = len(python_trie(c)) + spare
        t = jax.jit(tree_lib.pack_tree, static_argnums=1)(jnp.asarray(c, jnp.int32), slots)
        check_against_trie(c, t, slots)
