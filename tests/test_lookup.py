"""drafter.lookup and the LookupDraft candidate: what it copies, and that decoding stays exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chi_square import goodness_of_fit
from test_speculative import (
    BEAM,
    CONFIG,
    DRAFTER,
    HOT,
    SMALL,
    FixedDraft,
    assert_same_tokens,
    autoregressive,
    exact_three_token_law,
    run_spec,
    sampled_counts,
)

from drafter.lookup import lookup_candidate
from drafter.model import init_params as init_drafter
from pipeline import accept
from pipeline import speculative as spec
from pipeline.engine import EngineConfig
from pipeline.llm import init_params as init_llm


def reference_lookup(context, length, max_ngram):
    """Plain Python: the longest suffix n-gram seen before, its latest occurrence, what followed.
    -> (copied tokens, zero-padded; how many are real; the n-gram's length)."""
    for n in range(max_ngram, 0, -1):
        if len(context) <= n:
            continue
        suffix = context[-n:]
        for p in range(len(context) - n - 1, -1, -1):
            if context[p : p + n] == suffix:
                copied = context[p + n : p + n + length]
                return copied + [0] * (length - len(copied)), len(copied), n
    return [0] * length, 0, 0


def run_lookup(context, length=3, max_ngram=4, pad=5):
    padded = jnp.asarray(list(context) + [7] * pad, jnp.int32)  # padding must be ignored
    tokens, valid, ngram = jax.jit(lookup_candidate, static_argnums=(2, 3))(
        padded, jnp.int32(len(context)), length, max_ngram
    )
    return [int(t) for t in tokens], int(np.asarray(valid).sum()), int(ngram)


def test_copies_what_followed_the_suffix():
    assert run_lookup([5, 6, 7, 8, 9, 5, 6]) == ([7, 8, 9], 3, 2)


def test_prefers_the_longest_ngram_then_the_latest_occurrence():
    # "1 2 3" occurred once (then 9); "3" alone occurred later (then 4): the 3-gram wins.
    assert run_lookup([1, 2, 3, 9, 3, 4, 1, 2, 3], length=2) == ([9, 3], 2, 3)
    # "5 3" occurred once (then 9); "3" alone later (then 4): the 2-gram wins.
    assert run_lookup([5, 3, 9, 3, 4, 5, 3], length=2) == ([9, 3], 2, 2)
    # "1" occurred twice: the later occurrence (followed by 6) wins.
    assert run_lookup([1, 5, 2, 1, 6, 1], length=2) == ([6, 1], 2, 1)
    # At most max_ngram tokens are matched.
    assert run_lookup([1, 2, 3, 4, 5, 1, 2, 3, 4], length=1, max_ngram=2)[2] == 2


def test_stops_at_the_end_of_the_context_and_finds_nothing_without_a_repeat():
    assert run_lookup([4, 8, 4], length=3) == ([8, 4, 0], 2, 1)
    assert run_lookup([1, 2, 3, 4], length=3) == ([0, 0, 0], 0, 0)
    assert run_lookup([1], length=2) == ([0, 0], 0, 0)


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_a_plain_python_search_on_random_contexts(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 30))
        context = [int(t) for t in rng.integers(0, 4, size=n)]
        max_ngram = int(rng.integers(1, 5))
        want = reference_lookup(context, 3, max_ngram)
        assert run_lookup(context, 3, max_ngram) == want, (context, max_ngram)


@pytest.fixture(scope="module")
def llm():
    return init_llm(CONFIG, jax.random.key(1))


def repetitive_prompts():
    """Prompts that repeat a phrase, as answers that quote their question do."""
    phrase = [4, 9, 6, 11, 5]
    rows = [phrase * 2 + [4, 9], [7, 8] + phrase + phrase[:3], [3, 12, 10, 3, 12]]
    width = max(map(len, rows))
    toks = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    return toks, np.array([len(r) for r in rows])


