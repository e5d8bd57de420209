"""pipeline.speculative: greedy equality with autoregressive decoding, exact sampling, sharding."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chi_square import goodness_of_fit

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import NO_TOKEN, Drafts
from drafter.model import init_params as init_drafter
from drafter.sampling import SamplingConfig, warp_log_probs
from pipeline import accept
from pipeline import speculative as spec
from pipeline.generate import generate
from pipeline.llm import LlamaConfig, causal_mask, forward, init_cache
from pipeline.llm import init_params as init_llm
from sharding import make_mesh, replicate, shard_jit

# Untied: a random tied model mostly repeats its last token; EOS 13 ends one row of the batch early.
CONFIG = LlamaConfig(16, 32, 64, 2, num_heads=4, num_kv_heads=2, head_dim=8,
                     tie_word_embeddings=False, eos_token_ids=(13,))  # fmt: skip
BEAM = BeamConfig(width=3, length=3)
DRAFTER = DrafterConfig(hidden_size=32, vocab_size=16, exit_dim=32)
GREEDY = SamplingConfig()


def run_spec(llm, draft_params, draft_fn, prompts, lengths, max_new, sampling=GREEDY, rule=None,
             config=CONFIG, key=0, row_ids=None):  # fmt: skip
    """max_new: an int or [B] per-row limits."""
    b = prompts.shape[0]
    row_ids = jnp.arange(b) if row_ids is None else row_ids
    max_new = np.broadcast_to(np.asarray(max_new, np.int32), (b,))
    return spec.generate_jit(
        llm, draft_params, jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(max_new),
        jax.random.key(key), row_ids, config, draft_fn, rule or spec.default_rule(sampling),
        sampling, int(max_new.max()), spec.draft_length(draft_fn), config.eos_token_ids,
    )  # fmt: skip


@dataclass(frozen=True)
class OracleDraft:
    """Drafts the target's own greedy chain (recomputed from the context), then spoils it at a
    depth that varies with the context length, so accepted lengths cover 0..L; the other beams
    branch off the chain. draft_params = the target's params."""

    config: LlamaConfig
    beam: BeamConfig

    def chain(self, llm, context, n):
        c = context.shape[0]
        mask = causal_mask(jnp.asarray([0]), 0, c)
        toks = []
        for _ in range(self.beam.length):
            out = forward(llm, self.config, context[None], jnp.arange(c)[None], init_cache(
                self.config, 1, 0), mask)  # fmt: skip
            nxt = jnp.argmax(out.logits[0, n - 1]).astype(jnp.int32)
            context, n = context.at[n].set(nxt), n + 1
            toks.append(nxt)
        return jnp.stack(toks)

    def __call__(self, llm, inputs: spec.DraftInputs) -> Drafts:
        w, length, v = self.beam.width, self.beam.length, self.config.vocab_size
        chain = self.chain(llm, inputs.context, inputs.num_context)
        spoil_at = inputs.num_context % (length + 1)  # == length: nothing spoiled
        d = jnp.arange(length)
        chain = jnp.where(d == spoil_at, (chain + 1) % v, chain)
        branches = [jnp.where(d >= (i % length), (chain + i) % v, chain) for i in range(1, w)]
        drafted = jnp.stack([chain, *branches])
        tokens = jnp.concatenate([jnp.full((w, 1), inputs.llm_token), drafted], 1)
        return Drafts(tokens, jnp.zeros((w,)), jnp.full((w, length), -1.0))


@pytest.fixture(scope="module")
def llm():
    return init_llm(CONFIG, jax.random.key(1))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = np.array([5, 2, 7, 1])
    toks = rng.integers(4, CONFIG.vocab_size, size=(4, 7)).astype(np.int32)
    return np.where(np.arange(7)[None] < lengths[:, None], toks, 0), lengths


def autoregressive(llm, prompts, lengths, max_new):
    return generate(llm, CONFIG, prompts, lengths, GREEDY, jax.random.key(0), max_new)


def assert_same_tokens(got, want):
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    for b, n in enumerate(np.asarray(want.lengths)):
        np.testing.assert_array_equal(np.asarray(got.tokens[b, :n]), np.asarray(want.tokens[b, :n]))


