"""The Ray worker actor: one engine (target LLM + drafter) on the devices Ray gives it.

The actor builds its engine once, in `__init__`, from a picklable zero-argument `engine_factory`
(`EngineFactory(EngineConfig)` for the real pipeline; any callable returning an object with
`generate(items)` / `draft(items)` for tests), so weights are loaded once per actor and every
batch reuses the compiled functions. The devices are whatever the actor's process sees: the GPUs
Ray assigned it (`num_gpus`, which sets CUDA_VISIBLE_DEVICES), or N fake CPU devices set through
`runtime_env` XLA_FLAGS in local mode (see `worker_options`).

A batch that raises is retried one prompt at a time inside the actor, so a prompt that fails on
its own is reported with its error and its batch-mates still get answers. A crash of the actor
process itself is the coordinator's business (it re-dispatches the batch).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("generate", "draft")


@dataclass(frozen=True)
class EngineFactory:
    """Picklable recipe for the real engine: `Engine.from_config(config)` inside the actor."""

    config: Any  # pipeline.engine.EngineConfig

    def __call__(self):
        from pipeline.engine import Engine  # imported in the actor, where JAX should start

        return Engine.from_config(self.config)


@dataclass(frozen=True)
class WorkerResources:
    """What one worker asks Ray for. `cpu_devices` > 0 gives its process that many fake XLA CPU
    devices (local mode); `gpus` > 0 asks Ray for GPUs (cluster mode)."""

    cpus: float = 1.0
    gpus: float = 0.0
    cpu_devices: int = 0
    max_restarts: int = 1


def worker_options(resources: WorkerResources) -> dict:
    """Ray actor options for one worker: resources, restarts, and its own device environment."""
    # Workers on a running cluster do not inherit the driver's environment: forward ours.
    env = {k: v for k, v in os.environ.items() if k.startswith("SPECDRAFT_")}
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    if resources.cpu_devices > 0:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={resources.cpu_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "max_restarts": resources.max_restarts,
        # A call lost with a dead actor is re-dispatched by the coordinator, never retried by Ray
        # behind its back: that is what keeps every prompt exactly once in the output.
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env},
    }


class Worker:
    """Ray actor body (wrapped with `ray.remote` by `cluster.coordinator.start_workers`)."""

    def __init__(self, engine_factory: Callable[[], Any], name: str):
        self.name, self.engine, self.init_error = name, None, None
        started = time.perf_counter()
        try:
            self.engine = engine_factory()
        except Exception as err:
            # Kept, not raised: a raising constructor would be restarted by Ray over and over,
            # and its message buried in an ActorDiedError. `info` reports it instead.
            self.init_error = traceback.format_exception_only(err)[-1].strip()
        self.load_seconds = time.perf_counter() - started

    def info(self, devices: bool = False) -> dict:
        """Where this worker runs: name, host, pid, Ray node, GPUs; with `devices`, the JAX
        devices its process sees (imports JAX if the engine has not)."""
        import ray

        context = ray.get_runtime_context()
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "devices": _device_names() if devices else None,
            "load_seconds": self.load_seconds,
            "error": self.init_error,
        }

    def run(self, kind: str, items: list) -> dict:
        """Process one batch: {"worker", "seconds", "results": [one dict per item, same order]}."""
        return process_batch(self.engine, kind, items, self.name)


def process_batch(engine: Any, kind: str, items: list, worker: str) -> dict:
    """Run `engine.<kind>(items)`; if the batch raises, run its prompts one by one so only the
    prompts that fail alone get an error record."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    method = getattr(engine, kind)
    started = time.perf_counter()
    try:
        results = method(items)
    except Exception:
        results = [_run_alone(method, item) for item in items]
    return {"worker": worker, "seconds": time.perf_counter() - started, "results": results}


def _run_alone(method: Callable[[list], list[dict]], item) -> dict:
    try:
        (result,) = method([item])
        return result
    except Exception as err:
        detail = traceback.format_exception_only(err)[-1].strip()
        return {"id": item.id, "error": f"engine failed on this prompt: {detail}"}


def _device_names() -> list[str]:
    import jax

    return [str(d) for d in jax.devices()]
