"""What a verify step costs at each tree size on this machine, for `BeamConfig.cuts`.

A cut tree (`BeamConfig.cuts`) trades the drafted tokens it expects to gain against what a
bigger verify step costs, and that cost depends on the hardware far more than on the model: on
one 2-core CPU a 9-node SmolLM2 forward cost 1.6x a one-token step, on another 2.9x, on a third
1.7x (README, Benchmarks); on a GPU little more than one. So the engine measures it once: the
model's own forward at each node count, one prompt over an empty cache, timed round-robin,
plus one drafting call. A SmolLM2 forward compiles in about 1.5 s a size (2-core CPU).

An earlier probe timed one decoder layer and scaled it by the layer count. That misled: one
layer's weights (14 MB for SmolLM2) stay in a 32 MB L3 cache between calls, while a real
forward streams all 30 layers' weights from memory, so the probe priced one-token steps too
cheap beside wide ones (27 against 42 ms for 2 and 9 nodes on the third CPU, where forward plus
drafting take 40 and 48) and cut trees that ran faster uncut (1.69x AR against 1.78x).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.llm import LlamaConfig, forward, init_cache, unstack_cache, unstack_layers

# Timed rounds; each round times every size once, in turn, so drift hits all sizes alike.
PROBE_ROUNDS = 15


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


def verify_ms(llm_params, config: LlamaConfig, nodes: tuple[int, ...], cache_slots: int = 256,
              rounds: int = PROBE_ROUNDS) -> tuple[float, ...]:  # fmt: skip
    """ms of a one-prompt forward over each count of tree nodes in `nodes` (logits reduced to
    their argmax, as a greedy verify reads them), over a cache of `cache_slots` slots."""
    params = unstack_layers(llm_params)
    cache = unstack_cache(init_cache(config, 1, cache_slots))

    @jax.jit
    def run(params, tokens, positions, cache, mask):
        return jnp.argmax(forward(params, config, tokens, positions, cache, mask).logits, -1)

    calls = []
    for n in nodes:
        tokens = jnp.zeros((1, n), jnp.int32)
        positions = jnp.arange(cache_slots, cache_slots + n)[None]
        mask = jnp.ones((1, n, cache_slots + n), bool)
        calls.append((run, params, tokens, positions, cache, mask))
    return tuple(_interleaved_ms(calls, rounds))


def head_one_row_ms(llm_params, rounds: int = 25) -> tuple[float, float]:
    """ms of one row through the output head (logits reduced to their argmax): from the stored
    `[V, D]` table, and from its transposed `[D, V]` copy (`llm.with_transposed_head`). Which is
    faster depends on the CPU (see there); AR decoding runs one such row a step."""
    table = llm_params.get("lm_head", llm_params["embed"])
    table_t = llm_params["head_t"] if "head_t" in llm_params else jnp.transpose(table)
    hidden = jax.random.normal(jax.random.key(0), (1, table.shape[1]), jnp.float32)
    stored = jax.jit(lambda x, w: jnp.argmax(jnp.einsum("td,vd->tv", x, w), -1))
    transposed = jax.jit(lambda x, w: jnp.argmax(jnp.einsum("td,dv->tv", x, w), -1))
    ms = _interleaved_ms([(stored, hidden, table), (transposed, hidden, table_t)], rounds)
    return ms[0], ms[1]


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
