"""Goodput-adaptive speculation: each decode step, how much to draft and how much to verify.

A step of a batch of B rows costs what B x nodes rows of the target's forward cost, plus the
drafting; which of those dominates depends on the machine (on a 2-core CPU a forward of 72 rows
costs 5.5x one of 8, on a GPU little more). So the decode loop (`pipeline.speculative.decode`)
chooses per step, for the rows active now, among the sizes a draft tree may take (0: a plain
autoregressive step that skips the drafter), the one with the most expected tokens per unit of
cost (SmartSpec's goodput, arXiv 2406.14066):

1. before drafting, the draft size D: expected tokens (`est`, per active row, the drafter's own
   path probabilities of recent steps scaled by the acceptance actually observed) over
   `StepCosts.draft[D] + StepCosts.verify[D]`, against one token per row over `StepCosts.ar`;
2. after drafting D tokens (a best-first tree of D tokens is the first D of a larger one), the
   verified size k <= D from this step's own path probabilities: the drafting is paid, so only
   `verify[k]` counts (k = 0 verifies the root alone);
3. after verifying: per size, the calibration (accepted / predicted, decayed sums; what a
   verified tree accepted is also what each of its cuts would have accepted, since the target's
   token at a node does not depend on the tree, `accepted_by_size`) and `est`.

Estimates above the drafted size are not refreshed by a step, so every `wait` steps the choice is
probed one size up, drafted and verified at that size, with the wait doubling while probes
change nothing (a probe costs one larger step). Choices are batch-level and change no output:
a row's tokens are its autoregressive tokens whatever is drafted (`pipeline.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from drafter.drafting import NO_TOKEN

# Decay of the calibration's sums per verify step: about the last 20 steps count.
CALIBRATION_DECAY = 0.95
# Steps between probes one size above the choice: doubling from PROBE_MIN while a probe leaves the
# choice as it was, back to PROBE_MIN when the choice moves.
PROBE_MIN, PROBE_MAX = 4, 64


@dataclass(frozen=True)
class StepCosts:
    """What one decode step of a batch costs, per size (any unit; `tree_costs` measures ms).

    `sizes`: drafted tokens a step may draft and verify, ascending (a best-first tree's cuts and
    its length, or a beam's length alone). `draft[i]`: drafting `sizes[i]` tokens for the batch;
    `verify[i]`: the target's forward over 1 + sizes[i] nodes a row (1 + W*L for beams).
    `ar`: a plain step, one node a row and no drafting (None: always draft, as with the linear
    model `for_beam`). `rows`: the batch rows on one device these were measured at."""

    sizes: tuple[int, ...]
    draft: tuple[float, ...]
    verify: tuple[float, ...]
    ar: float | None = None
    rows: int = 1
    measured: bool = False

    def __post_init__(self):
        n = len(self.sizes)
        if n < 1 or list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"StepCosts.sizes must ascend from >= 1, got {self.sizes}")
        if len(self.draft) != n or len(self.verify) != n:
            raise ValueError(f"StepCosts: one draft and one verify cost per size {self.sizes}")
        if not all(c > 0 for c in self.verify) or not all(c >= 0 for c in self.draft):
            raise ValueError(f"StepCosts: costs must be positive, got {self}")
        if self.ar is not None and not self.ar > 0:
            raise ValueError(f"StepCosts.ar must be positive or None, got {self.ar}")

    @classmethod
    def for_beam(cls, beam) -> StepCosts:
        """The linear model of an unmeasured `BeamConfig`: verifying k tokens costs
        1 + node_cost * k, drafting nothing, and every step drafts."""
        sizes = beam.verify_sizes
        return cls(sizes, (0.0,) * len(sizes), tuple(1.0 + beam.node_cost * k for k in sizes))

    def as_dict(self) -> dict:
        return {"sizes": list(self.sizes), "draft": list(self.draft),
                "verify": list(self.verify), "ar": self.ar, "rows": self.rows,
                "measured": self.measured}  # fmt: skip


class PolicyState(NamedTuple):
    """The policy's carry in the decode loop (scalars and [S] arrays, not per row)."""

    est: jax.Array  # [S] expected accepted drafted tokens per active row at each size
    calib_num: jax.Array  # [S] decayed sums of accepted drafted tokens, per size
    calib_den: jax.Array  # [S] decayed sums of what the drafter's path probabilities predicted
    wait: jax.Array  # [] int32 steps until the next probe
    backoff: jax.Array  # [] int32 the wait set after a probe
    last: jax.Array  # [] int32 the last unprobed choice (0 = AR, i + 1 = sizes[i])


def init_state(costs: StepCosts) -> PolicyState:
    """Optimistic: every drafted token expected accepted, so the first step drafts the most that
    pays on that assumption, and the drafts then say what they are worth."""
    return PolicyState(
        est=jnp.asarray(costs.sizes, jnp.float32),
        calib_num=jnp.ones((len(costs.sizes),), jnp.float32),
        calib_den=jnp.ones((len(costs.sizes),), jnp.float32),
        wait=jnp.full((), PROBE_MIN, jnp.int32),
        backoff=jnp.full((), PROBE_MIN, jnp.int32),
        last=jnp.full((), len(costs.sizes), jnp.int32),
    )


def _ar_rate(costs: StepCosts, rows):
    return rows / costs.ar if costs.ar is not None else jnp.full_like(rows, -jnp.inf)


def draft_choice(policy: PolicyState, costs: StepCosts, n_active):
    """([] int32 the size to draft: 0 = none (an AR step), i + 1 = sizes[i]; [] the unprobed
    choice). n_active [] float rows still decoding. Drafting size i is worth the best of
    verifying any k <= i after it (`verify_choice`); among equals the largest is drafted (its
    drafts say the most)."""
    s = len(costs.sizes)
    tokens = n_active * (1.0 + policy.est)  # [S] at each verified size
    cost = jnp.asarray(costs.draft)[:, None] + jnp.asarray(costs.verify)[None, :]  # [D, k]
    upto = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]
    rates = jnp.where(upto, tokens[None, :] / cost, -jnp.inf).max(1)  # [D]
    rates = jnp.concatenate([_ar_rate(costs, n_active)[None], rates])
    best = (s - jnp.argmax(rates[::-1] >= rates.max() * (1 - 1e-6))).astype(jnp.int32)
    probe = (policy.wait <= 0) & (best < s)
    return jnp.where(probe, best + 1, best), best


