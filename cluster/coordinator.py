"""The coordinator: prompts in, batches out to worker actors, results into a JSONL file.

- Batching: prompts sorted by length and cut into batches, so a batch pads little.
- Dispatch: each worker holds at most `in_flight_per_worker` batches (one running, one queued so
  it never waits for the coordinator); the next batch goes to the least-loaded live worker, and
  the coordinator blocks only in `ray.wait` for whichever call finishes first.
- Faults: a call that fails because its actor died puts its batch back at the front of the queue
  and sends the worker a probe (`info`): if Ray restarts the actor (max_restarts) the probe
  answers and the worker rejoins; if not, the worker is dropped. A batch that has killed workers
  `max_batch_attempts` times is split into single prompts, and a single prompt that keeps killing
  workers is recorded as an error, so one poisonous prompt cannot take down the job.
- Output: see cluster/results.py (incremental JSONL keyed by id, resumable, never duplicated).
"""

from __future__ import annotations

import collections
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from cluster.results import JobStats, ResultWriter, load_done
from cluster.worker import KINDS, Worker, WorkerResources, process_batch, worker_options
from pipeline.prompts import PromptFile, PromptItem

PROBE_INTERVAL_S = 0.25  # between liveness probes of a worker that Ray is restarting


@dataclass(frozen=True)
class DispatchConfig:
    """How work is cut and spread: prompts per batch, batches in flight per worker, how many
    times a batch may be lost with a dead worker before it is split into single prompts, and
    how long to wait for Ray to restart a dead worker before dropping it."""

    batch_size: int = 8  # the engine pads a batch to a multiple of its device count
    in_flight_per_worker: int = 2
    max_batch_attempts: int = 2
    restart_timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("batch_size", "in_flight_per_worker", "max_batch_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"DispatchConfig.{name} must be >= 1")


class IncompleteJob(RuntimeError):
    """The batch runner returned with prompts neither answered nor recorded as errors."""


class AllWorkersDead(RuntimeError):
    """No worker is left and prompts remain; the output file holds what was done (resumable)."""


def make_batches(items: Sequence[PromptItem], batch_size: int) -> list[list[PromptItem]]:
    """Group prompts of similar length: stable sort by text length, then consecutive chunks."""
    ordered = sorted(items, key=lambda item: item.text_length)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@dataclass
class WorkerPool:
    """Started worker actors (by name) and the placement group that holds them, if any."""

    actors: dict[str, Any]
    info: dict[str, dict]
    group: Any = None

    def shutdown(self):
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


def start_workers(
    engine_factory: Callable[[], Any],
    count: int,
    resources: WorkerResources,
    spread: bool = True,
    timeout_s: float = 600.0,
) -> WorkerPool:
    """Start `count` worker actors (each loads its engine) and wait until all are ready.

    With `spread`, the workers go into one placement group with the SPREAD strategy: one bundle
    per worker, placed on different nodes where the cluster has them (best effort, so a single
    machine still works)."""
    group, options = None, worker_options(resources)
    if spread and count > 1:
        bundle = {"CPU": resources.cpus, "GPU": resources.gpus}
        group = placement_group([{k: v for k, v in bundle.items() if v}] * count, "SPREAD")
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise RuntimeError(
                f"the Ray cluster cannot fit {count} workers of {bundle} each within "
                f"{timeout_s:.0f} s; lower --workers or the per-worker resources"
            )
    remote = ray.remote(Worker)
    actors = {}
    for i in range(count):
        name, opts = f"worker-{i}", dict(options)
        if group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, i)
        actors[name] = remote.options(**opts).remote(engine_factory, name)
    pool = WorkerPool(actors=actors, info={}, group=group)
    names = list(actors)
    try:
        infos = ray.get([actors[n].info.remote() for n in names], timeout=timeout_s)
    except Exception:
        pool.shutdown()
        raise
    pool.info = dict(zip(names, infos, strict=True))
    failed = {n: i["error"] for n, i in pool.info.items() if i["error"]}
    if failed:
        pool.shutdown()
        error = next(iter(failed.values()))
        raise RuntimeError(f"{len(failed)} of {count} workers could not build the engine: {error}")
    return pool