def test_greedy_equals_autoregressive_with_an_untrained_drafter(llm, prompts):
    draft = spec.BeamDraft(DRAFTER, BEAM)
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    got = run_spec(llm, draft_params, draft, *prompts, max_new=12)
    assert_same_tokens(got, autoregressive(llm, *prompts, 12))
    assert np.all(np.asarray(got.calls) >= 1)


def test_greedy_equals_autoregressive_with_an_oracle_drafter(llm, prompts):
    draft = OracleDraft(CONFIG, BEAM)
    got = run_spec(llm, llm, draft, *prompts, max_new=14)
    want = autoregressive(llm, *prompts, 14)
    assert_same_tokens(got, want)
    hist = np.asarray(got.accepted).sum(0)
    assert np.count_nonzero(hist) >= 3, hist  # accepted lengths vary, full acceptance included
    emitted = (hist * np.arange(1, BEAM.length + 2)).sum() / hist.sum()
    assert emitted > 2.0, hist  # far more than one token per target call
    assert np.all(np.asarray(got.calls) < np.asarray(want.lengths))
    ended = [int(want.tokens[b, n - 1]) in CONFIG.eos_token_ids for b, n in enumerate(want.lengths)]
    assert any(ended) and not all(ended)  # some rows stopped at EOS, the others at max_new


@dataclass(frozen=True)
class OracleTreeDraft(OracleDraft):
    """OracleDraft's (spoilt) chain as a best-first tree's L paths: depth 1, a wrong sibling at
    depth 2, then the chain's prefixes of depth 2..L-1, NO_TOKEN past each path's end; L nodes
    in all, so it fits the 1 + L slots of `BeamConfig.tree`."""

    @property
    def slots(self) -> int:
        return 1 + self.beam.length

    def __call__(self, llm, inputs: spec.DraftInputs) -> Drafts:
        length, v = self.beam.length, self.config.vocab_size
        chain = self.chain(llm, inputs.context, inputs.num_context)
        spoil_at = inputs.num_context % length  # == length - 1: the whole path of depth L-1 holds
        d = jnp.arange(length)
        chain = jnp.where(d == spoil_at, (chain + 1) % v, chain)
        full = jnp.concatenate([inputs.llm_token[None], chain])
        keep = [2, 3] + list(range(3, length + 1))  # columns kept per row: depths 1, 2, 2, 3, ...
        rows = [jnp.where(jnp.arange(length + 1) < k, full, NO_TOKEN) for k in keep]
        rows[1] = rows[1].at[2].set((full[2] + 1) % v)  # the sibling of the chain's depth 2
        return Drafts(jnp.stack(rows), jnp.zeros((length,)), jnp.zeros((length, length)))


@pytest.mark.parametrize("lookup", [False, True])
def test_greedy_equals_autoregressive_with_a_best_first_tree(llm, prompts, lookup):
    tree = BeamConfig(3, 4, tree=True)
    draft = spec.BeamDraft(DRAFTER, tree)
    if lookup:
        draft = spec.LookupDraft(draft, in_place=True)
    assert spec.draft_slots(draft) == 5
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    got = run_spec(llm, draft_params, draft, *prompts, max_new=12)
    assert_same_tokens(got, autoregressive(llm, *prompts, 12))
    oracle = OracleTreeDraft(CONFIG, tree)
    got = run_spec(llm, llm, oracle, *prompts, max_new=14)
    assert_same_tokens(got, autoregressive(llm, *prompts, 14))
    hist = np.asarray(got.accepted).sum(0)
    assert hist[0] > 0 and hist[3] > 0 and hist[4] == 0, hist  # the deepest path has depth 3


def test_max_new_tokens_per_row(llm, prompts):
    draft = OracleDraft(CONFIG, BEAM)
    max_new = np.array([1, 2, 14, 0])
    got = run_spec(llm, llm, draft, *prompts, max_new=max_new)
    assert_same_tokens(got, autoregressive(llm, *prompts, max_new))
    assert np.all(np.asarray(got.lengths) <= max_new)
    past_end = np.arange(14)[None, :] >= np.asarray(got.lengths)[:, None]
    assert np.all(np.asarray(got.tokens)[past_end] == 0)


