"""pipeline.policy: the goodput choice of draft and verify sizes, its calibration and probes."""

import jax.numpy as jnp
import numpy as np
import pytest

from drafter.config import BeamConfig
from drafter.drafting import Drafts
from pipeline import policy

SIZES = (1, 2, 4)


def costs(verify, draft=(0.0, 0.0, 0.0), ar=None):
    return policy.StepCosts(SIZES, draft, verify, ar)


def tree_drafts(path_probs):
    p = jnp.asarray(path_probs, jnp.float32)
    return Drafts(jnp.zeros((*p.shape, 5), jnp.int32), jnp.log(p), jnp.zeros((*p.shape, 4)))


def test_expected_accepted_sums_a_trees_path_probabilities():
    drafts = tree_drafts([[0.9, 0.5, 0.1, 0.05], [1.0, 1.0, 1.0, 1.0]])
    got = policy.expected_accepted(drafts, SIZES, tree=True)
    np.testing.assert_allclose(got, [[0.9, 1.4, 1.55], [1, 2, 4]], rtol=1e-6)
    # Beams: the best candidate's prefix probability at each depth, summed.
    lp = jnp.log(jnp.asarray([[[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 1.0, 1.0]]]))
    beams = Drafts(jnp.zeros((1, 2, 5), jnp.int32), lp.sum(-1), lp)
    np.testing.assert_allclose(
        policy.expected_accepted(beams, SIZES, tree=False),
        [[0.9, 0.9 + 0.25, 0.9 + 0.25 + 0.125 + 0.09]],
        rtol=1e-6,
    )


def test_verify_choice_weighs_expected_tokens_against_the_verify_cost():
    state = policy.init_state(costs((1.0, 1.0, 1.0)))
    expected = jnp.asarray([[0.9, 1.4, 1.55], [1.0, 2.0, 4.0], [0.1, 0.11, 0.13]])
    active = jnp.asarray([True, True, True])
    pick = lambda c, drafted=3: int(
        policy.verify_choice(state, c, expected, active, drafted, drafted)
    )
    # Batch tokens 3 + (2.0, 3.51, 5.68): free nodes verify the most; linear costs per node
    # 1 + 0.5k: 5.0 / 1.5 = 3.33, 6.51 / 2 = 3.26, 8.68 / 3 = 2.89: one drafted token.
    assert pick(costs((1.0, 1.0, 1.0))) == 3
    assert pick(costs((1.5, 2.0, 3.0))) == 1
    assert pick(costs((9.0, 9.5, 9.9)), drafted=1) == 1  # without an AR choice, at least one
    # With an AR step at 0.8: 3 tokens / 0.8 beats 5.0 / 1.5; at 1.0 it does not.
    assert pick(costs((1.5, 2.0, 3.0), ar=0.8)) == 0
    assert pick(costs((1.5, 2.0, 3.0), ar=1.0)) == 1
    assert pick(costs((1.0, 1.0, 1.0)), drafted=2) == 2  # never more than was drafted
    # Finished rows count for nothing: row 1 alone makes 4 drafted tokens pay.
    alone = policy.verify_choice(
        state, costs((1.5, 2.0, 3.0), ar=1.0), expected, jnp.asarray([False, True, False]), 3, 3
    )
    assert int(alone) == 3  # 5 / 3 > 1 / 1
    # A probe (drafted above the unprobed choice) verifies what it drafted.
    probe = policy.verify_choice(state, costs((1.5, 2.0, 3.0), ar=0.8), expected, active, 2, 0)
    assert int(probe) == 2


