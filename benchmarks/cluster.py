"""`specdraft bench cluster`: what the Ray layer costs and how it scales, on this machine.

- overhead_ms_per_prompt: wall time per prompt of a whole job (batching, `ray.wait` dispatch,
  object transfer, JSONL writing, statistics) through one Ray worker whose engine does no work
  (the echo test engine), after the worker is started and warm. The in-process path (no Ray)
  is measured the same way for comparison.
- throughput: prompts/s with 1 and 2 workers when every prompt costs `--work-ms` of simulated
  engine time (a sleep, so it parallelises even on a 2-core machine: this isolates the
  coordinator's ability to keep workers busy from the machine's core count). With
  `--tiny-engine`, also the real engine on a tiny random model (CPU-bound: two workers on two
  cores share them).

On a GPU cluster each worker owns its GPUs, so real-engine throughput scales with workers like
the simulated case, as long as the per-batch engine time dwarfs the per-batch overhead here.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=2000, help="prompts in the overhead run")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--work-ms", type=float, default=20.0, help="simulated ms per prompt")
    parser.add_argument("--work-prompts", type=int, default=192, help="prompts per throughput run")
    parser.add_argument("--tiny-engine", action="store_true", help="also time the real engine")


def run(args: argparse.Namespace) -> dict:
    import ray

    from cluster.testing import EchoEngine

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        overhead = {w: _overhead(EchoEngine, w, args) for w in (1, 2)}
        in_process = _in_process_overhead(args)
        work = functools.partial(EchoEngine, delay_s=args.batch_size * args.work_ms / 1000)
        throughput = [_throughput(work, w, args.work_prompts, args.batch_size) for w in (1, 2)]
        document = {
            "machine": {"cpus": os.cpu_count()},
            "prompts": args.prompts,
            "batch_size": args.batch_size,
            "overhead_ms_per_prompt": overhead[1],
            "overhead_ms_per_prompt_2_workers": overhead[2],
            "in_process_overhead_ms_per_prompt": in_process,
            "simulated_work_ms_per_prompt": args.work_ms,
            "throughput": throughput,
            "speedup_2_vs_1": round(
                throughput[1]["prompts_per_s"] / throughput[0]["prompts_per_s"], 3
            ),
        }
        if args.tiny_engine:
            from cluster.testing import TinyEngineFactory

            tiny = TinyEngineFactory(max_new_tokens=16, batch_size=4)
            document["tiny_engine_throughput"] = [_throughput(tiny, w, 32, 4) for w in (1, 2)]
        return document
    finally:
        ray.shutdown()


def _job(pool_or_engine, prompts, batch_size: int, ray_pool: bool) -> tuple[float, dict]:
    from cluster.coordinator import DispatchConfig, in_process_runner, ray_runner, run_job
    from pipeline.prompts import PromptFile

    config = DispatchConfig(batch_size=batch_size)
    if ray_pool:
        runner = ray_runner(pool_or_engine.actors, "generate", config)
    else:
        runner = in_process_runner(pool_or_engine, "generate")
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    started = time.perf_counter()
    summary = run_job(PromptFile(prompts, []), out, "generate", runner, config, progress=False)
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds, summary


def _prompts(n: int, tag: str, uniform: bool = False):
    """Prompts of 1-4 phrases; `uniform`: all of one length, so a real engine compiles one
    batch shape (in the warm-up) and the timed run measures decoding, not compilation."""
    from pipeline.prompts import PromptItem

    phrase = "a few words of prompt "
    return [PromptItem(id=f"{tag}{i}", prompt=phrase * (1 if uniform else 1 + i % 4))
            for i in range(n)]  # fmt: skip


def _overhead(factory, workers: int, args) -> float:
    from cluster.coordinator import start_workers
    from cluster.worker import WorkerResources

    pool = start_workers(factory, workers, WorkerResources())
    try:
        _job(pool, _prompts(4 * args.batch_size, "warm"), args.batch_size, ray_pool=True)
        seconds, _ = _job(pool, _prompts(args.prompts, "p"), args.batch_size, ray_pool=True)
    finally:
        pool.shutdown()
    return round(seconds * 1000 / args.prompts, 4)


def _in_process_overhead(args) -> float:
    from cluster.testing import EchoEngine

    seconds, _ = _job(EchoEngine(), _prompts(args.prompts, "p"), args.batch_size, ray_pool=False)
    return round(seconds * 1000 / args.prompts, 4)


def _throughput(factory, workers: int, n: int, batch_size: int) -> dict:
    from cluster.coordinator import start_workers
    from cluster.worker import WorkerResources

    pool = start_workers(factory, workers, WorkerResources(cpu_devices=1), timeout_s=900)
    try:
        # Warm-up: one batch per worker (a real engine compiles on its first batch).
        _job(pool, _prompts(batch_size * workers, "warm", True), batch_size, ray_pool=True)
        seconds, summary = _job(pool, _prompts(n, "t", True), batch_size, ray_pool=True)
    finally:
        pool.shutdown()
    return {
        "workers": workers,
        "prompts": n,
        "seconds": round(seconds, 4),
        "prompts_per_s": round(n / seconds, 3),
        "tokens_per_s": summary["tokens_per_s"],
    }
