"""Run one generate/draft job: the shared body of `specdraft generate|draft` and the Ray job
entry point `python -m cluster.job generate|draft ...`.

Where the engine runs (first match wins):
- `--address ADDR` (or $RAY_ADDRESS, which `ray job submit` sets): workers on a running cluster;
- `--local` or `--workers N` > 0: an embedded Ray on this machine, N workers with
  `--devices-per-worker` fake CPU devices each;
- otherwise: no Ray at all, the engine runs in this process on this host's devices.

Submitting to a running cluster (its job API listens on 127.0.0.1:8265 unless told otherwise,
and has no authentication of its own: never expose it beyond a trusted network):

    ray start --head --dashboard-host 127.0.0.1
    ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", "out"]}' -- \
        python -m cluster.job generate --prompts examples/prompts.jsonl --out /tmp/out.jsonl \
        --workers 2 --gpus-per-worker 1

On GPU nodes each worker gets `--gpus-per-worker` GPUs (Ray sets CUDA_VISIBLE_DEVICES) and the
workers are spread over the nodes with a SPREAD placement group; `--workers` = number of nodes
x GPUs per node / `--gpus-per-worker`. The output path is written by the driver, so with
`ray job submit` it is a path on the head node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from cluster.cli import UserError
from cluster.commands import engine_args
from cluster.results import (
    FORMATS,
    finish_parquet,
    output_format,
    parquet_ids,
    partial_path,
    read_records,
)
from pipeline.outputs import check_writable, write_text
from pipeline.prompts import PromptFileError, read_prompts


def add_arguments(parser: argparse.ArgumentParser, kind: str = "generate") -> None:
    """The flags of `generate` or `draft` (`kind`)."""
    io = parser.add_argument_group("input and output")
    io.add_argument("--prompts", type=Path, required=True, help="JSONL ({id, prompt}) or text")
    io.add_argument("--out", type=Path, required=True, help="results; re-run to resume")
    io.add_argument("--format", choices=FORMATS, default=None,
                    help="jsonl (default), or parquet (default for a .parquet --out; needs "
                         "pyarrow: the `parquet` extra): records stream to OUT.partial.jsonl, "
                         "which a rerun resumes, and OUT is written when the job ends")  # fmt: skip
    io.add_argument("--plot", type=Path, default=None, help="also write a PNG report here")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    where = parser.add_argument_group("where it runs (default: in this process, no Ray)")
    where.add_argument("--local", action="store_true", help="start an embedded Ray here")
    where.add_argument("--address", default=None, help="a running Ray cluster ('auto', host:port)")
    where.add_argument("--workers", type=int, default=None, help="worker actors (default 2)")
    where.add_argument("--devices-per-worker", type=int, default=1, help="fake CPU devices each")
    where.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker")
    where.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")
    where.add_argument("--no-spread", action="store_true", help="do not spread over nodes")
    where.add_argument("--max-restarts", type=int, default=1, help="restarts of a dead worker")
    where.add_argument("--in-flight", type=int, default=2, help="batches queued per worker")
    engine_args.add_arguments(parser, kind)


def run(args: argparse.Namespace, kind: str) -> int:
    from cluster.coordinator import DispatchConfig
    from cluster.results import format_summary

    summary_path = args.out.with_suffix(".summary.json")
    try:
        prompts = read_prompts(args.prompts)
        config = DispatchConfig(batch_size=args.batch_size, in_flight_per_worker=args.in_flight)
        # Every output is checked before a model loads: a path that cannot be written costs a
        # line, not minutes of loading.
        check_writable(args.out, "--out")
        check_writable(summary_path, "--out (its summary)")
        if args.plot is not None:
            check_writable(args.plot, "--plot")
        fmt = output_format(args.out, args.format)
        records = args.out
        done_before = frozenset()
        if fmt == "parquet":
            records = partial_path(args.out)
            check_writable(records, "--out (its partial records)")
            done_before = frozenset(parquet_ids(args.out))
    except (PromptFileError, ValueError) as err:
        raise UserError(str(err)) from None
    factory = engine_args.engine_factory(args, kind)
    address = args.address or (None if args.local else os.environ.get("RAY_ADDRESS"))
    where = (args, kind, prompts, factory, config, records, done_before)
    if address or args.local or (args.workers or 0) > 0:
        summary = _run_on_ray(*where, address)
    else:
        summary = _run_in_process(*where)
    if fmt == "parquet":
        summary["parquet_rows"] = finish_parquet(args.out, records)
    write_text(summary_path, json.dumps(summary, indent=2) + "\n", "the summary")
    print(format_summary(summary))
    print(f"results: {args.out}  summary: {summary_path}")
    if args.plot is not None:
        _plot(args.out, fmt, summary, args.plot)
    return 0


def _run_in_process(args, kind, prompts, factory, config, records, done_before) -> dict:
    from cluster.coordinator import in_process_runner, run_job

    try:
        engine = factory()
    except FileNotFoundError as err:  # e.g. the model is not fetched: the message says how
        raise UserError(str(err)) from None
    runner = in_process_runner(engine, kind)
    progress = not args.no_progress
    return _guard(run_job, prompts, records, kind, runner, config, progress, 1, done_before)


def _run_on_ray(args, kind, prompts, factory, config, records, done_before, address) -> dict:
    from cluster.coordinator import ray_runner, run_job, start_workers
    from cluster.worker import WorkerResources

    workers = 2 if args.workers is None else args.workers
    if workers < 1:
        raise UserError("--workers must be >= 1 with --local or --address")
    resources = WorkerResources(
        cpus=args.cpus_per_worker,
        gpus=args.gpus_per_worker,
        cpu_devices=args.devices_per_worker if args.gpus_per_worker == 0 else 0,
        max_restarts=args.max_restarts,
    )
    with _ray_session(address, workers * args.cpus_per_worker):
        print(f"starting {workers} workers (each loads the engine)...", file=sys.stderr)
        started = time.perf_counter()
        try:
            pool = start_workers(factory, workers, resources, spread=not args.no_spread)
        except Exception as err:
            raise UserError(f"could not start the workers: {_first_line(err)}") from err
        nodes = len({info["node_id"] for info in pool.info.values()})
        print(f"{workers} workers ready on {nodes} node(s) in {time.perf_counter() - started:.1f} s"
              "; the first batch of each prompt width compiles", file=sys.stderr)  # fmt: skip
        try:
            runner = ray_runner(pool.actors, kind, config)
            progress = not args.no_progress
            summary = _guard(run_job, prompts, records, kind, runner, config, progress, workers,
                             done_before)  # fmt: skip
        finally:
            pool.shutdown()
    summary["worker_placement"] = {n: {"node_id": i["node_id"]} for n, i in pool.info.items()}
    return summary


@contextlib.contextmanager
def _ray_session(address: str | None, cpus_needed: float):
    """Connect to `address`, or start an embedded Ray (dashboard off) sized for the workers.
    Reuses a connection that already exists (tests, notebooks) and leaves it open."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
            # "local": a new instance even if `ray start` left an address file on this machine.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(
            f"cannot reach a Ray cluster at {address!r} ({_first_line(err)}). Start one with "
            "`ray start --head --dashboard-host 127.0.0.1`, or run on this machine with --local"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds on a host:port nothing listens on (Ray itself retries for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and friends: Ray resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {address} ({err.strerror or err})") from None


def _guard(run_job, *args) -> dict:
    from cluster.coordinator import AllWorkersDead, IncompleteJob

    try:
        return run_job(*args)
    except (AllWorkersDead, IncompleteJob) as err:
        raise UserError(str(err)) from None
    except ValueError as err:  # a foreign or corrupt --out file
        raise UserError(str(err)) from None


def _plot(results: Path, fmt: str, summary: dict, png: Path) -> None:
    from cluster.report import plot_report

    plot_report(read_records(results, fmt), summary, png)
    print(f"plot: {png}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """`python -m cluster.job {generate,draft} ...`: the entry point for `ray job submit`."""
    from cluster.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("generate", "draft"):
        print("usage: python -m cluster.job {generate,draft} --prompts FILE --out FILE ...")
        sys.exit(2)
    cli_main(argv)


if __name__ == "__main__":
    main()