@dataclass(frozen=True)
class _Call:
    worker: str
    batch: tuple[PromptItem, ...] | None  # None for a liveness probe


class _Dispatcher:
    """The ray.wait loop over one job's batches; `on_batch(worker, seconds, results)` gets
    every successful batch."""

    def __init__(self, actors: dict[str, Any], kind: str, config: DispatchConfig, stats, on_batch):
        self.actors, self.kind, self.config = dict(actors), kind, config
        self.stats, self.on_batch = stats, on_batch
        self.pending: collections.deque[tuple[PromptItem, ...]] = collections.deque()
        self.flying: dict[Any, _Call] = {}
        self.load = collections.Counter()
        self.attempts = collections.Counter()
        self.probing: dict[str, float] = {}  # worker -> when we stop waiting for its restart
        self.probe_due: dict[str, float] = {}  # worker -> when to send its next probe

    def run(self, batches: list[list[PromptItem]]):
        self.pending.extend(tuple(b) for b in batches)
        while self.pending or self.flying:
            self._fill()
            self._send_due_probes()
            if not self.flying and not self.probe_due:
                raise AllWorkersDead(
                    f"every worker died; {sum(map(len, self.pending))} prompts not done. "
                    "Re-run the same command to resume from the output file."
                )
            timeout = min(self.probe_due.values(), default=None)
            if timeout is not None:
                timeout = max(0.0, timeout - time.monotonic())
            if not self.flying:
                time.sleep(timeout)
                continue
            ready, _ = ray.wait(list(self.flying), num_returns=1, timeout=timeout)
            for ref in ready:
                self._collect(ref, self.flying.pop(ref))

    def _fill(self):
        live = [w for w in self.actors if w not in self.probing]
        while self.pending and live:
            worker = min(live, key=lambda w: self.load[w])
            if self.load[worker] >= self.config.in_flight_per_worker:
                return
            batch = self.pending.popleft()
            ref = self.actors[worker].run.remote(self.kind, list(batch))
            self.flying[ref] = _Call(worker, batch)
            self.load[worker] += 1

    def _send_due_probes(self):
        now = time.monotonic()
        for worker in [w for w, due in self.probe_due.items() if due <= now]:
            del self.probe_due[worker]
            self.flying[self.actors[worker].info.remote()] = _Call(worker, None)

    def _collect(self, ref, call: _Call):
        if call.batch is not None:
            self.load[call.worker] -= 1
        try:
            out = ray.get(ref)  # already finished: ray.wait returned it
        except ray.exceptions.RayActorError as err:
            self._worker_lost(call, err)
            return
        except ray.exceptions.RayTaskError as err:
            out = None if call.batch is None else _failed_batch(call, err)
        if call.batch is None:
            self.probing.pop(call.worker, None)  # restarted by Ray: back in rotation
            return
        self.on_batch(out["worker"], out["seconds"], out["results"])

    def _worker_lost(self, call: _Call, err: Exception):
        """A call failed with its actor: re-queue its batch and probe until Ray has restarted
        the actor (probe answers), the actor is dead for good, or the restart takes too long."""
        worker, now = call.worker, time.monotonic()
        if call.batch is not None:
            self._requeue(call.batch)
            if worker in self.actors and worker not in self.probing:
                self.probing[worker] = now + self.config.restart_timeout_s
                self.probe_due[worker] = now
            return
        restarting = isinstance(err, ray.exceptions.ActorUnavailableError)
        if restarting and now < self.probing[worker]:
            self.probe_due[worker] = now + PROBE_INTERVAL_S
        else:
            del self.probing[worker]
            del self.actors[worker]

    def _requeue(self, batch: tuple[PromptItem, ...]):
        self.stats.redispatched_batches += 1
        key = tuple(item.id for item in batch)
        self.attempts[key] += 1
        if self.attempts[key] < self.config.max_batch_attempts:
            self.pending.appendleft(batch)
        elif len(batch) > 1:
            self.stats.split_batches += 1
            self.pending.extendleft((item,) for item in reversed(batch))
        else:
            error = f"the worker process died running this prompt ({self.attempts[key]} tries)"
            self.on_batch("coordinator", 0.0, [{"id": batch[0].id, "error": error}])