# Losslessness: V=8, no EOS, sequences of 3 new tokens from one prompt; 512 possible outcomes.
SMALL = LlamaConfig(8, 16, 32, 1, num_heads=2, num_kv_heads=1, head_dim=8)
HOT = SamplingConfig(temperature=1.0, top_k=6)
PROMPT = np.array([1, 5, 2], np.int32)
NUM_SAMPLES = 16384


@dataclass(frozen=True)
class FixedDraft:
    """Deterministic drafts that ignore the target: W=3 beams sharing a first token, claimed
    draft probability 0.4 per token (what a mis-calibrated beam search would report)."""

    beam: BeamConfig = BeamConfig(width=3, length=2)

    def __call__(self, params, inputs: spec.DraftInputs) -> Drafts:
        t = inputs.llm_token
        tokens = jnp.stack([jnp.stack([t, (t + 1) % 8, (t + w + 2) % 8]) for w in range(3)])
        tokens = tokens.at[2, 1].set((t + 3) % 8)
        return Drafts(tokens, jnp.zeros((3,)), jnp.full((3, 2), jnp.log(0.4)))


def exact_three_token_law(small_llm):
    """[8, 8, 8] P(x1, x2, x3 | PROMPT) under the warped target, from one batched forward."""
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(64, 2)
    seqs = np.concatenate([np.tile(PROMPT, (64, 1)), grid], 1)
    t = seqs.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), (64, t))
    mask = causal_mask(jnp.zeros(64, jnp.int32), 0, t)
    out = forward(small_llm, SMALL, jnp.asarray(seqs), positions, init_cache(SMALL, 64, 0), mask)
    warp = lambda x: warp_log_probs(x, HOT.temperature, HOT.top_k)
    p = np.exp(np.asarray(jax.vmap(jax.vmap(warp))(out.logits)))  # [64, t, 8]
    p1 = p[0, len(PROMPT) - 1]  # [8]
    p2 = p[::8, len(PROMPT)]  # [8] rows x1 = 0..7 (x2 = 0) -> P(x2 | x1)
    p3 = p[:, len(PROMPT) + 1].reshape(8, 8, 8)
    return p1[:, None, None] * p2[:, :, None] * p3


def sampled_counts(small_llm, rule, draft=None, key=11, draft_params=None):
    """Counts of the NUM_SAMPLES 3-token outcomes (FixedDraft drafts unless `draft` is given)."""
    prompts = np.tile(PROMPT, (NUM_SAMPLES, 1))
    got = run_spec(small_llm, draft_params, draft or FixedDraft(), prompts,
                   np.full(NUM_SAMPLES, 3), 3, HOT, rule, SMALL, key=key)  # fmt: skip
    toks = np.asarray(got.tokens)
    assert np.all(np.asarray(got.lengths) == 3)
    counts = np.zeros((8, 8, 8))
    np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
    return counts, np.asarray(got.accepted).sum(0)


@dataclass(frozen=True)
class CalibratedTreeDraft(OracleTreeDraft):
    """OracleTreeDraft's tree with path probabilities that know where it is spoilt: 0.95 for a
    path the target will accept, 0.02 for one it will not."""

    def __call__(self, llm, inputs: spec.DraftInputs) -> Drafts:
        drafts = super().__call__(llm, inputs)
        length = self.beam.length
        spoil_at = inputs.num_context % length
        depth = (drafts.tokens != NO_TOKEN).sum(1) - 1  # [L] each path's depth
        right = (depth <= spoil_at) & (jnp.arange(length) != 1)  # row 1 is the wrong sibling
        return drafts._replace(scores=jnp.log(jnp.where(right, 0.95, 0.02)))


def best_first_drafts(llm, beam, rows=4, seed=3):
    """Best-first Drafts [rows, L, L+1] of the untrained drafter from random states."""
    from drafter.drafting import best_first

    params = init_drafter(DRAFTER, jax.random.key(seed))
    states = jax.random.normal(jax.random.key(seed + 1), (rows, DRAFTER.exit_dim))
    tokens = jnp.arange(rows, dtype=jnp.int32) + 4
    one = lambda s, t: best_first(params, DRAFTER, spec.target_embeddings(llm), s, t, beam)
    return jax.vmap(one)(states, tokens)


