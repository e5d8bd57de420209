"""Drafting: the vmapped per-sequence code against independently written, hand-vectorized
[B, W, ...] numpy versions; beam invariants; keys; and golden beams from the PyTorch reference."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_drafter_model import CONFIGS, D, make_target, np_step, torch_layout, vocab_map_for

from drafter import (
    BeamConfig,
    TargetEmbeddings,
    beam_search,
    draft_batch,
    init_params,
    load_reference,
    sample_drafts,
)

GOLDEN = Path(__file__).parent / "data" / "reference_golden"
B = 3

jit_beams = jax.jit(draft_batch, static_argnums=(1, 5, 6))
jit_samples = jax.jit(sample_drafts, static_argnums=(1, 8, 9, 11))


def setup(name, seed=0):
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(seed))
    # Larger weights give peaked distributions, so beams differ in more than their last token.
    params = jax.tree.map(lambda x: 3.0 * x, params)
    target = make_target(config, jax.random.key(seed + 1), vocab_map_for(config, seed))
    rng = np.random.default_rng(seed)
    llm_states = rng.normal(size=(B, D)).astype(np.float32)
    llm_tokens = rng.integers(0, config.vocab_size, size=B).astype(np.int32)
    return config, params, target, llm_states, llm_tokens


def draft_to_target(config, target):
    n = config.draft_vocab
    return np.arange(n) if target.vocab_map is None else np.asarray(target.vocab_map)


def np_beam_search(config, params, target, llm_states, llm_tokens, width, length):
    """The reference's algorithm, vectorized by hand over [B, W]: every step runs all W beams
    (beams 1..W-1 start at log 0), and histories are gathered by parent at every step."""
    tp, to_target = torch_layout(params, config), draft_to_target(config, target)
    n = config.draft_vocab
    batch = llm_states.shape[0]
    scores = np.tile(np.array([0.0] + [-np.inf] * (width - 1)), (batch, 1))
    tokens = np.repeat(llm_tokens[:, None, None].astype(np.int64), width, axis=1)
    ids = np.zeros((batch, width, 0), np.int64)
    state = np.zeros((batch, width, config.hidden_size))
    dists = np.zeros((batch, width, 0, n))
    for _ in range(length):
        state, log_probs = np_step(tp, config, target, llm_states[:, None], state, tokens[..., -1])
        joint = (scores[..., None] + log_probs).reshape(batch, width * n)
        top = np.argsort(-joint, axis=-1, kind="stable")[:, :width]
        scores = np.take_along_axis(joint, top, -1)
        parent, new_ids = top // n, top % n
        pick = lambda x, p=parent: np.take_along_axis(
            x, p.reshape(p.shape + (1,) * (x.ndim - 2)), 1
        )
        tokens = np.concatenate([pick(tokens), to_target[new_ids][..., None]], -1)
        ids = np.concatenate([pick(ids), new_ids[..., None]], -1)
        state = pick(state)
        dists = np.concatenate([pick(dists), pick(log_probs)[:, :, None]], 2)
    token_lp = np.take_along_axis(dists, ids[..., None], -1)[..., 0]
    return tokens, scores, token_lp, dists


@pytest.mark.parametrize(
    "name", ["proj", "noproj", "noproj_noblocks", "tied", "reduced_tied", "reference_logits"]
)
def test_beam_search_matches_hand_vectorized(name):
    config, params, target, llm_states, llm_tokens = setup(name)
    beam = BeamConfig(4, 3)
    got = jit_beams(params, config, target, llm_states, llm_tokens, beam, True)
    tokens, scores, token_lp, dists = np_beam_search(
        config, params, target, llm_states, llm_tokens, beam.width, beam.length
    )
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.token_log_probs, token_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.log_probs, dists, rtol=1e-4, atol=1e-3)


def test_beam_invariants_reduced_vocab():
    config, params, target, llm_states, llm_tokens = setup("reduced_tied", seed=5)
    beam = BeamConfig(6, 4)
    got = jax.tree.map(
        np.asarray, jit_beams(params, config, target, llm_states, llm_tokens, beam, True)
    )
    assert got.tokens.shape == (B, 6, 5) and got.tokens.dtype == np.int32
    np.testing.assert_array_equal(got.tokens[:, :, 0], np.broadcast_to(llm_tokens[:, None], (B, 6)))
    vocab_map = np.asarray(target.vocab_map)
    assert np.isin(got.tokens[:, :, 1:], vocab_map).all()
    draft_ids = np.argmax(got.tokens[..., 1:, None] == vocab_map, axis=-1)
    for b in range(B):
        assert len({tuple(row) for row in got.tokens[b]}) == 6, "beams are not distinct"
    assert (np.diff(got.scores, axis=-1) <= 0).all(), "scores are not sorted descending"
    np.testing.assert_allclose(got.scores, got.token_log_probs.sum(-1), rtol=1e-5, atol=1e-5)
    chosen = np.take_along_axis(got.log_probs, draft_ids[..., None], -1)[..., 0]
    np.testing.assert_array_equal(chosen, got.token_log_probs)
    np.testing.assert_allclose(np.exp(got.log_probs).sum(-1), 1.0, rtol=1e-5)


def np_per_root_search(config, params, target, llm_states, llm_tokens, width, length):
    """`BeamConfig.per_root`, by hand over [B, W]: the first distribution's top-W tokens, then
    each beam extended by its own argmax, no selection across beams."""
    tp, to_target = torch_layout(params, config), draft_to_target(config, target)
    batch = llm_states.shape[0]
    state = np.zeros((batch, 1, config.hidden_size))
    state, log_probs = np_step(tp, config, target, llm_states[:, None], state, llm_tokens[:, None])
    ids = np.argsort(-log_probs[:, 0], axis=-1, kind="stable")[:, :width]  # [B, W]
    token_lp = [np.take_along_axis(log_probs[:, 0], ids, -1)]
    state = np.repeat(state, width, axis=1)
    history = [ids]
    for _ in range(length - 1):
        state, log_probs = np_step(tp, config, target, llm_states[:, None], state,
                                   to_target[history[-1]])  # fmt: skip
        history.append(np.argmax(log_probs, axis=-1))
        token_lp.append(np.take_along_axis(log_probs, history[-1][..., None], -1)[..., 0])
    drafted = to_target[np.stack(history, -1)]
    tokens = np.concatenate([np.repeat(llm_tokens[:, None, None], width, 1), drafted], -1)
    return tokens, np.stack(token_lp, -1)


@pytest.mark.parametrize("name", ["proj", "reduced_tied"])
def test_per_root_beams_are_greedy_chains_from_the_top_w_first_tokens(name):
    config, params, target, llm_states, llm_tokens = setup(name, seed=4)
    beam = BeamConfig(4, 3, per_root=True)
    got = jit_beams(params, config, target, llm_states, llm_tokens, beam, False)
    tokens, token_lp = np_per_root_search(config, params, target, llm_states, llm_tokens, 4, 3)
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.token_log_probs, token_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.scores, token_lp.sum(-1), rtol=1e-4, atol=1e-4)
    for b in range(B):  # W distinct first tokens, in order of their log-probability
        assert len(set(got.tokens[b, :, 1].tolist())) == 4
        assert (np.diff(np.asarray(got.token_log_probs[b, :, 0])) <= 0).all()
    # Beam 0 is the greedy chain, i.e. width-1 beam search; joint beam search differs here.
    one = jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(1, 3), False)
    np.testing.assert_array_equal(got.tokens[:, :1], one.tokens)
    joint = jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(4, 3), False)
    assert not np.array_equal(got.tokens, joint.tokens)
    # At L = 1 both searches are the first distribution's top W.
    short = [jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(4, 1, r), False)
             for r in (False, True)]  # fmt: skip
    np.testing.assert_array_equal(short[0].tokens, short[1].tokens)


def test_beam_config_parses_per_root():
    assert BeamConfig.parse("2x4r") == BeamConfig(2, 4, per_root=True)
    assert BeamConfig.parse("2X4") == BeamConfig(2, 4)
    for bad in ("2x4rr", "r2x4", "2x"):
        with pytest.raises(ValueError, match="WxL"):
            BeamConfig.parse(bad)
    with pytest.raises(ValueError, match="per_root"):
        BeamConfig(2, 4, per_root=1)
    tree = BeamConfig.parse("4x5T")
    assert tree == BeamConfig(4, 5, tree=True)
    assert (tree.tree_nodes, tree.draft_rows) == (6, 1)
    assert (BeamConfig(2, 4).tree_nodes, BeamConfig(2, 4).draft_rows) == (9, 2)
    with pytest.raises(ValueError, match="exclude"):
        BeamConfig(2, 4, per_root=True, tree=True)


def test_beam_config_parses_cuts():
    cut = BeamConfig.parse("4x8t/4/2")
    assert cut == BeamConfig(4, 8, tree=True, cuts=(2, 4))
    assert cut.verify_sizes == (2, 4, 8) and str(cut) == "4x8t/2/4"
    assert BeamConfig(4, 8, tree=True).verify_sizes == (8,) and str(BeamConfig(2, 3)) == "2x3"
    assert BeamConfig.parse(str(BeamConfig(2, 3, per_root=True))).per_root
    costly = BeamConfig.parse("4x8t/4@0.1")
    assert costly == BeamConfig(4, 8, tree=True, cuts=(4,), node_cost=0.1)
    assert BeamConfig.parse(str(costly)) == costly and str(costly) == "4x8t/4@0.1"
    for bad, match in (("4x8/4", "best-first"), ("4x8t/8", "1..7"), ("4x8t/0", "1..7"),
                       ("4x8t/a", "integers"), ("4x8t@0.1", "needs cuts"),
                       ("4x8t/4@x", "node cost")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            BeamConfig.parse(bad)
    with pytest.raises(ValueError, match="tree=True"):
        BeamConfig(2, 4, cuts=(2,))
    with pytest.raises(ValueError, match="node_cost"):
        BeamConfig(2, 4, tree=True, cuts=(2,), node_cost=-1.0)


def test_length_one_is_top_w_of_first_distribution():
    config, params, target, llm_states, llm_tokens = setup("proj", seed=2)
    got = jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(5, 1), False)
    tokens, scores, _, _ = np_beam_search(config, params, target, llm_states, llm_tokens, 5, 1)
    assert got.log_probs is None
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.scores, scores, rtol=1e-4, atol=1e-4)


def test_width_above_draft_vocab_is_an_error():
    config, params, target, llm_states, llm_tokens = setup("reduced")
    with pytest.raises(ValueError, match="BeamConfig.width"):
        beam_search(params, config, target, llm_states[0], llm_tokens[0], BeamConfig(21, 2))


def np_sample(
    config, params, target, llm_states, llm_tokens, base_key, seq_ids, temps, top_k, width, length
):
    """Independent sampling vectorized by hand over [B, W]; only the draw itself is jax's."""
    tp, to_target = torch_layout(params, config), draft_to_target(config, target)
    batch = llm_states.shape[0]
    keys = [
        [
            jax.random.split(jax.random.fold_in(jax.random.fold_in(base_key, int(s)), w), length)
            for w in range(width)
        ]
        for s in seq_ids
    ]
    state = np.zeros((batch, width, config.hidden_size))
    tokens = np.repeat(llm_tokens[:, None, None].astype(np.int64), width, axis=1)
    token_lp = np.zeros((batch, width, 0))
    for t in range(length):
        state, log_probs = np_step(tp, config, target, llm_states[:, None], state, tokens[..., -1])
        tempered = log_probs / np.where(temps > 0, temps, 1.0)[:, None, None]
        kth = np.sort(tempered, -1)[..., -top_k][..., None]
        warped = np.where(tempered >= kth, tempered, -np.inf)
        warped = warped - np.log(np.exp(warped).sum(-1, keepdims=True))
        ids = np.argmax(warped, -1)
        for b in range(batch):
            for w in range(width):
                if temps[b] > 0:
                    row = jnp.asarray(warped[b, w], jnp.float32)
                    ids[b, w] = int(jax.random.categorical(keys[b][w][t], row))
        token_lp = np.concatenate([token_lp, np.take_along_axis(warped, ids[..., None], -1)], -1)
        tokens = np.concatenate([tokens, to_target[ids][..., None]], -1)
    return tokens, token_lp


