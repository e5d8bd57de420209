"""`specdraft bench drafter`: jitted beam search against this machine's roofline bound.

For each drafter shape, batch B and beam (W, L) it times `draft_batch` (after compiling; the
median of repeated runs; random fp32 weights) and compares it with

    bound = max(FLOPs / matmul peak, weight bytes read / memory bandwidth)

counting only what beam search must do: step 1 expands beam 0 alone (B rows), steps 2..L run all
W beams (B*W rows each); every step reads each weight once per call (the weights do not fit in
cache, and the batch and beams share one read); the llm_state half of the first layer is computed
once per prompt. Softmax/top-k work is O(V) per row and left out.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass

from benchmarks.machine import MachineSpeed, log, time_call

F32 = 4  # bytes


@dataclass(frozen=True)
class Shape:
    hidden_size: int  # D (= H, the RNN state)
    vocab_size: int  # V
    exit_dim: int  # E
    num_draft_layers: int  # ResBlocks


SHAPES: dict[str, Shape] = {
    "vicuna7b": Shape(hidden_size=4096, vocab_size=32000, exit_dim=8192, num_draft_layers=2),
    "smollm2": Shape(hidden_size=576, vocab_size=49152, exit_dim=1152, num_draft_layers=1),
    # For smoke tests of the benchmark itself; not part of the default set.
    "tiny": Shape(hidden_size=32, vocab_size=128, exit_dim=48, num_draft_layers=2),
}
DEFAULT_SHAPES = ("vicuna7b", "smollm2")
DEFAULT_BEAMS = ("45x5", "8x5", "1x5")


@dataclass(frozen=True)
class Cost:
    flops: float
    weight_bytes: float

    def bound_s(self, machine: MachineSpeed) -> float:
        return max(self.flops / (machine.gflops * 1e9), self.weight_bytes / (machine.gbps * 1e9))


def beam_search_cost(shape: Shape, batch: int, width: int, length: int) -> Cost:
    """FLOPs and weight bytes one `draft_batch` call must spend (see the module docstring)."""
    d, e, v = shape.hidden_size, shape.exit_dim, shape.vocab_size
    has_proj = 2 * d != e
    wide_blocks = shape.num_draft_layers - (0 if has_proj else 1)  # the [E, E] ResBlocks
    # Per row and step: RNN (W, U), the s' half of the first layer, [E, E] blocks, the LM head.
    row_weights = 2 * d * d + d * e + wide_blocks * e * e + e * v
    row_biases = d + wide_blocks * e  # the first layer's bias is in the per-prompt half
    rows = batch * (1 + (length - 1) * width)
    prompt_flops = 2 * d * e  # llm_state @ w_llm, once per prompt
    flops = rows * 2 * row_weights + batch * prompt_flops
    per_step_bytes = (row_weights + row_biases) * F32
    weight_bytes = length * per_step_bytes + (d * e + e) * F32 + rows * d * F32  # + embed rows
    return Cost(flops=float(flops), weight_bytes=float(weight_bytes))


def parse_beam(text: str) -> tuple[int, int]:
    """ "45x5" -> (45, 5) as (W, L) (`BeamConfig.parse`, as an argparse type)."""
    from drafter.config import BeamConfig

    try:
        beam = BeamConfig.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if beam.per_root or beam.tree:  # its cost model and timings are joint beam search's
        kind = "per root" if beam.per_root else "a tree"
        raise argparse.ArgumentTypeError(
            f"bench drafter times joint beam search: {text!r} is {kind}"
        )
    return beam.width, beam.length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=DEFAULT_SHAPES,
                        help="drafter sizes to time")  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=(1, 8), metavar="B",
                        help="sequences per batch, one case each (default: 1 8)")  # fmt: skip
    default_beams = " ".join(DEFAULT_BEAMS)
    parser.add_argument(
        "--beams",
        nargs="+",
        type=parse_beam,
        default=None,
        metavar="WxL",
        help=f"beam width x draft length (default: {default_beams})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--quick", action="store_true", help="one timed run per case, a smaller machine probe"
    )
    parser.add_argument("--seed", type=int, default=0, help="random drafter weights and inputs")


def _setup(shape: Shape, seed: int):
    """Random fp32 drafter params and target tables for `shape`."""
    import jax

    from drafter.config import DrafterConfig
    from drafter.model import TargetEmbeddings, init_params

    config = DrafterConfig(**asdict(shape))
    k_params, k_embed = jax.random.split(jax.random.key(seed))
    params = init_params(config, k_params)
    embed = jax.random.normal(k_embed, (shape.vocab_size, shape.hidden_size)) * 0.02
    return config, params, TargetEmbeddings(embed=embed)


def _time_case(config, params, target, batch, beam, repeats, warmup, seed) -> list[float]:
    import jax

    from drafter.drafting import draft_batch

    k_state, k_token = jax.random.split(jax.random.key(seed + 1))
    llm_states = jax.random.normal(k_state, (batch, config.hidden_size))
    llm_tokens = jax.random.randint(k_token, (batch,), 0, config.vocab_size)
    run = jax.jit(draft_batch, static_argnums=(1, 5))
    compiled = run.lower(params, config, target, llm_states, llm_tokens, beam).compile()
    return time_call(lambda: compiled(params, target, llm_states, llm_tokens), repeats, warmup)


def _sig(x: float) -> float:
    """Four significant digits: enough for timings, exact enough for tiny bounds."""
    return float(f"{x:.4g}")


def run(args: argparse.Namespace) -> dict:
    from benchmarks import machine as machine_mod
    from drafter.config import BeamConfig

    beams = args.beams or [parse_beam(b) for b in DEFAULT_BEAMS]
    repeats, warmup = (1, 0) if args.quick else (args.repeats, 1)
    speed = machine_mod.measure(quick=args.quick)
    results = []
    for name in args.shapes:
        shape = SHAPES[name]
        log(f"drafter {name}: {asdict(shape)}")
        config, params, target = _setup(shape, args.seed)
        for batch in args.batches:
            for width, length in beams:
                beam = BeamConfig(width=width, length=length)
                times = _time_case(config, params, target, batch, beam, repeats, warmup, args.seed)
                cost = beam_search_cost(shape, batch, width, length)
                median_ms = statistics.median(times) * 1e3
                bound_ms = cost.bound_s(speed) * 1e3
                results.append({
                    "shape": name, "batch": batch, "width": width, "length": length,
                    "median_ms": _sig(median_ms), "bound_ms": _sig(bound_ms),
                    "ratio": _sig(median_ms / bound_ms),
                    "gflop": _sig(cost.flops / 1e9), "weight_gb": _sig(cost.weight_bytes / 1e9),
                    "times_ms": [_sig(t * 1e3) for t in times],
                })  # fmt: skip
                log(f"  B={batch:<2} W={width:<2} L={length}: {median_ms:9.1f} ms, "
                    f"bound {bound_ms:9.1f} ms, ratio {median_ms / bound_ms:.2f}")  # fmt: skip
        del params, target
    return {"benchmark": "drafter", "machine": speed.to_json(), "results": results}