def test_a_cut_best_first_tree_is_its_first_k_nodes(llm):
    from pipeline.tree import pack_trees

    length = 5
    drafts = best_first_drafts(llm, BeamConfig(3, length, tree=True))
    for k in range(1, length):
        cut = spec.cut_tree(drafts, k)
        np.testing.assert_array_equal(cut.tokens, drafts.tokens[:, :k])  # nothing deeper than k
        assert np.all(np.asarray(pack_trees(cut.tokens, 1 + k).num_nodes) == 1 + k)
        row_k = jnp.asarray([k, 1, max(k - 1, 1), k])  # and each row to its own size
        per_row = spec.cut_tree(drafts, k, row_k)
        np.testing.assert_array_equal(np.asarray(pack_trees(per_row.tokens, 1 + k).num_nodes),
                                      1 + np.asarray(row_k))  # fmt: skip
        for b, kb in enumerate(np.asarray(row_k)):
            np.testing.assert_array_equal(per_row.tokens[b, :kb], drafts.tokens[b, :kb])
            assert np.all(np.asarray(per_row.tokens[b, kb:, 1:]) == NO_TOKEN)
    chain = jnp.broadcast_to(jnp.arange(length + 1, dtype=jnp.int32), (1, length, length + 1))
    copy = Drafts(chain, jnp.zeros((1, length)), jnp.zeros((1, length, length)))  # a lookup copy
    cut = spec.cut_tree(copy, 2)
    assert np.asarray(cut.tokens[0]).tolist() == [[0, 1, 2, NO_TOKEN, NO_TOKEN, NO_TOKEN]] * 2
    assert int(pack_trees(cut.tokens, 3).num_nodes[0]) == 3


def test_a_sampled_row_with_a_cut_tree_does_not_depend_on_its_batch(llm, prompts):
    """The batch chooses its cuts together (`pipeline.policy`), alone a row chooses its own, and
    each output index draws with its own key, so the sizes differ and the tokens do not."""
    tree = BeamConfig(3, 4, tree=True, cuts=(1, 2), node_cost=0.3)
    draft = spec.BeamDraft(DRAFTER, tree)
    params = jax.tree.map(lambda x: 3.0 * x, init_drafter(DRAFTER, jax.random.key(2)))
    draft_params = (params, spec.target_embeddings(llm))
    hot = SamplingConfig(temperature=1.0)
    rule = accept.sampling_rule(hot)
    toks, lengths = prompts
    together = run_spec(llm, draft_params, draft, toks, lengths, 12, hot, rule, key=7)
    sizes_differ = False
    for b in range(len(lengths)):
        alone = run_spec(llm, draft_params, draft, toks[b : b + 1], lengths[b : b + 1], 12, hot,
                         rule, key=7, row_ids=jnp.asarray([b]))  # fmt: skip
        n = int(together.lengths[b])
        assert int(alone.lengths[0]) == n
        np.testing.assert_array_equal(alone.tokens[0, :n], together.tokens[b, :n])
        sizes_differ |= not np.array_equal(alone.by_size[0], together.by_size[b])
    assert sizes_differ  # the test shows something: a row's choices did depend on its batch


def test_sampled_drafts_refuse_cuts():
    with pytest.raises(ValueError, match="best-first"):
        spec.SampledDraft(DRAFTER, BeamConfig(3, 4, tree=True, cuts=(2,)))


def test_greedy_equals_autoregressive_with_a_cut_tree(llm, prompts):
    """The batch verifies the size its drafts' path probabilities say pays at the tree's node
    cost (`pipeline.policy`): dearer nodes, fewer verified; the output is AR's at every cost."""
    per_call, deepest = [], []
    for node_cost in (0.02, 0.15, 0.5):
        tree = BeamConfig(3, 4, tree=True, cuts=(1, 2), node_cost=node_cost)
        got = run_spec(llm, llm, CalibratedTreeDraft(CONFIG, tree), *prompts, max_new=14)
        assert_same_tokens(got, autoregressive(llm, *prompts, 14))
        per_call.append(np.asarray(got.drafted).sum() / np.asarray(got.calls).sum())
        deepest.append(int(np.asarray(got.accepted).sum(0)[3]))
    assert per_call == sorted(per_call, reverse=True) and per_call[0] > per_call[-1], per_call
    assert deepest[0] > 0, deepest  # the whole tree's deepest path, where it was not cut
    full = run_spec(llm, llm, OracleTreeDraft(CONFIG, BeamConfig(3, 4, tree=True)), *prompts,
                    max_new=14)  # fmt: skip
    assert np.asarray(full.drafted).tolist() == (4 * np.asarray(full.calls)).tolist()
    # The untrained drafter with the lookup in place, cut where its probabilities say so.
    draft = spec.LookupDraft(spec.BeamDraft(DRAFTER, tree), in_place=True)
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    got = run_spec(llm, draft_params, draft, *prompts, max_new=12)
    assert_same_tokens(got, autoregressive(llm, *prompts, 12))