def expected_accepted(drafts, sizes: tuple[int, ...], tree: bool):
    """[B, S] drafted tokens the drafter expects accepted at each size, from its own path
    probabilities: a best-first tree's first k paths sum to the expected accepted length of the
    tree they form (`drafter.drafting.best_first`); beams: the best candidate per depth."""
    if tree:
        cum = jnp.cumsum(jnp.exp(drafts.scores), axis=1)  # [B, L]; padded paths carry -inf
        return cum[:, jnp.asarray(sizes) - 1]
    prefix = jnp.exp(jnp.cumsum(drafts.token_log_probs, axis=-1)).max(axis=1)  # [B, L]
    return jnp.cumsum(prefix, axis=1)[:, jnp.asarray(sizes) - 1]


def accepted_by_size(drafts, beam, length, sizes: tuple[int, ...], tree: bool):
    """[B, S] drafted tokens each size would have accepted, from a step that accepted `length`
    [B] tokens of candidate `beam` [B]: a best-first tree's cut to k keeps its first k paths, and
    the accepted path's nodes among them are what that cut accepts (the target picks the same
    token at a node whatever else the tree holds). Beams verify all or nothing: `length`."""
    if not tree:
        return jnp.broadcast_to(length[:, None], (length.shape[0], len(sizes)))
    tokens = drafts.tokens  # [B, L, L+1], candidate w the path to the (w+1)-th chosen token
    depth = (tokens[:, :, 1:] != NO_TOKEN).sum(-1)  # [B, L]
    path = jnp.take_along_axis(tokens, beam[:, None, None], axis=1)  # [B, 1, L+1]
    cols = jnp.arange(tokens.shape[2])[None, None, :]
    same = (tokens == path) | (cols > depth[..., None])  # [B, L, L+1]
    on_path = same.all(-1) & (depth >= 1) & (depth <= length[:, None])  # [B, L]
    counted = jnp.cumsum(on_path, axis=1)  # [B, L] accepted among the first w+1 paths
    return counted[:, jnp.asarray(sizes) - 1]


def calibration(policy: PolicyState):
    """[S] accepted over predicted, per size."""
    return policy.calib_num / jnp.maximum(policy.calib_den, 1e-6)


def verify_choice(policy: PolicyState, costs: StepCosts, expected, active, drafted, unprobed):
    """[] int32 the size to verify, 0 (root alone) .. `drafted` (the index the drafts were made
    at): the most expected tokens per verify cost, the drafting being paid already. A probe
    (`drafted` above `unprobed`) verifies what it drafted, so that size's calibration learns."""
    n = active.sum().astype(jnp.float32)
    mean = (expected * active[:, None]).sum(0)  # [S]
    tokens = n + calibration(policy) * mean
    rates = jnp.concatenate([_ar_rate(costs, n)[None], tokens / jnp.asarray(costs.verify)])
    allowed = jnp.arange(len(costs.sizes) + 1) <= drafted
    if costs.ar is None:
        allowed = allowed & (jnp.arange(len(costs.sizes) + 1) > 0)
    best = jnp.argmax(jnp.where(allowed, rates, -jnp.inf)).astype(jnp.int32)
    return jnp.where(drafted > unprobed, drafted, best)


def update(policy: PolicyState, costs: StepCosts, expected, active, drafted, verified, observed,
           unprobed) -> PolicyState:  # fmt: skip
    """The state after a step that drafted at index `drafted`, verified at `verified` (0 = none;
    i = sizes[i - 1]), with `observed` [B, S] what each size accepted (`accepted_by_size`, read
    where the size is at most the verified one); `unprobed` the choice before any probe."""
    act = active.astype(jnp.float32)
    n = jnp.maximum(act.sum(), 1.0)
    s = len(costs.sizes)
    known = (jnp.arange(s) < verified) & (act.sum() > 0)  # sizes whose acceptance this step shows
    num = CALIBRATION_DECAY * policy.calib_num + (observed * act[:, None]).sum(0)
    den = CALIBRATION_DECAY * policy.calib_den + (expected * act[:, None]).sum(0)
    policy = policy._replace(calib_num=jnp.where(known, num, policy.calib_num),
                             calib_den=jnp.where(known, den, policy.calib_den))  # fmt: skip
    fresh = calibration(policy) * (expected * act[:, None]).sum(0) / n  # [S]
    seen = (jnp.arange(s) < drafted) & (act.sum() > 0)
    policy = policy._replace(est=jnp.where(seen, fresh, policy.est))
    probed = drafted != unprobed
    moved = unprobed != policy.last
    backoff = jnp.where(moved, PROBE_MIN,
                        jnp.where(probed, jnp.minimum(2 * policy.backoff, PROBE_MAX),
                                  policy.backoff))  # fmt: skip
    wait = jnp.where(probed | moved, backoff, policy.wait - 1)
    return policy._replace(wait=wait.astype(jnp.int32), backoff=backoff.astype(jnp.int32),
                           last=unprobed)  # fmt: skip
