"""This machine's speed: fp32 matmul GFLOP/s and memory bandwidth GB/s, measured with JAX.

Other benchmarks express their times against these two numbers (a roofline bound), so they are
measured in the same run as the thing being timed and with the same JAX backend.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class MachineSpeed:
    gflops: float  # fp32 matmul, 1e9 FLOP/s
    gbps: float  # streaming read bandwidth, 1e9 bytes/s

    def to_json(self) -> dict:
        return {k: round(v, 2) for k, v in asdict(self).items()}


def log(message: str) -> None:
    """Progress goes to stderr so stdout/JSON stay clean."""
    print(message, file=sys.stderr, flush=True)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn` (which must return JAX arrays), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    return statistics.median(time_call(fn, repeats, warmup))


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Peak-ish fp32 GFLOP/s: a square [n, n] @ [n, n] jnp.dot under jit (2 n^3 FLOPs)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    seconds = median_s(lambda: dot(a, b), repeats)
    return 2 * n**3 / seconds / 1e9


def memory_gbps(mbytes: int = 512, repeats: int = 7) -> float:
    """Streaming read GB/s: a jitted sum over an fp32 array far larger than the caches.

    A reduction reads every byte once and writes almost nothing, like a matrix-vector product
    reading its weights; the array size is what counts as moved.
    """
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = median_s(lambda: total(x), repeats)
    return x.nbytes / seconds / 1e9


def measure(quick: bool = False) -> MachineSpeed:
    """Both numbers; `quick` uses smaller problems (noisier, for smoke runs)."""
    log("machine: timing fp32 matmul and memory bandwidth ...")
    speed = MachineSpeed(
        gflops=matmul_gflops(1024 if quick else 2048, 3 if quick else 7),
        gbps=memory_gbps(128 if quick else 512, 3 if quick else 7),
    )
    log(f"machine: {speed.gflops:.1f} GFLOP/s, {speed.gbps:.1f} GB/s")
    return speed


def provenance() -> dict:
    """What a result was measured with: the git commit (and whether the working tree differed
    from it), JAX and jaxlib versions, the CPU's model and flags (/proc/cpuinfo), the cores
    this process may use, JAX's backend and device count."""
    import jaxlib

    def git(*cmd: str) -> str | None:
        try:
            with warnings.catch_warnings():  # JAX's warning on fork; git is exec'd at once
                warnings.simplefilter("ignore", RuntimeWarning)
                out = subprocess.run(
                    ["git", "--no-optional-locks", *cmd],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd=os.path.dirname(os.path.abspath(__file__)),
                )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in cpu:
                    cpu[key] = value.strip()
    except OSError:
        pass
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "tree_modified": None if status is None else bool(status),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu.get("model name") or platform.processor() or None,
        "cpu_flags": cpu.get("flags"),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
    }
