"""Training the drafter by distillation: the ReDrafter loss, the optimizer and a jitted step.

Alignment (as in the reference trainer): the LLM's hidden state `h_t` at position `t` is what the
engine hands the drafter together with the LLM's own next token `x_{t+1}`. The RNN then consumes
`x_{t+1}, ..., x_{t+L}` and its depth-`k` output (k = 0..L-1) predicts `x_{t+2+k}`. One training
example is therefore a `Window`: `h_t` and the `L + 1` teacher tokens `x_{t+1..t+L+1}`.

Written for one window; `jax.vmap` adds the batch. The target's tables (embedding, tied head,
reduced-vocabulary map) arrive as `TargetEmbeddings` and are never trained. The optional KL term
needs the LLM's own distribution at `t+1+k`, recomputed from its hidden states there (`hidden`
after the final norm times the LLM head), so the data set never stores `[V]` vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drafter.config import DrafterConfig
from drafter.model import (
    TargetEmbeddings,
    context,
    features,
    head_logits,
    head_weights,
    rnn_step,
)


class Window(NamedTuple):
    """One training example (leading `B` when batched).

    llm_state: [D] the LLM's hidden state h_t (after its final norm).
    tokens: [L+1] int32 target ids x_{t+1..t+L+1}; column 0 is the LLM's token.
    mask: [L] bool, label k (= tokens[k+1]) is a real token, not padding past the answer's end.
    teacher_hidden: [L, D] the LLM's hidden states at t+1..t+L, from which it produced the L
        labels tokens[1:] (for the KL term), or None.
    """

    llm_state: jax.Array
    tokens: jax.Array
    mask: jax.Array
    teacher_hidden: jax.Array | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimization of one drafter. `kl_weight` mixes KL(LLM || drafter) into the hard-label CE."""

    learning_rate: float = 1e-3
    warmup_steps: int = 50
    total_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 0.0
    # Gaussian noise added to the LLM state, as a fraction of its RMS: with little data the
    # drafter otherwise memorizes continuations keyed on exact training states.
    state_noise: float = 0.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"TrainConfig.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, total_steps], got {self.warmup_steps}"
            )
        if self.kl_weight < 0:
            raise ValueError(f"TrainConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if self.state_noise < 0:
            raise ValueError(f"TrainConfig.state_noise must be >= 0, got {self.state_noise}")


class TrainState(NamedTuple):
    step: jax.Array  # [] int32, the number of updates applied
    params: Any
    opt_state: Any


class Metrics(NamedTuple):
    """Per-batch figures; per-depth arrays are [L]."""

    loss: jax.Array
    ce: jax.Array  # [L] mean cross-entropy at each depth over valid labels
    accuracy: jax.Array  # [L] top-1 accuracy at each depth
    count: jax.Array  # [L] number of valid labels at each depth


def draft_labels(tokens, vocab_map, vocab_size: int):
    """[L] target ids, [K] | None, static V -> ([L] draft ids, [L] bool in the draft vocab).

    With a reduced vocabulary a target token outside the K kept ones can never be drafted; its
    label is masked rather than mapped to a wrong id.
    """
    if vocab_map is None:
        return tokens, jnp.ones(tokens.shape, bool)
    inverse = (
        jnp.full((vocab_size,), -1, jnp.int32)
        .at[vocab_map]
        .set(jnp.arange(vocab_map.shape[0], dtype=jnp.int32))
    )
    ids = inverse[tokens]
    return jnp.maximum(ids, 0), ids >= 0


def unroll(params, config: DrafterConfig, target: TargetEmbeddings, head, llm_state, inputs):
    """[D], [L] target ids -> [L, V_draft] log-probs: depth k has consumed inputs[:k+1].

    `head` is `head_weights(params, config, target)`, computed once per batch by the caller. The
    log-softmax is over the raw logits (no reference top-50 warp): the warp is an inference-time
    device and would cut the gradient to every masked token.
    """
    ctx = context(params, config, llm_state)

    def step(state, token):
        state = rnn_step(params, target.embed[token], state)
        return state, features(params, config, llm_state, ctx, state)

    rnn_state = jnp.zeros((config.hidden_size,), jnp.float32)
    _, x = jax.lax.scan(step, rnn_state, inputs)
    return jax.nn.log_softmax(head_logits(config, head, x).astype(jnp.float32), axis=-1)


def teacher_log_probs(teacher_head, teacher_hidden, vocab_map):
    """[V, D], [L, D], [K] | None -> [L, V_draft] the LLM's own next-token log-probs.

    With a reduced vocabulary the LLM's distribution is restricted to the K kept tokens and
    renormalized, so the KL compares distributions over the same support.
    """
    rows = teacher_head if vocab_map is None else teacher_head[vocab_map]
    logits = teacher_hidden.astype(jnp.float32) @ rows.astype(jnp.float32).T
    return jax.nn.log_softmax(logits, axis=-1)


def window_loss(params, config, target, head, teacher_head, kl_weight, window: Window):
    """One window -> [L] x4: loss, cross-entropy, correct, valid. `teacher_head`: [V, D] | None."""
    log_probs = unroll(params, config, target, head, window.llm_state, window.tokens[:-1])
    labels, in_vocab = draft_labels(window.tokens[1:], target.vocab_map, config.vocab_size)
    valid = window.mask & in_vocab
    ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    loss = ce
    if window.teacher_hidden is not None and teacher_head is not None:
        teacher = teacher_log_probs(teacher_head, window.teacher_hidden, target.vocab_map)
        kl = jnp.sum(jnp.exp(teacher) * (teacher - log_probs), axis=-1)
        loss = ce + kl_weight * kl
    correct = jnp.argmax(log_probs, axis=-1) == labels
    return jnp.where(valid, loss, 0.0), jnp.where(valid, ce, 0.0), correct & valid, valid


def batch_loss(params, config, target, teacher_head, kl_weight, windows: Window):
    """Windows with leading B -> (scalar mean loss over all valid labels, Metrics)."""
    head = head_weights(params, config, target)

    def one(window):
        return window_loss(params, config, target, head, teacher_head, kl_weight, window)

    loss, ce, correct, valid = jax.vmap(one)(windows)
    count = valid.sum(axis=0)
    safe = jnp.maximum(count, 1)
    total = loss.sum() / jnp.maximum(count.sum(), 1)
    metrics = Metrics(total, ce.sum(0) / safe, correct.sum(0) / safe, count)
    return total, metrics


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule with global-norm clipping (as the reference trainer).

    A run whose warmup takes all its steps (e.g. `specdraft train --steps 2`, warmup clamped to
    2) only warms up: optax needs at least one decay step after the warmup.
    """
    decay_steps = max(train.total_steps, train.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, train.warmup_steps, decay_steps, train.learning_rate * 0.05
    )
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(schedule, weight_decay=train.weight_decay),
    )


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def noisy_states(key, llm_states, scale):
    """key, [B, D], [] -> [B, D]: each state plus N(0, (scale * its RMS)^2) noise."""
    rms = jnp.sqrt(jnp.mean(jnp.square(llm_states), axis=-1, keepdims=True))
    return llm_states + scale * rms * jax.random.normal(key, llm_states.shape, llm_states.dtype)


def make_train_step(config: DrafterConfig, train: TrainConfig, optimizer):
    """-> step(state, target, teacher_head, windows, key) -> (state, Metrics), not yet jitted.

    `key` drives the state noise only (derive it from the step number so a resumed run repeats
    it). The caller jits the step (params replicated, windows split on the batch axis); the mean
    over the batch then becomes a cross-device reduction without any code here.
    """

    def step(state: TrainState, target, teacher_head, windows: Window, key):
        if train.state_noise > 0:
            noisy = noisy_states(key, windows.llm_state, train.state_noise)
            windows = windows._replace(llm_state=noisy)
        grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
        (_, metrics), grads = grad_fn(
            state.params, config, target, teacher_head, train.kl_weight, windows
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def accepted_length(draft_tokens, continuation):
    """[W, L+1] draft target ids, [L+1] the LLM's greedy tokens -> [] accepted draft tokens.

    Column 0 of both is the LLM's own token. Under greedy verification a beam is accepted up to
    its first disagreement with the LLM's continuation; the engine keeps the longest such prefix.
    A `continuation` entry of -1 (past the end of the answer) never matches.
    """
    match = draft_tokens[:, 1:] == continuation[None, 1:]
    prefix = jnp.cumprod(match.astype(jnp.int32), axis=1).sum(axis=1)
    return prefix.max()
