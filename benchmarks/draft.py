"""`specdraft bench draft`: drafted sequences per second, in process and through local Ray workers.

The engine's `draft` (prefill, the target's first token, then W drafts of L tokens each:
`EngineConfig.draft_method` "beam", or "sample" for W independent samples) runs on the same
prompts three ways: in this process (`cluster.coordinator.in_process_runner`, one engine whose
XLA thread pool spans every core), and as a Ray job through 1 and through 2 local worker actors
(`ray_runner`), each worker pinned to one core of its own (`--pin core`: its process's CPU
affinity is set before JAX starts, so XLA sizes its thread pool to that one core too). Two
workers on a 2-core machine therefore use the same cores as the in-process engine: the goal is
that their throughput is within 10% of it, i.e. that Ray costs nearly nothing and more nodes add
throughput.

Per row (method, W x L, where): prompts, drafted sequences (the drafts returned: prompts x W),
drafted tokens, the median seconds of a whole job over `--repeats` rounds (batching, dispatch,
object transfer, JSONL writing: `run_job`'s wall time), sequences per second and its range over
the rounds, and `ratio` = sequences/s over the in-process engine's for the same method and shape
(`ratio_rounds`: per round, each against the in-process run of the same round). `busy_seconds`
are the engine's own seconds per worker as the workers report them, so `seconds -
max(busy_seconds)` is what the job added around the engine. `identical_to_in_process` counts the
prompts whose drafts (tokens) equal the in-process engine's: keys come from the prompt id, so
they should all match (up to float rounding from a different thread count).

Timing: every engine is built once and kept for all rounds: one per process, serving every
(method, shape) from the same weights (`DraftEngineFactory`; a prompt's id carries the case it
belongs to). Each case is compiled before timing: every batch shape of the job (rows, padded
prompt width) is drafted once in process and on every worker. Then, in each round, every case
runs once everywhere, alternating the order of the places from round to round, so a machine that
drifts (other processes on the cores) slows them alike. `compiled_batches` counts timed batches
that still compiled (should be 0). The load average is recorded before and after and per round.

Priority: Ray starts its workers at niceness 15 (`RAY_worker_niceness`), the in-process engine
runs at this process's (0). On a machine shared with other work the workers then yield to it and
the in-process engine does not; rows record each process's `nice` (run with
`RAY_worker_niceness=0` in the environment to level them).

`--tiny-model` uses a tiny random Llama and drafter (the test); the default is SmolLM2 with the
shipped drafter, as `specdraft draft` would load them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import decode

METHODS = ("beam", "sample")
ID_SEP = "::"  # a job's prompt ids are "<case>::<prompt id>"; the engine sees the prompt id
# EngineConfig fields a `DraftEngineFactory` may vary between cases: the engine reads them per
# call (`beam_for`, `draft_fns`, `draft`), never when it loads or lays out its weights.
PER_CALL_FIELDS = ("draft_method", "beam", "draft_log_probs")


def log(msg: str) -> None:
    print(f"[bench draft] {msg}", file=sys.stderr, flush=True)


def _shape(text: str):
    """ "4x5" -> ("4x5", BeamConfig(4, 5)); "4x5t": a best-first tree (beam method only)."""
    return text, decode.parse_beam(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF / HF folder (default: SmolLM2)")
    parser.add_argument("--drafter", default=None, help="drafter folder (default: shipped)")
    parser.add_argument(
        "--tiny-model",
        action="store_true",
        help="a tiny random model and drafter instead (smoke tests)",
    )
    parser.add_argument(
        "--prompts",
        type=decode._prompt_file,
        default=None,
        metavar="FILE",
        help="prompt file (default: the held-out prompts)",
    )
    parser.add_argument(
        "--num-prompts",
        type=decode._at_least_one,
        default=64,
        metavar="N",
        help="the first N prompts (default 64)",
    )
    parser.add_argument(
        "--batch-size",
        type=decode._at_least_one,
        default=8,
        help="prompts per batch, engine and dispatch alike (default 8)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="EngineConfig.draft_method values (default: beam sample)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=None,
        metavar="WxL",
        help="drafts x drafted tokens (default: 4x5 16x5)",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=decode._at_least_one,
        default=[1, 2],
        metavar="N",
        help="Ray worker counts, a pool each (default: 1 2)",
    )
    parser.add_argument(
        "--pin",
        nargs="+",
        choices=("core", "none"),
        default=["core"],
        help="workers pinned to one core each, or left to the OS; both: a pool "
        "of each (default: core)",
    )
    parser.add_argument(
        "--repeats",
        type=decode._at_least_one,
        default=3,
        help="interleaved rounds; medians and ranges reported (default 3)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (the first LLM token and sampled drafts)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="sampling top-k")
    parser.add_argument("--top-p", type=float, default=None, help="sampling top-p")
    parser.add_argument(
        "--log-probs",
        action="store_true",
        help="drafts carry per-token log-probs (EngineConfig.draft_log_probs)",
    )


# -- the engine each process holds -------------------------------------------------------------


@dataclass(frozen=True)
class DraftEngineFactory:
    """Picklable engine factory (a worker's `engine_factory`): one engine for several cases.

    `cases` are (label, EngineConfig) pairs differing only in `PER_CALL_FIELDS`; the weights are
    loaded once, for the first, and every case drafts through a shallow copy of that engine with
    its own config. `pin_dir`: claim one core of this process's CPUs (a file per core in that
    folder, so the workers of one pool take different cores) and pin the process to it before
    JAX starts. `tiny`: a tiny random model (`cluster.testing.TinyEngineFactory`'s)."""

    cases: tuple[tuple[str, Any], ...]
    pin_dir: str | None = None
    tiny: bool = False

    def __call__(self) -> SwitchEngine:
        if self.pin_dir is not None:
            _claim_core(self.pin_dir)
        base = _tiny_engine(self.cases[0][1]) if self.tiny else _engine(self.cases[0][1])
        return SwitchEngine({label: with_config(base, c) for label, c in self.cases})


def _engine(config):
    from pipeline.engine import Engine

    return Engine.from_config(config)


def _tiny_engine(config):
    """The real engine over a tiny Llama (TinyEngineFactory's shape) and drafter, their weights
    drawn with NumPy (jax.random would compile once per weight shape: most of a smoke test)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cluster.testing import CharTokenizer
    from drafter.config import DrafterConfig
    from drafter.model import init_params as init_drafter
    from pipeline.engine import Engine
    from pipeline.llm import LlamaConfig, init_params

    llm = LlamaConfig(32, 32, 64, 2, num_heads=4, num_kv_heads=2, head_dim=8,
                      tie_word_embeddings=False, max_seq_len=256, eos_token_ids=(2,))  # fmt: skip
    rng = np.random.default_rng(config.seed)
    random = lambda tree: jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), tree
    )
    key = jax.random.key(config.seed)
    drafter_config = DrafterConfig(hidden_size=32, vocab_size=32, exit_dim=64)  # fresh_drafter's
    params = random(jax.eval_shape(lambda: init_params(llm, key)))
    drafter_params = random(jax.eval_shape(lambda: init_drafter(drafter_config, key)))
    return Engine.from_params(llm, params, drafter_config, drafter_params, config=config,
                              tokenizer=CharTokenizer())  # fmt: skip


def _claim_core(folder: str) -> int:
    """Pin this process to the first of its CPUs not yet claimed in `folder` (O_EXCL files)."""
    cores = sorted(os.sched_getaffinity(0))
    for core in cores:
        try:
            fd = os.open(os.path.join(folder, f"core-{core}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.sched_setaffinity(0, {core})
        return core
    raise RuntimeError(f"bench draft: every core of {cores} is claimed in {folder}: more pinned "
                       "workers than cores")  # fmt: skip


def with_config(engine, config):
    """A shallow copy of `engine` (same weights, same compiled functions) drafting with `config`,
    which may differ from the engine's own only in `PER_CALL_FIELDS`."""
    other = [f.name for f in dataclasses.fields(config)
             if f.name not in PER_CALL_FIELDS
             and getattr(config, f.name) != getattr(engine.config, f.name)]  # fmt: skip
    if other:
        raise ValueError(f"cases differ in {other}: one engine serves them only if they differ "
                         f"in {PER_CALL_FIELDS}")  # fmt: skip
    twin = copy.copy(engine)
    twin.config = config
    return twin


class SwitchEngine:
    """`draft(items)` routed by the case in the items' ids (`<case>::<id>`) to that case's engine,
    which sees the plain ids (its random keys come from them, as in any job). Each record gets
    back its full id and, in `metrics`, `compiled` (whether its batch compiled), `cpus` and
    `nice` (this process's CPU affinity and niceness) and `batch` (the first id of its batch)."""

    def __init__(self, engines: dict[str, Any]):
        self.engines = engines

    def draft(self, items: list) -> list[dict]:
        labels = {item.id.partition(ID_SEP)[0] for item in items}
        if len(labels) != 1 or not all(ID_SEP in item.id for item in items):
            raise ValueError(f"a batch must hold one case's prompts ('<case>{ID_SEP}<id>')")
        engine = self.engines[labels.pop()]
        plain = [dataclasses.replace(item, id=item.id.partition(ID_SEP)[2]) for item in items]
        before = engine._draft.cache_size()
        records = engine.draft(plain)
        compiled = engine._draft.cache_size() > before
        where = {"cpus": sorted(os.sched_getaffinity(0)), "nice": os.nice(0), "batch": items[0].id}
        for record, item in zip(records, items, strict=True):
            record["id"] = item.id
            record.setdefault("metrics", {}).update(compiled=compiled, **where)
        return records

    def generate(self, items: list) -> list[dict]:
        raise NotImplementedError("bench draft's engine only drafts")

    def encode(self, label: str, item) -> list[int]:
        return self.engines[label].encode(item)


# -- the benchmark ------------------------------------------------------------------------------


def _cases(args) -> list[tuple[str, str, Any, Any]]:
    """(label, method, BeamConfig, EngineConfig) per method and shape."""
    from drafter.sampling import SamplingConfig
    from pipeline.engine import EngineConfig

    shapes = args.shapes or [_shape("4x5"), _shape("16x5")]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    extra = {"max_new_tokens": 8} if args.tiny_model else {}
    cases = []
    for method in args.methods:
        for text, beam in shapes:
            if method == "sample" and (beam.tree or beam.per_root or beam.cuts):
                log(f"skipping sample x {text}: trees and per-root beams are beam search's")
                continue
            config = EngineConfig(model=args.model, drafter=args.drafter, draft_method=method,
                                  beam=beam, lookup=0, sampling=sampling,
                                  draft_log_probs=args.log_probs, batch_size=args.batch_size,
                                  devices=1, time_phases=False, **extra)  # fmt: skip
            cases.append((f"{method}-{text}", method, beam, config))
    if not cases:
        raise ValueError("bench draft: no case to run")
    return cases


def _job_items(items, label: str) -> list:
    return [dataclasses.replace(item, id=f"{label}{ID_SEP}{item.id}") for item in items]


def _batches(items, batch_size: int, workers: int) -> list[list]:
    """The batches `run_job` cuts for `workers` workers."""
    from cluster.coordinator import make_batches

    return make_batches(items, min(batch_size, max(1, -(-len(items) // workers))))


def _shape_batches(local, label: str, batches: list[list]) -> list[list]:
    """One batch per distinct compiled shape (rows, padded prompt width) among `batches`."""
    from pipeline.engine import PROMPT_WIDTH_MULTIPLE

    seen = {}
    for batch in batches:
        longest = max(len(local.encode(label, item)) for item in batch)
        seen.setdefault((len(batch), -(-longest // PROMPT_WIDTH_MULTIPLE)), batch)
    return list(seen.values())


@dataclass
class _Place:
    """Where a job runs: in this process, or a pool of Ray workers."""

    name: str
    workers: int
    pinned: bool | None
    pool: Any = None  # cluster.coordinator.WorkerPool
    info: list | None = None
    pin_dir: str | None = None


def _run_job(place: _Place, local, items, args) -> tuple[float, dict, list[dict]]:
    """One whole job: (wall seconds, run_job's summary, the records written)."""
    from cluster.coordinator import DispatchConfig, in_process_runner, ray_runner, run_job
    from cluster.results import read_records
    from pipeline.prompts import PromptFile

    config = DispatchConfig(batch_size=args.batch_size)
    if place.pool is None:
        runner = in_process_runner(local, "draft")
    else:
        runner = ray_runner(place.pool.actors, "draft", config)
    with tempfile.TemporaryDirectory(prefix="bench-draft-") as tmp:
        out = Path(tmp) / "out.jsonl"
        started = time.perf_counter()
        summary = run_job(PromptFile(items, []), out, "draft", runner, config, progress=False,
                          workers=place.workers)  # fmt: skip
        seconds = time.perf_counter() - started
        records = read_records(out, "jsonl")
    errors = [r for r in records if "error" in r]
    if errors or len(records) != len(items):
        detail = errors[0]["error"] if errors else f"{len(records)} of {len(items)} records"
        raise RuntimeError(f"bench draft: the {place.name} job failed: {detail}")
    return seconds, summary, records


def _warm(place: _Place, local, label: str, items, args) -> None:
    """Compile every batch shape of this case's job, in process or on every worker."""
    import ray

    shapes = _shape_batches(local, label, _batches(items, args.batch_size, place.workers))
    if place.pool is None:
        for batch in shapes:
            local.draft(batch)
        return
    calls = [actor.run.remote("draft", batch) for actor in place.pool.actors.values()
             for batch in shapes]  # fmt: skip
    for out in ray.get(calls):
        errors = [r["error"] for r in out["results"] if "error" in r]
        if errors:
            raise RuntimeError(f"bench draft: warm-up on {place.name} failed: {errors[0]}")


def _start_places(args, cases) -> list[_Place]:
    import ray

    from cluster.coordinator import start_workers
    from cluster.worker import WorkerResources

    places = []
    engine_cases = tuple((label, config) for label, _, _, config in cases)
    for pin in args.pin:
        for workers in args.workers:
            name = f"ray-{workers}" + ("" if pin == "core" else "-unpinned")
            pin_dir = tempfile.mkdtemp(prefix="bench-draft-cores-") if pin == "core" else None
            factory = DraftEngineFactory(engine_cases, pin_dir, args.tiny_model)
            log(f"{name}: starting {workers} worker(s) ...")
            pool = start_workers(factory, workers, WorkerResources(cpus=1, cpu_devices=1),
                                 timeout_s=1800)  # fmt: skip
            info = ray.get([a.info.remote(devices=True) for a in pool.actors.values()])
            places.append(_Place(name, workers, pin == "core", pool, info, pin_dir))
    return places


def _row(label, method, beam, place: _Place, runs: list[tuple], base: list[tuple] | None) -> dict:
    """A result row from this place's (seconds, summary, records) per round and, to compare
    with, the in-process engine's (None: this is the in-process row)."""
    seconds = [s for s, _, _ in runs]
    records = runs[-1][2]
    sequences = sum(len(r["drafts"]) for r in records)
    tokens = sum(len(d["tokens"]) for r in records for d in r["drafts"])
    rates = [sequences / s for s in seconds]
    median_s = statistics.median(seconds)
    workers = sorted({w for _, summary, _ in runs for w in summary["workers"]})
    busy = {
        w: [round(summary["workers"].get(w, {}).get("busy_seconds", 0.0), 4)
            for _, summary, _ in runs]
        for w in workers
    }  # fmt: skip
    row = {
        "case": label,
        "method": method,
        "width": beam.width,
        "length": beam.length,
        "tree": beam.tree,
        "where": place.name,
        "workers": place.workers,
        "pinned": place.pinned,
        "prompts": len(records),
        "sequences": sequences,
        "drafted_tokens": tokens,
        "seconds": round(median_s, 4),
        "seconds_rounds": [round(s, 4) for s in seconds],
        "sequences_per_s": round(sequences / median_s, 3),
        "sequences_per_s_range": [round(min(rates), 3), round(max(rates), 3)],
        "batches": sum(w["batches"] for w in runs[-1][1]["workers"].values()),
        "busy_seconds": busy,
        # What the job added around the engine: wall time less the busiest worker's engine time.
        "overhead_seconds_rounds": [
            round(s - max(b[i] for b in busy.values()), 4) for i, s in enumerate(seconds)
        ],
        "compiled_batches": sum(
            len({r["metrics"]["batch"] for r in rs if r["metrics"]["compiled"]})
            for _, _, rs in runs
        ),
        "cpus": sorted({tuple(r["metrics"]["cpus"]) for r in records}),
        "nice": sorted({r["metrics"]["nice"] for r in records}),
    }
    if base is not None:
        base_seconds = [s for s, _, _ in base]
        row["ratio"] = round(statistics.median(base_seconds) / median_s, 4)
        row["ratio_rounds"] = [round(b / s, 4) for b, s in zip(base_seconds, seconds, strict=True)]
        drafts = {r["id"]: [d["tokens"] for d in r["drafts"]] for r in base[-1][2]}
        row["identical_to_in_process"] = sum(
            drafts.get(r["id"]) == [d["tokens"] for d in r["drafts"]] for r in records
        )
    else:
        row["ratio"] = 1.0
    return row


def run(args: argparse.Namespace) -> dict:
    import jax
    import ray

    from pipeline.distill import HELDOUT_PROMPTS
    from pipeline.prompts import read_prompts

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load_before = os.getloadavg()
    cases = _cases(args)
    prompts_file = args.prompts or str(HELDOUT_PROMPTS)
    items = read_prompts(prompts_file).items[: args.num_prompts]
    log(f"{len(items)} prompts, cases {[c[0] for c in cases]}, load {load_before}")
    engine_cases = tuple((label, config) for label, _, _, config in cases)
    local = DraftEngineFactory(engine_cases, tiny=args.tiny_model)()
    log(f"in-process engine: {local.engines[cases[0][0]].describe()['drafter']}")
    own_ray = not ray.is_initialized()
    if own_ray:
        cpus = max(4, os.cpu_count() or 1, 1 + len(args.pin) * sum(args.workers))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    places = [_Place("in-process", 1, None)]
    try:
        places += _start_places(args, cases)
        for label, *_ in cases:
            job = _job_items(items, label)
            for place in places:
                log(f"warm-up: {label} {place.name}")
                _warm(place, local, label, job, args)
        runs = {(label, p.name): [] for label, *_ in cases for p in places}
        loads = []
        for r in range(args.repeats):
            order = places if r % 2 == 0 else places[::-1]
            for label, *_ in cases:
                job = _job_items(items, label)
                for place in order:
                    seconds, summary, records = _run_job(place, local, job, args)
                    runs[label, place.name].append((seconds, summary, records))
                    log(f"round {r + 1}/{args.repeats} {label} {place.name}: {seconds:.2f} s")
            loads.append([round(x, 2) for x in os.getloadavg()])
        results = []
        for label, method, beam, _ in cases:
            base = runs[label, "in-process"]
            for place in places:
                other = None if place.pool is None else base
                row = _row(label, method, beam, place, runs[label, place.name], other)
                log(str({k: row[k] for k in ("case", "where", "sequences_per_s", "ratio")}))
                results.append(row)
        workers_info = {
            p.name: [{k: i[k] for k in ("pid", "devices", "load_seconds")} for i in p.info]
            for p in places if p.info
        }  # fmt: skip
    finally:
        for place in places:
            if place.pool is not None:
                place.pool.shutdown()
            if place.pin_dir is not None:
                shutil.rmtree(place.pin_dir, ignore_errors=True)
        if own_ray:
            ray.shutdown()
    return {
        "benchmark": "draft",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "load_average_per_round": loads,
        "model": "tiny (random)" if args.tiny_model else (args.model or "default (SmolLM2)"),
        "drafter": local.engines[cases[0][0]].describe()["drafter"],
        "matmul": local.engines[cases[0][0]].matmul,
        "in_process_devices": len(jax.local_devices()),
        "in_process_nice": os.nice(0),
        "workers": workers_info,
        "prompts_file": args.prompts or "pipeline/data/heldout_prompts.jsonl",
        "num_prompts": len(items),
        "batch_size": args.batch_size,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
        "repeats": args.repeats,
        "results": results,
    }
