"""The ReDrafter draft head as pure functions over a params pytree, written for one sequence.

    s' = SiLU(E(token) W + s U + b)                      (RNN over the target's token embeddings)
    logits = LMHead(ResBlocks(InputProj(concat(llm_state, s'))))

Params (plain dict; weights are [out, in] like torch's `Linear.weight`, applied as x @ w.T):

    {"rnn": {"w": [H, D], "u": [H, H], "b": [H]},
     "input_proj": {"w_llm": [E, D], "w_rnn": [E, H], "b": [E]},   # iff 2D != E
     "res_blocks": [{"w": [E, E], "b": [E]}, ...],                 # num_draft_layers
     "lm_head": [V_draft, E]}                                      # iff not tie_lm_head

[out, in] is also the target's lm_head layout, so own and tied heads share one code path, and
XLA:CPU runs the few-row matmuls of drafting 1.2-1.8x faster with the contraction over the
weight's minor axis than with `x @ w` on [in, out] (measured at 8 and 45 rows).

The layer that reads concat(llm_state, s') (the input projection, or else the first ResBlock,
whose dict then holds "w_llm"/"w_rnn" instead of "w") keeps its weight split into the llm_state
rows and the s' rows: llm_state is fixed per prompt, so `context` computes its half once per
prompt instead of once per beam per step. Which layers exist follows from the config, never from
the params' keys.

The target's tables arrive as an argument (`TargetEmbeddings`), never stored in params.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from drafter.config import REFERENCE_MASK_VALUE, REFERENCE_TOP_K, DrafterConfig


class TargetEmbeddings(NamedTuple):
    """The target LLM's tables the drafter reads: embed [V, D], lm_head [V, D] | None (needed iff
    tie_lm_head), vocab_map [K] int | None (draft id -> target id; needed iff draft_vocab_size).

    draft_head [K, D] | None: a tied head's `vocab_map` rows, gathered once (`with_draft_head`).
    Without it every drafting call gathers them: for SmolLM2 (K = 8192) 19 MB read and written
    per call, about as long as one drafting step (CPU).
    draft_head_t [D, K] | None: the same rows stored transposed (`with_draft_head(...,
    transposed=True)`), for drafting many rows at once (see there). At most one of the two is set.
    """

    embed: jax.Array
    lm_head: jax.Array | None = None
    vocab_map: jax.Array | None = None
    draft_head: jax.Array | None = None
    draft_head_t: jax.Array | None = None


def with_draft_head(
    config: DrafterConfig, target: TargetEmbeddings, transposed: bool = False
) -> TargetEmbeddings:
    """`target` with a tied, reduced head's rows gathered into `draft_head` (else unchanged).

    `transposed` stores them as `draft_head_t` [D, K] instead. The drafting step is written for
    one sequence; vmapped over B prompts and W beams its head product has B*W rows, and on the CPU
    XLA multiplies several rows by a [D, K] table faster than by the [K, D] one, and one row slower
    (SmolLM2's 8192 rows, fp32, with the argmax, ad-hoc: 1 row 343 against 405 us, 2 rows 1019
    against 420, 4 rows 812 against 513). The engine keeps both forms and passes the one that
    fits the batch (`Engine.draft_params_for`).
    """
    if not config.tie_lm_head or target.vocab_map is None:
        return target
    check_target(config, target)
    rows = target.lm_head[target.vocab_map]
    if transposed:
        return target._replace(draft_head=None, draft_head_t=jnp.transpose(rows))
    return target._replace(draft_head=rows, draft_head_t=None)


def _linear_init(key, fan_in: int, shape, dtype):
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _split_layer_init(key, d: int, out: int, dtype) -> dict:
    k_llm, k_rnn, k_b = jax.random.split(key, 3)
    return {
        "w_llm": _linear_init(k_llm, 2 * d, (out, d), dtype),
        "w_rnn": _linear_init(k_rnn, 2 * d, (out, d), dtype),
        "b": _linear_init(k_b, 2 * d, (out,), dtype),
    }


def init_params(config: DrafterConfig, key, dtype=jnp.float32) -> dict:
    """Random params with torch.nn.Linear's default initialisation."""
    d, e = config.hidden_size, config.exit_dim
    k_rnn, k_proj, k_res, k_head = jax.random.split(key, 4)
    kw, ku, kb = jax.random.split(k_rnn, 3)
    params = {
        "rnn": {
            "w": _linear_init(kw, d, (d, d), dtype),
            "u": _linear_init(ku, d, (d, d), dtype),
            "b": _linear_init(kb, d, (d,), dtype),
        }
    }
    if config.has_input_proj:
        params["input_proj"] = _split_layer_init(k_proj, d, e, dtype)
    blocks = []
    for i, k in enumerate(jax.random.split(k_res, config.num_draft_layers)):
        if i == 0 and not config.has_input_proj:
            blocks.append(_split_layer_init(k, d, e, dtype))
        else:
            kw, kb = jax.random.split(k)
            blocks.append(
                {"w": _linear_init(kw, e, (e, e), dtype), "b": _linear_init(kb, e, (e,), dtype)}
            )
    params["res_blocks"] = blocks
    if not config.tie_lm_head:
        params["lm_head"] = _linear_init(k_head, e, (config.draft_vocab, e), dtype)
    return params


