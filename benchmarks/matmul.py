"""`specdraft bench matmul`: the small-M CPU kernel (`pipeline.kernels`) against XLA's dot.

For each weight shape of the target (SmolLM2 by default: the attention and MLP matrices and the
49152-column head) and each row count, one jitted product of a `[rows, K]` fp32 block by the
`[K, N]` weight through XLA's dot on the stored layout and through the kernel on the packed one,
timed round-robin (each round runs every case once), medians reported. `weight_pass_ms` is the
fastest one-row time of the shape: a rough floor for reading the weight once. The ratio that
matters is `xla_ms / kernel_ms` at the row counts a decode step uses (1 for AR; 5-16 for a
verify tree).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# (name, K, N) of SmolLM2-135M's matrices: q/o, k/v, gate/up, down, the tied head [D, V].
SHAPES = (("wq", 576, 576), ("wk", 576, 192), ("w_up", 576, 1536), ("w_down", 1536, 576),
          ("head", 576, 49152))  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 9, 16, 32],
                        help="row counts (M) to time")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (medians reported)")
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES],
                        choices=[s[0] for s in SHAPES], help="which weight shapes")  # fmt: skip


def log(msg: str) -> None:
    print(f"[bench matmul] {msg}", file=sys.stderr, flush=True)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from pipeline import kernels

    if not kernels.available():
        raise SystemExit(f"bench matmul: the kernel is unavailable: {kernels.unavailable_reason()}")
    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    kernel = jax.jit(kernels.kernel_matmul)
    rng = np.random.default_rng(0)
    results = []
    for name, k, n in (s for s in SHAPES if s[0] in args.shapes):
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))
        packed = kernels.pack(w)
        calls = []
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
            want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
            for fn, wt in ((xla, w), (kernel, packed)):
                got = np.asarray(fn(x, wt), np.float64)  # compiles
                err = float(np.abs(got - want).max() / np.abs(want).max())
                if err > 1e-5:
                    raise RuntimeError(f"{name} rows={m}: relative error {err:.2e}")
                calls.append((fn, x, wt))
        log(f"{name} [{k}, {n}]: {len(args.rows)} row counts, {args.rounds} rounds")
        times = [[] for _ in calls]
        for _ in range(args.rounds):
            for i, (fn, x, wt) in enumerate(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, wt))
                times[i].append((time.perf_counter() - t0) * 1e3)
        med = [float(np.median(t)) for t in times]
        for j, m in enumerate(args.rows):
            xla_ms, kernel_ms = med[2 * j], med[2 * j + 1]
            ratio = xla_ms / kernel_ms
            results.append({"shape": name, "K": k, "N": n, "rows": m, "xla_ms": xla_ms,
                            "kernel_ms": kernel_ms, "xla_over_kernel": ratio})  # fmt: skip
            log(f"  rows {m:3d}: xla {xla_ms:7.3f} ms  kernel {kernel_ms:7.3f} ms  "
                f"({xla_ms / kernel_ms:.2f}x)")  # fmt: skip
        one = [r for r in results if r["shape"] == name and r["rows"] == 1]
        for r in results:
            if r["shape"] == name and one:
                r["weight_pass_ms"] = min(one[0]["xla_ms"], one[0]["kernel_ms"])
    vw, mr = kernels.tile()
    return {"kernel_tile": {"vector_floats": vw, "rows": mr}, "rounds": args.rounds,
            "jax_devices": [str(d) for d in jax.devices()], "results": results}  # fmt: skip