def _failed_batch(call: _Call, err: Exception) -> dict:
    detail = traceback.format_exception_only(err)[-1].strip()
    errors = [{"id": item.id, "error": f"worker error: {detail}"} for item in call.batch]
    return {"worker": call.worker, "seconds": 0.0, "results": errors}


def run_job(
    prompts: PromptFile,
    out: Path,
    kind: str,
    run_batches: Callable[[list[list[PromptItem]], JobStats, Callable], None],
    config: DispatchConfig,
    progress: bool = True,
    workers: int = 1,
    done_before: frozenset[str] = frozenset(),
) -> dict:
    """Resume-aware job around any batch runner (Ray or in-process); returns the summary dict.
    Batches shrink below `config.batch_size` when there are too few prompts to give each of
    the `workers` one. `done_before`: ids answered in a file other than `out` (a finished
    Parquet output), skipped like those in `out`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    done = load_done(out) | done_before
    todo = [item for item in prompts.items if item.id not in done]
    stats = JobStats(total=len(prompts.ids), skipped=len(set(prompts.ids) & done))
    writer = ResultWriter(out, done)
    bar = tqdm(
        total=len(prompts.ids) - stats.skipped,
        unit="prompt",
        desc=kind,
        disable=not progress,
        dynamic_ncols=True,
    )

    def on_batch(worker: str, seconds: float, results: list[dict]):
        fresh = writer.write([dict(r, worker=worker) for r in results])
        stats.add_batch(worker, seconds, fresh)
        bar.update(len(fresh))
        bar.set_postfix(stats.progress_postfix(), refresh=False)

    try:
        file_errors = [e for e in prompts.errors if e["id"] not in done]
        if file_errors:
            on_batch("prompt-file", 0.0, file_errors)
        batch_size = min(config.batch_size, max(1, -(-len(todo) // workers)))
        run_batches(make_batches(todo, batch_size), stats, on_batch)
    finally:
        bar.close()
        writer.close()
    missing = [i for i in prompts.ids if i not in writer.written]
    if missing:  # a runner that returned without answering: never report such a job as done
        raise IncompleteJob(
            f"{len(missing)} prompts were neither answered nor recorded as errors (first: "
            f"{missing[0]!r}); {out} keeps the rest. Re-run the same command to finish them."
        )
    summary = stats.summary()
    summary["duplicates_dropped"] = writer.duplicates_dropped
    return summary


def ray_runner(actors: dict[str, Any], kind: str, config: DispatchConfig):
    """A `run_batches` for run_job that spreads batches over Ray worker actors."""

    def run_batches(batches, stats, on_batch):
        _Dispatcher(actors, kind, config, stats, on_batch).run(batches)

    return run_batches


def in_process_runner(engine: Any, kind: str):
    """A `run_batches` for run_job that calls an engine in this process, batch after batch
    (the no-Ray path; isolates a failing prompt the same way a worker does)."""

    def run_batches(batches, stats, on_batch):
        for batch in batches:
            out = process_batch(engine, kind, batch, "in-process")
            on_batch(out["worker"], out["seconds"], out["results"])

    return run_batches


__all__ = [
    "AllWorkersDead",
    "IncompleteJob",
    "DispatchConfig",
    "WorkerPool",
    "in_process_runner",
    "make_batches",
    "ray_runner",
    "run_job",
    "start_workers",
]
