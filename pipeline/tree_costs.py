"""What a verify step costs at each tree size on this machine, for `BeamConfig.cuts`.

A cut tree (`BeamConfig.cuts`) trades the drafted tokens it expects to gain against what a
bigger verify step costs, and that cost depends on the hardware far more than on the model: on
one 2-core CPU a 9-node SmolLM2 forward cost 1.6x a one-token step, on another 2.9x (README,
Benchmarks); on a GPU little more than one. So the engine measures it once, with a probe that
compiles in seconds: one decoder layer (the model's own first layer, run once and STACK times
in a call, so the call's own dispatch cost cancels) and the output head at each node count,
timed round-robin, and adds up `N x layer + head + drafting` per size. The 30
layers of a real forward would take far longer to compile for each size.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.llm import LlamaConfig, decoder_layer, lm_logits, rope_tables

# Timed rounds; each round times every size once, in turn, so drift hits all sizes alike.
PROBE_ROUNDS = 25


def _once_ms(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def _interleaved_ms(calls, rounds: int = PROBE_ROUNDS) -> list[float]:
    """Median ms of each (fn, *args) in `calls`, timed round-robin after one compiling run."""
    for fn, *args in calls:
        jax.block_until_ready(fn(*args))
    times = [[_once_ms(fn, *args) for fn, *args in calls] for _ in range(rounds)]
    return [float(np.median(col)) for col in zip(*times, strict=True)]


def _first_layer(params) -> dict:
    layers = params["layers"]
    if isinstance(layers, dict):  # stacked [N, ...]
        return {name: w[0] for name, w in layers.items()}
    return layers[0]


# The probe runs the layer this many times in one call, and once: the difference over
# (STACK - 1) is one layer's time without the call's own dispatch cost.
STACK = 4


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layers(config: LlamaConfig, reps: int, layer, x, cache_k, cache_v, positions, mask):
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta)
    for _ in range(reps):
        x = decoder_layer(config, layer, x, cache_k, cache_v, cos, sin, mask)[0]
    return x


@jax.jit
def _head(params, hidden):
    return lm_logits(params, hidden)


def verify_ms(llm_params, config: LlamaConfig, nodes: tuple[int, ...], cache_slots: int = 256,
              rounds: int = PROBE_ROUNDS) -> tuple[float, ...]:  # fmt: skip
    """Estimated ms of a one-prompt verify forward over each count of tree nodes in `nodes`:
    `num_layers x` one layer's time plus the head's, over a cache of `cache_slots` slots."""
    layer = _first_layer(llm_params)
    head = {k: v for k, v in llm_params.items() if k != "layers"}
    hkv, hd = config.num_kv_heads, config.head_dim
    cache_k = jnp.zeros((hkv, hd, cache_slots), jnp.float32)
    cache_v = jnp.zeros((hkv, cache_slots, hd), jnp.float32)
    calls = []
    for n in nodes:
        x = jax.random.normal(jax.random.key(n), (n, config.hidden_size), jnp.float32)
        positions = jnp.arange(cache_slots, cache_slots + n)
        mask = jnp.ones((n, cache_slots + n), bool)
        args = (layer, x, cache_k, cache_v, positions, mask)
        calls += [(_layers, config, 1, *args), (_layers, config, STACK, *args), (_head, head, x)]
    ms = np.asarray(_interleaved_ms(calls, rounds)).reshape(len(nodes), 3)
    per_layer = np.maximum(ms[:, 1] - ms[:, 0], 0.0) / (STACK - 1)
    return tuple(float(v) for v in config.num_layers * per_layer + ms[:, 2])


def draft_ms(draft_fn, draft_params, hidden_size: int, context: int = 64,
             rounds: int = PROBE_ROUNDS) -> float:  # fmt: skip
    """ms of one drafting call of `draft_fn` for one prompt (the same for every cut size)."""
    from pipeline.speculative import DraftInputs

    inputs = DraftInputs(
        llm_state=jnp.ones((1, hidden_size), jnp.float32),
        llm_token=jnp.zeros((1,), jnp.int32),
        key=jax.random.split(jax.random.key(0), 1),
        context=jnp.zeros((1, context), jnp.int32),
        num_context=jnp.ones((1,), jnp.int32),
    )
    run = jax.jit(lambda p, i: jax.vmap(draft_fn, in_axes=(None, 0))(p, i))
    return _interleaved_ms([(run, draft_params, inputs)], rounds)[0]


def step_costs(llm_params, config: LlamaConfig, sizes: tuple[int, ...], draft_fn, draft_params,
               cache_slots: int = 256) -> tuple[float, ...]:  # fmt: skip
    """ms of a one-prompt speculative step verifying 1 + k nodes for k in `sizes`: drafting
    (the same L tokens whatever the cut) plus the verify forward."""
    drafting = draft_ms(draft_fn, draft_params, config.hidden_size)
    verify = verify_ms(llm_params, config, tuple(1 + k for k in sizes), cache_slots)
    return tuple(round(drafting + v, 3) for v in verify)
