"""What a decode step costs on this machine, per batch rows and tree size: the table the goodput
policy (`pipeline.policy`) chooses by.

The cost of verifying more nodes depends on the hardware far more than on the model: on one
2-core CPU a 9-node SmolLM2 forward of one prompt cost 1.6x a one-token one, on another 2.9x;
with 8 prompts 5.5x (a forward of 72 rows against 8, Zen 3); on a GPU little more than one. So
the engine measures it (`step_costs`): the model's own forward at each node count for the
batch's rows over a cache, timed round-robin, and one drafting call per draft size. The table is
cached on disk per machine, model, dtype, matmul path, drafter, tree and rows
(`$SPECDRAFT_STEP_COSTS`, else `$SPECDRAFT_CACHE/step-costs`; delete a file to re-measure, as
after timing on a busy machine), so a machine measures each once (a SmolLM2 forward compiles
in about 1.5 s a size on a 2-core CPU).

An earlier probe timed one decoder layer and scaled it by the layer count. That misled: one
layer's weights (14 MB for SmolLM2) stay in a 32 MB L3 cache between calls, while a real
forward streams all 30 layers' weights from memory, so the probe priced one-token steps too
cheap beside wide ones (27 against 42 ms for 2 and 9 nodes on the third CPU, where forward plus
drafting take 40 and 48) and cut trees that ran faster uncut (1.69x AR against 1.78x).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

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
              rounds: int = PROBE_ROUNDS, rows: int = 1) -> tuple[float, ...]:  # fmt: skip
    """ms of a forward of `rows` prompts over each count of tree nodes in `nodes` (logits
    reduced to their argmax, as a greedy verify reads them), over a cache of `cache_slots`."""
    params = unstack_layers(llm_params)
    cache = unstack_cache(init_cache(config, rows, cache_slots))

    @jax.jit
    def run(params, tokens, positions, cache, mask):
        return jnp.argmax(forward(params, config, tokens, positions, cache, mask).logits, -1)

    calls = []
    for n in nodes:
        tokens = jnp.zeros((rows, n), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(cache_slots, cache_slots + n), (rows, n))
        mask = jnp.ones((rows, n, cache_slots + n), bool)
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
             rounds: int = PROBE_ROUNDS, rows: int = 1) -> float:  # fmt: skip
    """ms of one drafting call of `draft_fn` for `rows` prompts (the same for every cut size)."""
    from pipeline.speculative import DraftInputs

    inputs = DraftInputs(
        llm_state=jnp.ones((rows, hidden_size), jnp.float32),
        llm_token=jnp.zeros((rows,), jnp.int32),
        key=jax.random.split(jax.random.key(0), rows),
        context=jnp.zeros((rows, context), jnp.int32),
        num_context=jnp.ones((rows,), jnp.int32),
    )
    run = jax.jit(lambda p, i: jax.vmap(draft_fn, in_axes=(None, 0))(p, i))
    return _interleaved_ms([(run, draft_params, inputs)], rounds)[0]


def machine_key() -> dict:
    """What a measured cost depends on besides the model: the CPU (model name and flags), the
    cores this process may use, JAX's version, backend and device kind."""
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "flags") and key.strip() not in cpu:
                    cpu[key.strip()] = value.strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind}  # fmt: skip


def step_costs(llm_params, config: LlamaConfig, draft_fns, draft_params, hidden_size: int,
               rows: int, sizes: tuple[int, ...], verify_nodes: tuple[int, ...], key: dict,
               cache_slots: int = 256):  # fmt: skip
    """`policy.StepCosts` of a batch of `rows` prompts (on one device): an AR step (one node),
    drafting each of `draft_fns` (one per size) and verifying each count of `verify_nodes`;
    read from the disk cache under `key` (with `machine_key()`) when measured before."""
    from pipeline.models import cache_dir
    from pipeline.policy import StepCosts

    text = json.dumps({"machine": machine_key(), "rows": rows, "sizes": sizes,
                       "nodes": verify_nodes, "slots": cache_slots, **key}, sort_keys=True,
                      default=str)  # fmt: skip
    folder = os.environ.get("SPECDRAFT_STEP_COSTS") or cache_dir() / "step-costs"
    path = Path(folder) / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    try:
        saved = json.loads(path.read_text())
        return StepCosts(tuple(saved["sizes"]), tuple(saved["draft"]), tuple(saved["verify"]),
                         saved["ar"], rows, measured=True)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        pass
    nodes = verify_ms(llm_params, config, (1, *verify_nodes), cache_slots, rows=rows)
    drafting = tuple(draft_ms(fn, draft_params, hidden_size, rows=rows) for fn in draft_fns)
    costs = StepCosts(sizes, tuple(round(d, 3) for d in drafting),
                      tuple(round(v, 3) for v in nodes[1:]), round(nodes[0], 3), rows,
                      measured=True)  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**costs.as_dict(), "key": json.loads(text)}, indent=1))
        tmp.replace(path)
    except OSError:  # a read-only cache only costs a re-measure next time
        pass
    return costs
