"""Job output: the JSONL result file (incremental, resumable) and the running statistics.

The output file is the job's only state. Every line is one prompt's record keyed by `id`, written
and flushed as soon as its batch returns, so a killed coordinator loses at most the batches in
flight. Re-running with the same file reads the ids already there and skips them; a half-written
last line (the coordinator died mid-write) is cut off first, so the file stays valid JSONL.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.outputs import OutputPathError, append_text


def load_done(path: Path) -> set[str]:
    """Ids already recorded in `path` (results and errors), repairing a torn last line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done, good_end = set(), 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break  # torn final write: dropped below, its prompt runs again
        stripped = line.strip()
        if stripped:
            try:
                done.add(str(json.loads(stripped)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{path}:{number}: not a result record; "
                    "is this the output file of another program?"
                ) from None
        good_end += len(line)
    if good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


FORMATS = ("jsonl", "parquet")
PARQUET_HINT = "pip install 'specdraft[parquet]' (pyarrow)"


def output_format(out: Path, given: str | None) -> str:
    """`given`, else parquet for a `.parquet` path, else jsonl."""
    if given is not None:
        return given
    return "parquet" if out.suffix == ".parquet" else "jsonl"


def partial_path(out: Path) -> Path:
    """Where a Parquet job streams its records (resumable JSONL) until it writes `out`."""
    return out.with_name(out.name + ".partial.jsonl")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"--format parquet needs pyarrow: {PARQUET_HINT}") from None
    return pa, pq


def require_parquet() -> None:
    """A ValueError saying how to install pyarrow when it is missing."""
    _pyarrow()


def parquet_ids(out: Path) -> set[str]:
    """Ids in a finished Parquet output (none if it does not exist yet)."""
    if not out.exists():
        return set()
    _, pq = _pyarrow()
    try:
        return {str(i) for i in pq.read_table(out, columns=["id"]).column("id").to_pylist()}
    except Exception as err:  # pyarrow raises its own types for a foreign or corrupt file
        raise ValueError(f"{out}: not a Parquet result file ({err})") from None


def read_records(out: Path, fmt: str) -> list[dict]:
    """Every record of a finished output, JSONL or Parquet."""
    if fmt == "parquet":
        _, pq = _pyarrow()
        return pq.read_table(out).to_pylist()
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def finish_parquet(out: Path, partial: Path) -> int:
    """Write `out` as the rows already in it plus the records of `partial` (then removed),
    atomically; returns its row count. Records with different fields share one schema (missing
    fields are null)."""
    pa, pq = _pyarrow()
    records = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
    tables = [pq.read_table(out)] if out.exists() else []
    if records:
        tables.append(pa.Table.from_struct_array(pa.array(records)))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    tmp = out.with_name(out.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    except OSError as err:
        raise OutputPathError(f"cannot write {out}: {err.strerror or err}; the results are "
                              f"kept in {partial}, re-run to finish") from None  # fmt: skip
    finally:
        if tmp.exists():
            tmp.unlink()
    partial.unlink()
    return table.num_rows


class ResultWriter:
    """Appends records to the JSONL output, one write per batch, never the same id twice. A
    batch that cannot be written in full (a full disk) is cut off again and raises
    OutputPathError: the file keeps every line before it, so a rerun resumes."""

    def __init__(self, path: Path, done: set[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.written = set(done)
        self.duplicates_dropped = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, records: list[dict]) -> list[dict]:
        """Write the records whose id is new; returns those written."""
        fresh = []
        for record in records:
            if record["id"] in self.written:
                self.duplicates_dropped += 1
                continue
            self.written.add(record["id"])
            fresh.append(record)
        if fresh:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh)
            kept = f"it keeps the {len(self.written) - len(fresh)} results before; re-run to resume"
            try:
                append_text(self._fd, text, self.path, kept)
            except Exception:
                self.written.difference_update(r["id"] for r in fresh)
                raise
        return fresh

    def close(self):
        os.close(self._fd)


@dataclass
class WorkerStats:
    prompts: int = 0
    errors: int = 0
    tokens: int = 0
    steps: int = 0
    batches: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "errors": self.errors,
            "batches": self.batches,
            "tokens": self.tokens,
            "busy_seconds": round(self.busy_seconds, 4),
            "tokens_per_s": _ratio(self.tokens, self.busy_seconds),
            "tokens_per_step": _ratio(self.tokens, self.steps),
        }