@pytest.mark.parametrize("in_place", [False, True])
def test_greedy_with_a_lookup_candidate_equals_autoregressive(llm, in_place):
    prompts = repetitive_prompts()
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    base = spec.BeamDraft(DRAFTER, BEAM)
    draft = spec.LookupDraft(base, 3, in_place)
    with_lookup = run_spec(llm, draft_params, draft, *prompts, max_new=16)
    assert_same_tokens(with_lookup, autoregressive(llm, *prompts, 16))
    alone = run_spec(llm, draft_params, base, *prompts, max_new=16)
    per_call = lambda out: float(np.asarray(out.lengths).sum() / np.asarray(out.calls).sum())
    # The untrained drafter rarely guesses right; copying the context does on repeats.
    assert per_call(with_lookup) > per_call(alone) + 0.2, (per_call(with_lookup), per_call(alone))


def lookup_drafts(llm, in_place, context, num_context):
    draft_params = (init_drafter(DRAFTER, jax.random.key(2)), spec.target_embeddings(llm))
    base = spec.BeamDraft(DRAFTER, BEAM)
    context = jnp.asarray(context, jnp.int32)
    inputs = spec.DraftInputs(jnp.ones((CONFIG.hidden_size,)), context[num_context - 1],
                              jax.random.key(0), context, jnp.int32(num_context))  # fmt: skip
    return base(draft_params, inputs), spec.LookupDraft(base, 2, in_place)(draft_params, inputs)


def test_lookup_draft_adds_a_candidate(llm):
    beams, drafts = lookup_drafts(llm, False, [3, 4, 5, 3, 4, 0, 0], 5)
    w, length = BEAM.width + 1, BEAM.length
    assert drafts.tokens.shape == (w, length + 1)
    assert drafts.token_log_probs.shape == (w, length) and drafts.scores.shape == (w,)
    np.testing.assert_array_equal(drafts.tokens[:-1], beams.tokens)
    # "3 4" occurred before, followed by 5 3 4: the last candidate is the LLM's token, then that.
    assert [int(t) for t in drafts.tokens[-1]] == [4, 5, 3, 4]
    # Nothing to copy: the extra candidate repeats the first beam (one more path, no new nodes).
    beams, drafts = lookup_drafts(llm, False, [3, 4, 5, 6, 0], 4)
    np.testing.assert_array_equal(drafts.tokens[-1], beams.tokens[0])
    assert spec.LookupDraft(spec.BeamDraft(DRAFTER, BEAM)).beam == BEAM


def test_lookup_draft_in_place_replaces_the_last_beam_on_a_two_token_match(llm):
    beams, drafts = lookup_drafts(llm, True, [3, 4, 5, 3, 4, 0, 0], 5)
    assert drafts.tokens.shape == beams.tokens.shape
    np.testing.assert_array_equal(drafts.tokens[:-1], beams.tokens[:-1])
    assert [int(t) for t in drafts.tokens[-1]] == [4, 5, 3, 4]
    # A one-token match ("4" then 5) is too weak to give up a beam for.
    beams, drafts = lookup_drafts(llm, True, [4, 5, 6, 4, 0], 4)
    for field in ("tokens", "scores", "token_log_probs"):
        np.testing.assert_array_equal(getattr(drafts, field), getattr(beams, field))


@pytest.fixture(scope="module")
def small_llm():
    params = init_llm(SMALL, jax.random.key(5))
    return dict(params, embed=params["embed"] * 0.2)


def test_speculative_sampling_with_a_lookup_candidate_matches_the_target_law(small_llm):
    draft = spec.LookupDraft(FixedDraft(), 2, in_place=False)
    counts, _ = sampled_counts(small_llm, accept.sampling_rule(HOT), draft, key=13)
    assert goodness_of_fit(counts, exact_three_token_law(small_llm)) > 1e-3


def test_engine_config_rejects_a_negative_lookup():
    with pytest.raises(ValueError, match="EngineConfig.lookup"):
        EngineConfig(lookup=-1)