def test_draft_choice_drafts_what_pays_and_probes_one_size_up():
    c = costs((2.0, 2.2, 2.6), draft=(0.2, 0.4, 0.8), ar=1.0)
    state = policy.init_state(c)  # optimistic: every drafted token expected accepted
    drafted, unprobed = policy.draft_choice(state, c, jnp.float32(4))
    assert int(drafted) == int(unprobed) == 3  # 4 x 5 / 3.4 = 5.9 beats 4 / 1.0
    poor = state._replace(est=jnp.asarray([0.3, 0.4, 0.45]))
    drafted, unprobed = policy.draft_choice(poor, c, jnp.float32(4))
    assert int(drafted) == int(unprobed) == 0  # an AR step
    drafted, unprobed = policy.draft_choice(poor._replace(wait=jnp.int32(0)), c, jnp.float32(4))
    assert (int(drafted), int(unprobed)) == (1, 0)  # the probe drafts one token


def test_accepted_by_size_reads_each_cuts_acceptance_from_the_verified_tree():
    n = -2  # NO_TOKEN
    # Paths in the order chosen: a, a-b, c, a-b-d; the target accepted a, b (candidate 1).
    tokens = jnp.asarray([[[9, 1, n, n], [9, 1, 2, n], [9, 3, n, n], [9, 1, 2, 4]]], jnp.int32)
    drafts = Drafts(tokens, jnp.zeros((1, 4)), jnp.zeros((1, 4, 3)))
    got = policy.accepted_by_size(drafts, jnp.asarray([1]), jnp.asarray([2]), (1, 2, 3, 4), True)
    assert got.tolist() == [[1, 2, 2, 2]]
    got = policy.accepted_by_size(drafts, jnp.asarray([3]), jnp.asarray([3]), (1, 2, 3, 4), True)
    assert got.tolist() == [[1, 2, 2, 3]]  # all of a-b-d: cut to 3 paths, a-b
    beams = policy.accepted_by_size(drafts, jnp.asarray([0]), jnp.asarray([2]), (3,), False)
    assert beams.tolist() == [[2]]


def test_update_calibrates_each_size_by_what_it_accepted_and_backs_off_probes():
    c = costs((2.0, 2.2, 2.6), draft=(0.2, 0.4, 0.8), ar=1.0)
    state = policy.init_state(c)
    expected = jnp.asarray([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    active = jnp.asarray([True, True])
    # The drafter promised 1, 2 and 4 a row; 0.5, 0.5 and 1 were accepted: the estimates fall.
    observed = jnp.asarray([[1, 1, 2], [0, 0, 0]])
    for _ in range(40):
        state = policy.update(state, c, expected, active, 3, 3, observed, 3)
    np.testing.assert_allclose(policy.calibration(state), [0.5, 0.25, 0.25], atol=0.05)
    np.testing.assert_allclose(state.est, [0.5, 0.5, 1.0], atol=0.1)
    assert int(policy.draft_choice(state, c, jnp.float32(2))[1]) == 0  # AR, unprobed
    # Verifying size 1 shows nothing of sizes 2 and 4.
    one = policy.update(state, c, expected, active, 3, 1, observed * 0 + 1, 3)
    assert float(policy.calibration(one)[0]) > float(policy.calibration(state)[0])
    np.testing.assert_array_equal(policy.calibration(one)[1:], policy.calibration(state)[1:])
    # An AR step changes no estimate; probes that change nothing double the wait.
    ar_state = policy.update(state, c, expected, active, 0, 0, observed, 0)
    np.testing.assert_array_equal(ar_state.est, state.est)
    assert int(ar_state.backoff) == policy.PROBE_MIN  # the choice moved (3 -> 0)
    probed = policy.update(ar_state, c, expected * 0.1, active, 1, 1, observed * 0, 0)
    assert int(probed.backoff) == int(probed.wait) == 2 * policy.PROBE_MIN


def test_step_costs_validate_and_model_a_beam():
    model = policy.StepCosts.for_beam(BeamConfig(4, 8, tree=True, cuts=(1, 2, 4), node_cost=0.1))
    assert model.sizes == (1, 2, 4, 8) and model.ar is None
    np.testing.assert_allclose(model.verify, (1.1, 1.2, 1.4, 1.8))
    with pytest.raises(ValueError, match="ascend"):
        policy.StepCosts((2, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="positive"):
        policy.StepCosts((1,), (0,), (1,), ar=0.0)
