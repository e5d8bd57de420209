"""Greedy acceptance of a drafter on held-out self-distillation data, without running the LLM.

Under greedy verification the LLM's output does not depend on the drafts, so its greedy answer
(stored in `DistillData` with its hidden states) is also what speculative decoding would emit.
Replaying the decode loop against it gives the exact number of LLM calls: at each call the drafter
beam-searches from (hidden[j], answer[j]); the longest beam prefix that agrees with the answer is
accepted, and the LLM's next token is the bonus. Tokens per call counts accepted drafts plus the
bonus token. (The engine's tree verification computes hidden states through a different
attention layout, so its figures can differ by float noise only.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import beam_search
from drafter.model import TargetEmbeddings
from drafter.train import accepted_length
from pipeline.distill import DistillData


def eval_walk(draft_fn, hidden, answer, length, depth: int):
    """One answer: [A, D], [A] ids, [] length -> (calls [], tokens [], hist [L+1]).

    `draft_fn(llm_state [D], token []) -> [W, L+1]` draft target ids. `hist[n]` counts the calls
    that accepted n drafts; `tokens` is how many answer tokens the calls produced.
    """
    a = answer.shape[0]

    def body(state):
        j, calls, hist = state
        drafts = draft_fn(hidden[j], answer[j])
        idx = j + jnp.arange(depth + 1)
        # Drafts may match up to answer[length-2]; answer[length-1] is then the last call's bonus.
        continuation = jnp.where(idx < length - 1, answer[jnp.minimum(idx, a - 1)], -1)
        n = accepted_length(drafts, continuation)
        return j + n + 1, calls + 1, hist.at[n].add(1)

    def cond(state):
        return state[0] < length - 1

    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((depth + 1,), jnp.int32))
    j, calls, hist = jax.lax.while_loop(cond, body, init)
    return calls, j, hist


def _padded(data: DistillData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> answers [S, A], hidden [S, A, D] f32, lengths [S] (zero-padded)."""
    lengths = data.lengths()
    a = int(max(lengths.max(), 1))
    answers = np.zeros((data.num_sequences, a), np.int32)
    hidden = np.zeros((data.num_sequences, a, data.hidden_size), np.float32)
    for s in range(data.num_sequences):
        ans, hid = data.sequence(s)
        answers[s, : len(ans)] = ans
        hidden[s, : len(ans)] = hid
    return answers, hidden, lengths.astype(np.int32)


def _walk_all(params, config, target, beam, hidden, answers, lengths):
    def draft_fn(llm_state, token):
        return beam_search(params, config, target, llm_state, token, beam).tokens

    walk = lambda h, a, n: eval_walk(draft_fn, h, a, n, beam.length)
    return jax.vmap(walk)(hidden, answers, lengths)


_walk_jit = jax.jit(_walk_all, static_argnums=(1, 3))


def acceptance(params, config: DrafterConfig, target: TargetEmbeddings, data: DistillData,
               beam: BeamConfig, chunk: int = 16) -> dict:  # fmt: skip
    """Greedy acceptance figures over all sequences of `data` (chunked to bound memory).

    mean_tokens_per_call: (accepted drafts + bonus) per LLM call, pooled over all calls.
    per_depth_acceptance[k-1]: fraction of calls that accepted at least k drafts.
    """
    answers, hidden, lengths = _padded(data)
    calls, tokens, hist = [], [], []
    for lo in range(0, len(lengths), chunk):
        sl = slice(lo, lo + chunk)
        out = _walk_jit(params, config, target, beam, hidden[sl], answers[sl], lengths[sl])
        for acc, x in zip((calls, tokens, hist), out, strict=True):
            acc.append(np.asarray(x))
    calls, tokens, hist = (np.concatenate(x) for x in (calls, tokens, hist))
    total_calls = max(int(calls.sum()), 1)
    pooled = hist.sum(axis=0)
    at_least = pooled[::-1].cumsum()[::-1][1:] / total_calls
    return {
        "mean_tokens_per_call": float(tokens.sum() / total_calls),
        "per_depth_acceptance": [round(float(x), 4) for x in at_least],
        "accepted_histogram": [int(x) for x in pooled],
        "calls": int(calls.sum()),
        "tokens": int(tokens.sum()),
        "sequences": int(len(lengths)),
        # per_root / tree only when set, so records of plain beams keep their old form
        "beam": {
            "width": beam.width,
            "length": beam.length,
            **{k: True for k in ("per_root", "tree") if getattr(beam, k)},
        },
    }