@pytest.mark.parametrize("name", ["proj", "reduced_tied"])
def test_sampling_matches_hand_vectorized(name):
    config, params, target, llm_states, llm_tokens = setup(name, seed=3)
    beam, base_key = BeamConfig(2, 3), jax.random.key(42)
    seq_ids, temps = np.array([7, 0, 3]), np.array([0.8, 0.0, 1.5], np.float32)
    got = jit_samples(
        params,
        config,
        target,
        llm_states,
        llm_tokens,
        base_key,
        seq_ids,
        temps,
        beam,
        6,
        None,
        True,
    )
    tokens, token_lp = np_sample(
        config,
        params,
        target,
        llm_states,
        llm_tokens,
        base_key,
        seq_ids,
        temps,
        6,
        beam.width,
        beam.length,
    )
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.token_log_probs, token_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.scores, token_lp.sum(-1), rtol=1e-4, atol=1e-4)
    assert got.log_probs.shape == (B, 2, 3, config.draft_vocab)
    assert int(jnp.sum(got.log_probs[0, 0, 0] > -1e20)) == 6  # top-k 6 kept


def test_greedy_sampling_is_width_one_beam_search():
    config, params, target, llm_states, llm_tokens = setup("noproj", seed=4)
    beam = BeamConfig(1, 4)
    sampled = jit_samples(
        params,
        config,
        target,
        llm_states,
        llm_tokens,
        jax.random.key(0),
        np.arange(B),
        0.0,
        beam,
        None,
        None,
        False,
    )
    beams = jit_beams(params, config, target, llm_states, llm_tokens, beam, False)
    np.testing.assert_array_equal(sampled.tokens, beams.tokens)
    np.testing.assert_allclose(sampled.scores, beams.scores, rtol=1e-5, atol=1e-5)


