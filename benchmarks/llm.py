"""`specdraft bench llm`: target LLM prefill and decode throughput against the machine's bound.

For each batch B it times (after compiling; the median of repeated runs):

- prefill: `pipeline.generate.prefill` of B prompts of P tokens -> `prefill_tok_s = B * P / t`;
- decode: `pipeline.generate.decode` (the jitted `lax.while_loop`) producing M tokens per row,
  i.e. M - 1 forward steps of one token per row -> `decode_tok_s = B * (M - 1) / t`.

Next to them, measured in the same run with the same backend (`benchmarks.machine`):
`decode_bound_tok_s = B / (weight bytes read per step / memory bandwidth)`, the bandwidth bound
of a decode step that reads every weight once (the embedding table counts once, as the tied
head; an untied model's embedding rows are negligible). Also reported: the compute bound of a
step (`2 * B * matmul params` FLOPs at the fp32 matmul peak) and of prefill.

Weights: the default model (SmolLM2-135M-Instruct) when it has been fetched, else (or with
`--random`) random weights of its shape; timing does not depend on the values. `--weights fp32
native`: its GGUF matrices dequantized to fp32, and held in their blocks (`EngineConfig.weights`),
each timed in turn within every repeat, so the two are measured side by side; the bound of each
counts the bytes its step reads. The params are held as the engine holds them: layers unstacked
(see `pipeline.llm.unstack_layers`) and, where the small-M kernel is built, packed for it
(`pipeline.llm.with_packed_weights`).
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.machine import MachineSpeed, log, time_call

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_seq_len=8192,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="a .gguf file or HF folder (default: SmolLM2)"
    )
    parser.add_argument("--random", action="store_true", help="random weights of SmolLM2's shape")
    parser.add_argument("--batches", nargs="+", type=int, default=(1, 8), metavar="B",
                        help="prompts per batch, one case each (default: 1 8)")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=128, help="P, tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="M, tokens generated per row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weight dtype (activations and KV cache stay fp32)")  # fmt: skip
    parser.add_argument("--weights", nargs="+", choices=("fp32", "native"), default=["fp32"],
                        metavar="KIND", help="fp32 and/or native (GGUF blocks), side by side "
                        "(default: fp32)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--quick", action="store_true", help="one timed run, a smaller probe")
    parser.add_argument("--seed", type=int, default=0, help="random weights and prompts")


def _load(args, weights: str = "fp32"):
    """(config, params, source) from `--model`, the default model, or random weights."""
    import jax
    import jax.numpy as jnp

    from pipeline.llm import LlamaConfig, init_params
    from pipeline.models import default_model_path
    from pipeline.weights import load_model

    dtype = jnp.dtype(args.dtype)
    path = args.model or (None if args.random else default_model_path())
    if path is not None and (args.model or default_model_path().exists()):
        log(f"llm: loading {path}")
        config, params = load_model(path, dtype, weights == "native")
        return config, params, str(path)
    if weights == "native":
        raise ValueError("bench llm: --weights native needs a GGUF model, not --random weights")
    log("llm: random weights of SmolLM2-135M's shape")
    config = LlamaConfig(**SMOLLM2)
    return config, init_params(config, jax.random.key(args.seed), dtype), "random (SmolLM2 shape)"


def _costs(config, params) -> dict:
    """Bytes one decode step must read and matmul FLOPs per token."""
    import jax

    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    if "lm_head" in params:  # only B embedding rows are read, not the table
        nbytes -= params["embed"].nbytes
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = d * (q + 2 * kv) + q * d + 3 * d * f
    return {"weight_bytes": nbytes, "flops_per_token": 2 * (config.num_layers * layer + d * v)}


def _time_batch(config, params, batch, args, repeats, warmup) -> dict:
    import jax
    import jax.numpy as jnp

    from drafter.sampling import SamplingConfig
    from pipeline import generate as gen
    from pipeline.llm import init_cache

    p, m = args.prompt_len, args.new_tokens
    key = jax.random.key(args.seed + batch)
    prompts = jax.random.randint(key, (batch, p), 0, config.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), p, jnp.int32)
    cache = init_cache(config, batch, p + m)
    prefill = jax.jit(gen.prefill, static_argnums=1)
    t_pre = time_call(lambda: prefill(params, config, prompts, lengths, cache), repeats, warmup)
    static = dict(config=config, sampling=SamplingConfig(), eos_ids=())
    state = gen.start_jit(
        params,
        prompts,
        lengths,
        jnp.full((batch,), m, jnp.int32),
        key,
        jnp.arange(batch),
        num_tokens=m,
        **static,
    )
    t_dec = time_call(lambda: gen.decode_jit(params, state, **static), repeats, warmup)
    out = gen.decode_jit(params, state, **static)
    assert int(out.lengths.min()) == m, "decode stopped early"
    return {"prefill_s": statistics.median(t_pre), "decode_s": statistics.median(t_dec)}


def _held(config, params):
    """The params as the engine holds them for decoding (see the module docstring)."""
    from pipeline import kernels
    from pipeline.llm import PACKED_LAYER_KEYS, unstack_layers, with_packed_weights

    params = unstack_layers(params)
    table = params.get("lm_head", params["embed"])
    fits = all(
        params["layers"][0][k].shape[-1] % kernels.PANEL == 0 for k in PACKED_LAYER_KEYS
    ) and (isinstance(table, kernels.QuantWeight) or table.shape[0] % kernels.PANEL == 0)
    if fits and kernels.available() and table.dtype == "float32":
        return with_packed_weights(params), "kernel"
    return params, "xla"


def run(args: argparse.Namespace) -> dict:
    from benchmarks import machine as machine_mod
    from benchmarks.decode import decode_weight_bytes

    if args.new_tokens < 2 or args.prompt_len < 1:
        raise ValueError("bench llm: --new-tokens must be >= 2 and --prompt-len >= 1")
    repeats, warmup = (1, 1) if args.quick else (args.repeats, 1)
    speed: MachineSpeed = machine_mod.measure(quick=args.quick)
    kinds = list(dict.fromkeys(args.weights))
    loaded = {}
    for kind in kinds:
        config, params, source = _load(args, kind)
        flops_per_token = _costs(config, params)["flops_per_token"]
        held, matmul = _held(config, params)
        loaded[kind] = (config, held, source, matmul, flops_per_token)
    results = []
    for batch in args.batches:
        log(f"llm: batch {batch}, prompt {args.prompt_len}, new {args.new_tokens}, {kinds} ...")
        times = {kind: {"prefill_s": [], "decode_s": []} for kind in kinds}
        for r in range(repeats):  # every kind in each round: side by side
            for kind in kinds:
                config, held = loaded[kind][:2]
                one = _time_batch(config, held, batch, args, 1, warmup if r == 0 else 0)
                for key, value in one.items():
                    times[kind][key].append(value)
        for kind in kinds:
            config, held, source, matmul, flops_per_token = loaded[kind]
            prefill_s = statistics.median(times[kind]["prefill_s"])
            decode_s = statistics.median(times[kind]["decode_s"])
            weight_bytes = decode_weight_bytes(held)
            steps = args.new_tokens - 1
            step_s = decode_s / steps
            bound_s = weight_bytes / (speed.gbps * 1e9)
            flops_step = batch * flops_per_token
            row = {
                "batch": batch,
                "weights": kind,
                "matmul": matmul,
                "weight_bytes": weight_bytes,
                "prefill_tok_s": round(batch * args.prompt_len / prefill_s, 1),
                "decode_tok_s": round(batch * steps / decode_s, 2),
                "decode_bound_tok_s": round(batch / bound_s, 2),
                "decode_ms_per_step": round(step_s * 1e3, 2),
                "decode_bound_ms_per_step": round(bound_s * 1e3, 2),
                "decode_vs_bound": round(step_s / bound_s, 2),
                "decode_compute_bound_tok_s": round(batch / (flops_step / (speed.gflops * 1e9)), 1),
                "prefill_compute_bound_tok_s": round(speed.gflops * 1e9 / flops_per_token, 1),
                "decode_seconds": [round(x, 4) for x in times[kind]["decode_s"]],
            }
            log(f"llm: {row}")
            results.append(row)
    return {
        "benchmark": "llm",
        "model": loaded[kinds[0]][2],
        "dtype": args.dtype,
        "weights": kinds,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "machine": speed.to_json(),
        "results": results,
    }
