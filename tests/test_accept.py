"""pipeline.accept: greedy matching vs a Python walk; exact sampling vs the biased rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chi_square import goodness_of_fit

from drafter import sampling
from drafter.sampling import SamplingConfig, warp_log_probs
from pipeline import accept, tree

PACK = jax.jit(tree.pack_tree)


def python_greedy_walk(candidates, logits):
    """Walk from the root along argmax tokens while some candidate continues with it.

    -> (accepted length, accepted tokens incl. column 0, bonus token).
    """
    width, depth1 = candidates.shape
    path = [int(candidates[0, 0])]
    while len(path) < depth1:
        pos = len(path) - 1  # the prefix path[:pos+1] is a node; its logits row is found below
        node = node_index(candidates, path)
        want = int(np.argmax(logits[node]))
        if not any(list(c[: pos + 1]) == path and c[pos + 1] == want for c in candidates):
            return len(path) - 1, path, want
        path.append(want)
    return len(path) - 1, path, int(np.argmax(logits[node_index(candidates, path)]))


def node_index(candidates, prefix):
    """Breadth-first node index of `prefix`, numbered as documented in pipeline.tree."""
    seen = {}
    for d in range(candidates.shape[1]):
        for c in candidates:
            seen.setdefault(tuple(int(x) for x in c[: d + 1]), len(seen))
    return seen[tuple(prefix)]


@pytest.mark.parametrize("width,length,vocab", [(1, 3, 3), (4, 3, 2), (3, 4, 3)])
def test_greedy_is_the_longest_argmax_chain(width, length, vocab):
    rng = np.random.default_rng(width + 10 * length)
    rule = jax.jit(accept.greedy_rule())
    for trial in range(6):
        c = rng.integers(0, vocab, size=(width, length + 1))
        c[:, 0] = c[0, 0]
        n = tree.num_nodes(width, length)
        logits = rng.normal(size=(n, vocab)).astype(np.float32)
        if trial == 0:  # force an all-accepted chain along candidate 0
            for d in range(length + 1):
                nxt = c[0, d + 1] if d < length else 1
                logits[node_index(c, c[0, : d + 1].tolist())] = 10.0 * np.eye(vocab)[nxt]
        t = PACK(jnp.asarray(c))
        got = rule(jax.random.key(0), jnp.asarray(c), jnp.zeros((width, length)), t, logits)
        want_len, want_path, want_bonus = python_greedy_walk(c, logits)
        assert int(got.length) == want_len
        assert c[int(got.beam), : want_len + 1].tolist() == want_path
        assert int(got.bonus) == want_bonus
        assert int(got.last_node) == node_index(c, want_path)
        if trial == 0:
            assert want_len == length and want_bonus == 1


# A two-level tree over V=6: the root has children 1, 2 (candidate 3 duplicates candidate 0).
CANDIDATES = np.array([[0, 1, 3], [0, 2, 4], [0, 2, 5], [0, 1, 3]])
SAMPLING = SamplingConfig(temperature=0.8, top_k=5)


def first_two_tokens(rule, logits, draft_log_probs, num_samples):
    """Emitted (y1, y2) per key, y2 = -1 when the step emitted only y1. -> counts [6, 7]."""
    c = jnp.asarray(CANDIDATES)
    t = PACK(c)

    def one(key):
        a = rule(key, c, draft_log_probs, t, logits)
        emitted = jnp.append(c[a.beam, 1:], 0).at[a.length].set(a.bonus)
        return emitted[0], jnp.where(a.length >= 1, emitted[1], -1)

    keys = jax.random.split(jax.random.key(123), num_samples)
    y1, y2 = jax.jit(jax.vmap(one))(keys)
    counts = np.zeros((6, 7))
    np.add.at(counts, (np.asarray(y1), np.asarray(y2) + 1), 1)
    return counts


def exact_first_two(logits):
    """The autoregressive law of (y1, y2), y2 = -1 (column 0) when y1 is not a drafted child."""
    t = PACK(jnp.asarray(CANDIDATES))
    warp = jax.vmap(lambda x: warp_log_probs(x, SAMPLING.temperature, SAMPLING.top_k))
    p = np.exp(np.asarray(warp(logits)))
    probs = np.zeros((6, 7))
    for y1 in range(6):
        if y1 in (1, 2):
            child = int(t.node_of[list(CANDIDATES[:, 1]).index(y1), 1])
            probs[y1, 1:] = p[0, y1] * p[child]
        else:
            probs[y1, 0] = p[0, y1]
    return probs


@pytest.fixture(scope="module")
def target_logits():
    return jax.random.normal(jax.random.key(7), (tree.num_nodes(4, 2), 6)) * 1.5


def test_sampling_rule_draws_the_target_law(target_logits):
    counts = first_two_tokens(
        accept.sampling_rule(SAMPLING), target_logits, jnp.full((4, 2), -0.5), 20000
    )
    assert goodness_of_fit(counts, exact_first_two(target_logits)) > 1e-3


def test_reference_rule_is_detectably_biased(target_logits):
    # The same check has the power to see the reference's per-beam p/q + longest-wins bias.
    counts = first_two_tokens(
        accept.ReferenceRule(SAMPLING), target_logits, jnp.full((4, 2), -0.5), 20000
    )
    assert goodness_of_fit(counts, exact_first_two(target_logits)) < 1e-6


def test_leading_true():
    ok = jnp.array([[True, True, False, True], [False, True, True, True], [True] * 4])
    np.testing.assert_array_equal(np.asarray(accept.leading_true(ok)), [2, 0, 4])


def test_argmax_is_jnp_argmax_ties_nans_and_infinities_included():
    rng = np.random.default_rng(0)
    ties = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf] * 4, [2.0, np.nan, 5.0, np.nan]], np.float32)
    cases = [
        ties,
        rng.integers(0, 3, (6, 7, 5)).astype(np.float32),  # many ties
        rng.standard_normal((3, 49152)).astype(np.float32),
        np.where(rng.random((4, 9)) < 0.2, np.nan, rng.standard_normal((4, 9))).astype(np.float32),
    ]
    argmax = jax.jit(sampling.argmax, static_argnums=1)
    for x in cases:
        for axis in range(-x.ndim, x.ndim):
            got = np.asarray(argmax(jnp.asarray(x), axis))
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, np.argmax(x, axis=axis), err_msg=f"axis {axis}")
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(ties), -1)), [1, 0, 1])
    assert int(sampling.greedy(jnp.asarray(ties[0]))) == 1