def test_sampling_does_not_depend_on_batch_composition():
    config, params, target, llm_states, llm_tokens = setup("proj", seed=6)
    beam, key = BeamConfig(3, 3), jax.random.key(9)
    full = jit_samples(
        params,
        config,
        target,
        llm_states,
        llm_tokens,
        key,
        np.array([11, 12, 13]),
        3.0,
        beam,
        None,
        0.99,
        False,
    )
    alone = jit_samples(
        params,
        config,
        target,
        llm_states[1:2],
        llm_tokens[1:2],
        key,
        np.array([12]),
        3.0,
        beam,
        None,
        0.99,
        False,
    )
    np.testing.assert_array_equal(full.tokens[1:2], alone.tokens)
    assert len({tuple(r) for r in np.asarray(full.tokens[1])}) > 1, "beams should use distinct keys"


@pytest.mark.parametrize("case", ["proj", "noproj"])
def test_reference_golden_beams(case):
    """Beams and log-probs produced by the PyTorch reference's own beam_search_candidates
    (tests/data/make_reference_golden.py) on the weights saved beside them."""
    config, params = load_reference(GOLDEN / case)
    golden = load_file(str(GOLDEN / case / "golden.safetensors"))
    width, length = golden["beams"].shape[1], golden["beams"].shape[2] - 1
    target = TargetEmbeddings(jnp.asarray(golden["embed"]))
    got = jit_beams(
        params,
        config,
        target,
        golden["prompt_state"],
        golden["init_token"].astype(np.int32),
        BeamConfig(width, length),
        True,
    )
    np.testing.assert_array_equal(got.tokens, golden["beams"])
    np.testing.assert_allclose(got.log_probs, golden["log_probs"], rtol=1e-6, atol=1e-4)
    chosen = np.take_along_axis(golden["log_probs"], golden["beams"][..., 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got.scores, chosen.sum(-1), rtol=1e-5, atol=1e-4)


def np_best_first(config, params, target, llm_state, llm_token, width, length):
    """`BeamConfig.tree` for one prompt, by hand in float64: every candidate's distribution is
    recomputed along its whole path from the root (no cached states), and the frontier is a list
    searched for its best path score. -> the chosen paths (target ids) in order, and scores."""
    tp, to_target = torch_layout(params, config), draft_to_target(config, target)

    def children(path):  # path: draft ids after the LLM's token
        state, token = np.zeros(config.hidden_size), int(llm_token)
        for draft_id in (None, *path):
            token = token if draft_id is None else int(to_target[draft_id])
            state, log_probs = np_step(tp, config, target, llm_state, state, token)
        top = np.argsort(-log_probs, kind="stable")[:width]
        return [(tuple(path) + (int(i),), float(log_probs[i])) for i in top]

    frontier = [(path, lp) for path, lp in children(())]
    chosen = []
    while len(chosen) < length:
        best = max(range(len(frontier)), key=lambda i: (frontier[i][1], -i))
        path, score = frontier.pop(best)
        chosen.append((path, score))
        if len(chosen) < length:
            frontier += [(p, score + lp) for p, lp in children(path)]
    paths = [[int(llm_token)] + [int(to_target[i]) for i in p] for p, _ in chosen]
    return paths, np.array([s for _, s in chosen])


@pytest.mark.parametrize("name", ["proj", "tied", "reduced_tied"])
def test_best_first_tree_takes_the_likeliest_frontier_token_each_time(name):
    from drafter.drafting import NO_TOKEN

    config, params, target, llm_states, llm_tokens = setup(name)
    beam = BeamConfig(3, 5, tree=True)
    got = jit_beams(params, config, target, llm_states, llm_tokens, beam, False)
    assert got.tokens.shape == (B, 5, 6) and got.token_log_probs.shape == (B, 5, 5)
    for b in range(B):
        paths, scores = np_best_first(config, params, target, llm_states[b], llm_tokens[b], 3, 5)
        for w, path in enumerate(paths):
            row = np.asarray(got.tokens[b, w])
            np.testing.assert_array_equal(row[: len(path)], path)
            assert np.all(row[len(path) :] == NO_TOKEN)
            lp = np.asarray(got.token_log_probs[b, w])
            assert np.all(lp[len(path) - 1 :] == 0)
            np.testing.assert_allclose(lp.sum(), scores[w], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.scores[b], scores, rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(np.asarray(got.scores[b])) <= 1e-6)  # sorted, parents first
        depths = {len(p) - 1 for p in paths}
        assert len(depths) > 1  # a real tree here: paths of several depths


def test_best_first_tree_of_width_one_is_the_greedy_chain():
    config, params, target, llm_states, llm_tokens = setup("tied")
    chain = jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(1, 4), False)
    tree = jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(1, 4, tree=True),
                     False)  # fmt: skip
    np.testing.assert_array_equal(tree.tokens[:, -1], chain.tokens[:, 0])
    np.testing.assert_allclose(tree.scores[:, -1], chain.scores[:, 0], rtol=1e-5)
    with pytest.raises(ValueError, match="no draft distributions"):
        jit_beams(params, config, target, llm_states, llm_tokens, BeamConfig(2, 3, tree=True), True)