def check_target(config: DrafterConfig, target: TargetEmbeddings) -> None:
    """Raise a ValueError naming the field if target's tables do not fit config (static shapes)."""
    v, d, k = config.vocab_size, config.hidden_size, config.draft_vocab_size
    if tuple(target.embed.shape) != (v, d):
        raise ValueError(f"TargetEmbeddings.embed must be [{v}, {d}], got {target.embed.shape}")
    if config.tie_lm_head and (target.lm_head is None or tuple(target.lm_head.shape) != (v, d)):
        got = None if target.lm_head is None else target.lm_head.shape
        raise ValueError(f"TargetEmbeddings.lm_head must be [{v}, {d}] (tie_lm_head), got {got}")
    if k is not None and (target.vocab_map is None or tuple(target.vocab_map.shape) != (k,)):
        got = None if target.vocab_map is None else target.vocab_map.shape
        raise ValueError(f"TargetEmbeddings.vocab_map must be [{k}] (draft_vocab_size), got {got}")
    if k is None and target.vocab_map is not None:
        raise ValueError(
            "TargetEmbeddings.vocab_map given but DrafterConfig.draft_vocab_size is None"
        )
    if target.draft_head is not None and (
        not config.tie_lm_head or k is None or tuple(target.draft_head.shape) != (k, d)
    ):
        raise ValueError(
            f"TargetEmbeddings.draft_head must be [{k}, {d}] (a tied head with draft_vocab_size; "
            f"see with_draft_head), got {target.draft_head.shape}"
        )
    if target.draft_head_t is not None and (
        not config.tie_lm_head or k is None or tuple(target.draft_head_t.shape) != (d, k)
    ):
        raise ValueError(
            f"TargetEmbeddings.draft_head_t must be [{d}, {k}] (a tied head with "
            f"draft_vocab_size; see with_draft_head), got {target.draft_head_t.shape}"
        )
    if target.draft_head is not None and target.draft_head_t is not None:
        raise ValueError("TargetEmbeddings: set draft_head or draft_head_t, not both")


def to_target_ids(target: TargetEmbeddings, draft_ids):
    """[...] draft ids -> [...] int32 target ids (identity without a reduced vocabulary)."""
    ids = draft_ids if target.vocab_map is None else target.vocab_map[draft_ids]
    return ids.astype(jnp.int32)


def dense(x, w):
    """[..., in], [out, in] -> [..., out]: x @ w.T without materialising the transpose. A
    callable `w` (a weight the caller holds in its own layout, e.g. `pipeline.kernels`'
    `PackedWeight` of w.T) applies itself: `w(x)`."""
    if callable(w):
        return w(x)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def rnn_step(params: dict, embedding, rnn_state):
    """[D], [H] -> [H]: s' = SiLU(E(token) W + s U + b)."""
    rnn = params["rnn"]
    return jax.nn.silu(dense(embedding, rnn["w"]) + dense(rnn_state, rnn["u"]) + rnn["b"])