@dataclass
class JobStats:
    """Counts for the progress bar and the final summary, overall and per worker."""

    total: int
    skipped: int
    started: float = field(default_factory=time.perf_counter)
    workers: dict[str, WorkerStats] = field(default_factory=lambda: defaultdict(WorkerStats))
    redispatched_batches: int = 0
    split_batches: int = 0

    def add_batch(self, worker: str, seconds: float, records: list[dict]):
        stats = self.workers[worker]
        stats.batches += 1
        stats.busy_seconds += seconds
        for record in records:
            if "error" in record:
                stats.errors += 1
                continue
            stats.prompts += 1
            tokens, steps = result_tokens(record)
            stats.tokens += tokens
            stats.steps += steps

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def totals(self) -> WorkerStats:
        total = WorkerStats()
        for s in self.workers.values():
            for name in ("prompts", "errors", "tokens", "steps", "batches"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return total

    def progress_postfix(self) -> dict:
        t = self.totals()
        postfix = {"tok/s": f"{t.tokens / max(self.seconds, 1e-9):.1f}"}
        if t.steps:
            postfix["tok/step"] = f"{t.tokens / t.steps:.2f}"
        if t.errors:
            postfix["errors"] = t.errors
        return postfix

    def summary(self) -> dict:
        t, seconds = self.totals(), self.seconds
        return {
            "prompts_in_file": self.total,
            "skipped_already_done": self.skipped,
            "answered": t.prompts,
            "errors": t.errors,
            "seconds": round(seconds, 4),
            "tokens": t.tokens,
            "tokens_per_s": _ratio(t.tokens, seconds),
            "tokens_per_step": _ratio(t.tokens, t.steps),
            "redispatched_batches": self.redispatched_batches,
            "split_batches": self.split_batches,
            "workers": {name: s.as_dict() for name, s in sorted(self.workers.items())},
        }


def result_tokens(record: dict) -> tuple[int, int]:
    """(new tokens, decode steps) of one result, drafted tokens for a draft record; steps is 0
    when the engine does not say."""
    metrics = record.get("metrics") or {}
    tokens = metrics.get("new_tokens", metrics.get("drafted_tokens"))
    if tokens is None:
        ids = record.get("token_ids") or []
        tokens = len(ids) if all(isinstance(t, int) for t in ids) else 0
    return int(tokens), int(metrics.get("steps", 0))


def format_summary(summary: dict) -> str:
    """A human table: one row per worker and a total row."""
    header = f"{'worker':<12}{'prompts':>8}{'errors':>8}{'tokens':>9}{'tok/s':>9}{'tok/step':>9}"
    rows = [header, "-" * len(header)]
    for name, w in summary["workers"].items():
        rows.append(_row(name, w))
    rows.append("-" * len(header))
    rows.append(_row("total", {**summary, "prompts": summary["answered"]}))
    rows.append(
        f"{summary['seconds']:.1f} s wall; {summary['skipped_already_done']} already done; "
        f"{summary['redispatched_batches']} batches re-dispatched after a worker died"
    )
    return "\n".join(rows)


def _row(name: str, w: dict) -> str:
    per_step = "-" if w["tokens_per_step"] is None else f"{w['tokens_per_step']:.2f}"
    per_s = "-" if w["tokens_per_s"] is None else f"{w['tokens_per_s']:.1f}"
    return f"{name:<12}{w['prompts']:>8}{w['errors']:>8}{w['tokens']:>9}{per_s:>9}{per_step:>9}"


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None