@pytest.fixture(scope="module")
def small_llm():
    params = init_llm(SMALL, jax.random.key(5))
    return dict(params, embed=params["embed"] * 0.2)  # a flatter target: many outcomes likely


def test_speculative_sampling_matches_the_target_law(small_llm):
    counts, hist = sampled_counts(small_llm, accept.sampling_rule(HOT))
    assert hist[1:].sum() > 0.1 * hist.sum(), hist  # drafts do get accepted
    assert goodness_of_fit(counts, exact_three_token_law(small_llm)) > 1e-3


def test_speculative_sampling_with_a_best_first_tree_matches_the_target_law(small_llm):
    """Trees of paths that end early (NO_TOKEN) and branch where the drafter is unsure."""
    config = DrafterConfig(hidden_size=16, vocab_size=8, exit_dim=16)
    draft = spec.BeamDraft(config, BeamConfig(3, 2, tree=True))
    params = jax.tree.map(lambda x: 3.0 * x, init_drafter(config, jax.random.key(4)))
    draft_params = (params, spec.target_embeddings(small_llm))
    counts, hist = sampled_counts(small_llm, accept.sampling_rule(HOT), draft, key=17,
                                  draft_params=draft_params)  # fmt: skip
    assert hist[1:].sum() > 0.1 * hist.sum(), hist
    assert goodness_of_fit(counts, exact_three_token_law(small_llm)) > 1e-3


def test_speculative_sampling_with_sampled_drafts_matches_the_target_law(small_llm):
    """Independent drafter samples (`SampledDraft`, the non-beam option): random drafts, drawn
    with their own keys, that may repeat one another; descending the packed tree with the
    target's own draws stays exact."""
    config = DrafterConfig(hidden_size=16, vocab_size=8, exit_dim=16)
    draft = spec.SampledDraft(config, BeamConfig(3, 2), SamplingConfig(temperature=1.0))
    params = jax.tree.map(lambda x: 3.0 * x, init_drafter(config, jax.random.key(4)))
    draft_params = (params, spec.target_embeddings(small_llm))
    law = exact_three_token_law(small_llm)
    counts, hist = sampled_counts(small_llm, accept.sampling_rule(HOT), draft, key=29,
                                  draft_params=draft_params)  # fmt: skip
    assert hist[1:].sum() > 0.1 * hist.sum(), hist
    assert goodness_of_fit(counts, law) > 1e-3
    # With these same drafts (the q its per-beam p/q test is meant for) the reference's rule fails.
    counts, _ = sampled_counts(small_llm, accept.ReferenceRule(HOT), draft, key=29,
                               draft_params=draft_params)  # fmt: skip
    assert goodness_of_fit(counts, law) < 1e-6


def test_speculative_sampling_with_a_cut_tree_matches_the_target_law(small_llm):
    """Rows cut their trees to different sizes (`BeamConfig.cuts`) in one batch."""
    config = DrafterConfig(hidden_size=16, vocab_size=8, exit_dim=16)
    draft = spec.BeamDraft(config, BeamConfig(3, 2, tree=True, cuts=(1,), node_cost=0.5))
    params = jax.tree.map(lambda x: 3.0 * x, init_drafter(config, jax.random.key(4)))
    draft_params = (params, spec.target_embeddings(small_llm))
    prompts = np.tile(PROMPT, (NUM_SAMPLES, 1))
    got = run_spec(small_llm, draft_params, draft, prompts, np.full(NUM_SAMPLES, 3), 3, HOT,
                   accept.sampling_rule(HOT), SMALL, key=23)  # fmt: skip
    calls, drafted = np.asarray(got.calls).sum(), np.asarray(got.drafted).sum()
    assert 1.1 * calls < drafted < 1.9 * calls, (calls, drafted)  # both sizes, often
    toks = np.asarray(got.tokens)
    counts = np.zeros((8, 8, 8))
    np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
    assert goodness_of_fit(counts, exact_three_token_law(small_llm)) > 1e-3