def context(params: dict, config: DrafterConfig, llm_state):
    """[D] -> [E]: the llm_state half (plus bias) of the layer that reads concat(llm_state, s').

    Constant per prompt. Without input projection and ResBlocks it is unused (returns llm_state).
    """
    if config.has_input_proj:
        layer = params["input_proj"]
    elif config.num_draft_layers > 0:
        layer = params["res_blocks"][0]
    else:
        return llm_state
    return dense(llm_state, layer["w_llm"]) + layer["b"]


def features(params: dict, config: DrafterConfig, llm_state, ctx, rnn_state):
    """[D], [E] (from `context`), [H] -> [E]: ResBlocks(InputProj(concat(llm_state, s')))."""
    blocks = params["res_blocks"]
    if config.has_input_proj:
        x = ctx + dense(rnn_state, params["input_proj"]["w_rnn"])
    else:
        x = jnp.concatenate([llm_state, rnn_state], axis=-1)
        if blocks:
            x = x + jax.nn.silu(ctx + dense(rnn_state, blocks[0]["w_rnn"]))
            blocks = blocks[1:]
    for block in blocks:
        x = x + jax.nn.silu(dense(x, block["w"]) + block["b"])
    return x


def head_weights(params: dict, config: DrafterConfig, target: TargetEmbeddings):
    """The LM head, [V_draft, E]: own weights, or the target's lm_head rows if tied.

    With a tied head and a reduced vocabulary this gathers K rows unless `target.draft_head`
    holds them already: call it once per drafting call, not once per step.
    """
    if not config.tie_lm_head:
        return params["lm_head"]
    if target.vocab_map is None:
        return target.lm_head
    if target.draft_head is not None:
        return target.draft_head
    if target.draft_head_t is not None:
        return jnp.transpose(target.draft_head_t)
    return target.lm_head[target.vocab_map]


def head_product(params: dict, config: DrafterConfig, target: TargetEmbeddings):
    """x [..., E] -> raw logits [..., V_draft]: `dense(x, head_weights(...))`, or `x @
    draft_head_t` when the target holds the transposed rows. Call it once per drafting call."""
    if target.draft_head_t is not None:
        table_t = target.draft_head_t
        return table_t if callable(table_t) else (lambda x: jnp.dot(x, table_t))
    head = head_weights(params, config, target)
    return lambda x: dense(x, head)


def head_logits(config: DrafterConfig, head, x):
    """[..., E], head from `head_weights` -> [..., V_draft] raw logits (same for tied and own)."""
    del config  # both heads are [V_draft, E] rows
    return dense(x, head)


def logits_to_log_probs(config: DrafterConfig, logits):
    """[..., V_draft] -> [..., V_draft] log-probabilities (the reference's warp if configured)."""
    logits = logits.astype(jnp.float32)
    if config.reference_logits:
        logits = logits - jnp.max(logits, axis=-1, keepdims=True)
        k = min(REFERENCE_TOP_K, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, REFERENCE_MASK_VALUE, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def draft_logits(params: dict, config: DrafterConfig, target: TargetEmbeddings, llm_state, s):
    """[D], [H] (the updated state s') -> [V_draft] raw logits. For training and tests."""
    x = features(params, config, llm_state, context(params, config, llm_state), s)
    return dense(x, head_weights(params, config, target))


def rnn_drafter(
    params: dict, config: DrafterConfig, target: TargetEmbeddings, llm_state, rnn_state, token
):
    """[D], [H], [] target id -> [H], [V_draft]: one drafting step for one sequence.

    Feeds `token` (a target id: the LLM's own token may lie outside a reduced draft vocabulary)
    into the RNN, then predicts the next token's log-probabilities (over draft ids) from
    concat(llm_state, s'), the reference's order.
    """
    embedding = target.embed[token]
    new_state = rnn_step(params, embedding, rnn_state)
    logits = draft_logits(params, config, target, llm_state, new_state)
    return new_state, logits_to_log_probs(config, logits)