def test_the_reference_rule_fails_the_same_check(small_llm):
    counts, _ = sampled_counts(small_llm, accept.ReferenceRule(HOT))
    assert goodness_of_fit(counts, exact_three_token_law(small_llm)) < 1e-6


def test_greedy_equals_autoregressive_with_bf16_weights(llm, prompts):
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), llm)
    got = run_spec(half, half, OracleDraft(CONFIG, BEAM), *prompts, max_new=14)
    assert_same_tokens(got, autoregressive(half, *prompts, 14))


def test_sharded_over_4_devices_equals_unsharded(llm, prompts):
    hot = SamplingConfig(temperature=1.0)
    draft = spec.SampledDraft(DRAFTER, BEAM, hot)  # sampled drafts: keys must follow rows too
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    toks, lengths = prompts
    toks, lengths = np.concatenate([toks, toks[:1]]), np.concatenate([lengths, lengths[:1]])
    b = len(lengths)  # 5 rows: padded to 8 on 4 devices
    args = (jnp.asarray(toks), jnp.asarray(lengths), jnp.full((b,), 9, jnp.int32),
            jax.random.key(3), jnp.arange(b))  # fmt: skip
    static = (
        CONFIG,
        draft,
        spec.default_rule(hot),
        hot,
        9,
        BEAM.length,
        CONFIG.eos_token_ids,
        None,
    )
    mesh = make_mesh(4)
    sharded = shard_jit(spec.generate_core, mesh, spec.GENERATE_BATCH, spec.GENERATE_STATIC)
    got = sharded(replicate(llm, mesh), replicate(draft_params, mesh), *args, *static)
    want = spec.generate_jit(llm, draft_params, *args, *static)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # Same first row twice (ids 0 and 4) -> different draws: keys follow row ids.
    assert not np.array_equal(np.asarray(want.tokens[0]), np.asarray(want.tokens[4]))


@pytest.mark.parametrize(
    "make_draft",
    [
        lambda: OracleDraft(CONFIG, BEAM),  # long accepted runs
        lambda: spec.BeamDraft(DRAFTER, BEAM),  # an untrained drafter: mostly rejected
        lambda: spec.SampledDraft(DRAFTER, BEAM, SamplingConfig(temperature=1.0)),
        lambda: spec.BeamDraft(DRAFTER, BeamConfig(3, 3, tree=True, cuts=(1,), node_cost=0.5)),
    ],
    ids=["oracle", "beam", "sampled", "cut-tree"],
)
def test_sampled_output_is_token_for_token_autoregressive(llm, prompts, make_draft):
    """Seed-exact sampling: the target's token at output index p draws with fold_in(row key, p)
    in both decoders, so at temperature 0.8 a row's speculative output equals its
    autoregressive output, whatever the drafts, and also alone or in another batch."""
    hot = SamplingConfig(temperature=0.8, top_k=12)
    draft = make_draft()
    if isinstance(draft, OracleDraft):
        draft_params = llm
    else:
        draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    toks, lengths = prompts
    ids = jnp.asarray([7, 3, 11, 5], jnp.int32)
    want = generate(llm, CONFIG, jnp.asarray(toks), jnp.asarray(lengths), hot, jax.random.key(9),
                    14, row_ids=ids)  # fmt: skip
    got = run_spec(llm, draft_params, draft, toks, lengths, 14, hot, key=9, row_ids=ids)
    assert_same_tokens(got, want)
    alone = run_spec(llm, draft_params, draft, toks[2:3], lengths[2:3], 14, hot, key=9,
                     row_ids=ids[2:3])  # fmt: skip
    n = int(want.lengths[2])
    np.testing.assert_array_equal(np.asarray(alone.tokens[0, :n]), np.asarray(want.tokens[2, :n]))
    if isinstance(draft, OracleDraft):
        assert np.asarray(got.accepted)[:, 1:].sum() > 0  # drafts were accepted, not only bonuses
