"""Chaos soak (issue 44, point 4): the real `generate` command over 2 local workers while a
separate thread SIGKILLs a worker actor process three times at random moments, then the
coordinator itself; the same command then resumes. Every prompt must end up exactly once in a
JSONL file that parses line by line, and the resumed run's summary must agree with the file.

How the kills are made to count:
- The coordinator is a real separate process (`python -m cluster.job generate --local`), so its
  SIGKILL is a real crash: no `finally`, no flush, an embedded Ray left without its driver.
- The engine is EchoEngine (no JAX) with a delay per batch, wrapped by `chaos_engine` below so
  each worker appends "batch started / ended" lines to a log. The log tells the chaos thread
  which worker process is in the middle of a batch (the one to kill, so the kill always loses
  work) and tells the test afterwards that the coordinator sent the lost prompts out again
  before it was killed itself: the output file alone cannot show that, since the resumed run
  would answer dropped prompts anyway.
- A worker is killed only at the start of a batch: never one that Ray is still restarting (that
  kill would lose no batch, only burn a restart) and never one between batches, so every kill
  is a loss the coordinator must repair, whatever the machine's load.
- A SIGKILL can tear the output's last line only if it lands between two write syscalls (a
  microsecond window), so after the coordinator kill the test appends the torn half of a record
  itself, as a crash mid-write would leave it; the resumed run must cut it off.

Only processes of this test are killed: worker actors are found as descendants of the
coordinator subprocess (psutil), and its Ray runs in a temp dir of its own (RAY_TMPDIR).

The random moments come from a seeded `random.Random`; the seed is in every assertion message
and SPECDRAFT_CHAOS_SEED=<seed> replays a run's schedule.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cluster.testing import EchoEngine
from pipeline.prompts import read_prompts

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = 96
BATCH_SIZE = 4  # 24 batches, 12 per worker
DELAY_S = 2.0  # per batch: ~25 s of work for 2 workers, so every kill lands mid-run
KILL_MARGIN_S = 1.0  # kill a worker only while its batch still has >= this long to run
WORKER_KILLS = 3
GAP_S = (0.5, 3.0)  # random pause before each kill
LOG_ENV = "SPECDRAFT_CHAOS_LOG"  # SPECDRAFT_*: forwarded to the workers by worker_options


class _LoggedEcho:
    """EchoEngine.from_env whose batches are logged, one JSON line at their start and end."""

    def __init__(self):
        self.echo, self.log = EchoEngine.from_env(), os.environ[LOG_ENV]

    def generate(self, items):
        self._note("start", items)
        results = self.echo.generate(items)  # sleeps DELAY_S: the window for a kill
        self._note("end", items)
        return results

    def _note(self, event, items):
        line = json.dumps(
            {"event": event, "pid": os.getpid(), "ids": [i.id for i in items], "t": time.time()}
        )
        # One O_APPEND write per line: two workers append to the same log without interleaving.
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def chaos_engine():
    """The `--engine-factory test_chaos:chaos_engine` of the job (built inside each worker)."""
    return _LoggedEcho()


@dataclass(frozen=True)
class LogEntry:
    event: str
    pid: int
    ids: tuple[str, ...]
    t: float
    end: int  # byte offset just past this line: entries with larger offsets came later


def read_log(path: Path) -> list[LogEntry]:
    if not path.exists():
        return []
    entries, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        offset += len(line)
        if line.endswith(b"\n"):
            e = json.loads(line)
            entries.append(LogEntry(e["event"], e["pid"], tuple(e["ids"]), e["t"], offset))
    return entries


def open_batches(entries: list[LogEntry]) -> list[LogEntry]:
    """Batches started and not (yet) ended by the process that started them."""
    running = {}
    for e in entries:
        if e.event == "start":
            running[e.pid, e.ids] = e
        else:
            running.pop((e.pid, e.ids), None)
    return list(running.values())


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def descendants(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.children(recursive=True)
    return []


def worker_actors(coordinator: psutil.Process) -> dict[int, psutil.Process]:
    """The coordinator's Worker actor processes: Ray titles them `ray::Worker[.method]`."""
    found = {}
    for p in descendants(coordinator):
        with contextlib.suppress(psutil.Error):
            if (p.cmdline() or [""])[0].startswith("ray::Worker"):
                found[p.pid] = p
    return found


def kill_all(procs) -> None:
    """SIGKILL these processes and everything below them; wait until they are gone."""
    procs = set(procs)
    for p in list(procs):
        procs.update(descendants(p))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not [p for p in alive if not _zombie(p)], f"could not kill {alive}"


def _zombie(proc: psutil.Process) -> bool:
    """Dead, not yet reaped (an orphan's parent may be a PID 1 that never reaps)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class WorkerKill:
    pid: int
    lost: tuple[str, ...]  # the batch it was running, per the engine log
    log_end: int  # engine log size when it was killed
    lines: int  # output lines when it was killed


class Chaos(threading.Thread):
    """Kills WORKER_KILLS worker processes of `coordinator`, each mid-batch, then the coordinator
    once the batches they lost have been sent out again. Records what it did; never raises (an
    error is kept for the test to report)."""

    def __init__(self, coordinator: subprocess.Popen, out: Path, log: Path, rng: random.Random):
        super().__init__(daemon=True)
        self.coordinator, self.out, self.log, self.rng = coordinator, out, log, rng
        self.kills: list[WorkerKill] = []
        self.coordinator_killed = False
        self.coordinator_tree: list[psutil.Process] = []  # its processes just before its kill
        self.coordinator_log_end = 0  # engine log size once the coordinator was dead
        self.error: BaseException | None = None
        self.timeline: list[str] = []  # what happened when, for failure messages
        self._t0 = time.monotonic()

    def _note(self, what: str):
        self.timeline.append(f"{time.monotonic() - self._t0:6.1f} s  {what}")

    def run(self):
        try:
            self._chaos()
        except BaseException as err:  # reported by the test
            self.error = err

    def _chaos(self):
        self._wait(lambda: complete_lines(self.out) > 0, 180, "the first results")
        self._note("first results")
        for _ in range(WORKER_KILLS):
            time.sleep(self.rng.uniform(*GAP_S))
            self._kill_a_worker()
        # The coordinator kill must come after the lost batches went out again, or the first run
        # could not show its re-dispatch; the test asserts it, so a timeout here is no error.
        with contextlib.suppress(TimeoutError):
            self._wait(lambda: not not_redispatched(self.kills, read_log(self.log)), 60, "")
            self._note("the lost batches went out again")
        time.sleep(self.rng.uniform(*GAP_S))
        self._check_running()
        coordinator = psutil.Process(self.coordinator.pid)
        # Its Ray (GCS, raylet, workers) dies with it or is orphaned: note it before the kill.
        self.coordinator_tree = descendants(coordinator)
        self.coordinator.kill()  # SIGKILL
        self.coordinator_killed = True
        self.coordinator.wait(timeout=30)
        self.coordinator_log_end = self.log.stat().st_size
        self._note(f"killed the coordinator, {complete_lines(self.out)} lines")

    def _kill_a_worker(self):
        """SIGKILL a worker actor whose batch started less than DELAY_S - KILL_MARGIN_S ago, so
        the batch is surely still running when the signal lands: the kill loses work."""
        self._check_running()
        coordinator = psutil.Process(self.coordinator.pid)
        deadline = time.monotonic() + 60
        while True:
            self._check_running()
            actors = worker_actors(coordinator)
            log_end = self.log.stat().st_size
            now = time.time()
            for batch in open_batches(read_log(self.log)):
                if batch.pid in actors and now - batch.t < DELAY_S - KILL_MARGIN_S:
                    kill_all([actors[batch.pid]])
                    kill = WorkerKill(batch.pid, batch.ids, log_end, complete_lines(self.out))
                    self._note(f"killed worker {kill.pid} running {kill.lost}, {kill.lines} lines")
                    self.kills.append(kill)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("no worker actor was at the start of a batch for 60 s")
            time.sleep(0.02)

    def _check_running(self):
        if self.coordinator.poll() is not None:
            raise RuntimeError(
                f"the first run ended by itself, status {self.coordinator.returncode}"
            )

    def _wait(self, done, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while not done():
            self._check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} in {timeout_s} s")
            time.sleep(0.05)


def not_redispatched(kills: list[WorkerKill], entries: list[LogEntry]) -> list[str]:
    """Ids of batches lost with a killed worker that no other process started after the kill."""
    missing = []
    for kill in kills:
        again = {
            i for e in entries if e.event == "start" and e.end > kill.log_end and e.pid != kill.pid
            for i in e.ids
        }  # fmt: skip
        missing += [i for i in kill.lost if i not in again]
    return missing


@pytest.fixture
def ray_tmpdir():
    """A Ray temp dir for this test only (short: Ray's unix sockets live in it)."""
    path = tempfile.mkdtemp(prefix="/tmp/sdchaos")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_chaos_soak_every_prompt_exactly_once(tmp_path, ray_tmpdir):
    seed = int(os.environ.get("SPECDRAFT_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    why = f"chaos seed {seed} (replay: SPECDRAFT_CHAOS_SEED={seed})"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"q{i:02d}", "prompt": f"prompt {i}: " + "word " * (i % 7)}) + "\n"
            for i in range(PROMPTS)
        )
    )
    items = {item.id: item for item in read_prompts(prompts).items}
    out, log = tmp_path / "out.jsonl", tmp_path / "batches.log"
    command = [
        sys.executable, "-m", "cluster.job", "generate", "--prompts", str(prompts),
        "--out", str(out), "--local", "--workers", "2", "--batch-size", str(BATCH_SIZE),
        "--max-restarts", "5", "--engine-factory", "test_chaos:chaos_engine", "--no-progress",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmpdir,
        SPECDRAFT_ECHO_DELAY_S=str(DELAY_S),
        **{LOG_ENV: str(log)},
        # This checkout's code (not whatever is installed) and this module, for chaos_engine.
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")])
        ),
    )
    first_log, second_log = tmp_path / "first.txt", tmp_path / "second.txt"
    with first_log.open("wb") as sink:
        first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=sink, stderr=sink)
    chaos = Chaos(first, out, log, random.Random(seed))
    try:
        chaos.start()
        chaos.join(timeout=400)
    finally:
        # Its Ray outlives a killed driver for a moment (the driver's death takes the GCS and
        # raylet down, a worker notices a little later): none of it may linger or write.
        kill_all([psutil.Process(first.pid)] if first.poll() is None else [])
        kill_all(chaos.coordinator_tree)
    why += "\n" + "\n".join(chaos.timeline)
    output = first_log.read_text(errors="replace")
    assert not chaos.is_alive(), f"{why}: the chaos thread hangs\n{output}"
    assert chaos.error is None, f"{why}: {chaos.error!r}\n{output}"

    # The chaos was delivered: three workers killed mid-batch, then the coordinator mid-run.
    kills = chaos.kills
    assert len(kills) == WORKER_KILLS, f"{why}: worker kills {kills}"
    assert len({k.pid for k in kills}) == WORKER_KILLS, f"{why}: a pid killed twice {kills}"
    assert chaos.coordinator_killed and first.returncode == -9, f"{why}: {first.returncode}"
    lines_at_kill = complete_lines(out)
    assert lines_at_kill < PROMPTS, f"{why}: the first run had finished"
    entries = read_log(log)
    first_run = [e for e in entries if e.end <= chaos.coordinator_log_end]
    for kill in kills:
        ended = [
            e for e in first_run if e.event == "end" and (e.pid, e.ids) == (kill.pid, kill.lost)
        ]
        assert not ended, f"{why}: worker {kill.pid} finished its batch before the kill landed"
    # ... and each killed worker's batch went out again in the first run, to another process.
    lost_for_good = not_redispatched(kills, first_run)
    assert not lost_for_good, f"{why}: the coordinator never re-sent {lost_for_good}; {kills}"

    # A crash in the middle of a write leaves a torn last line: simulate one if the kill did not.
    before = out.read_bytes()
    done_before = {json.loads(line)["id"] for line in before.splitlines(keepends=True)
                   if line.endswith(b"\n")}  # fmt: skip
    if before.endswith(b"\n"):
        pending = sorted(set(items) - done_before)[0]
        record = dict(EchoEngine().generate([items[pending]])[0], worker="worker-0")
        text = json.dumps(record)
        with out.open("a") as f:
            f.write(text[: len(text) // 2])
    complete = before[: before.rfind(b"\n") + 1]

    # The same command resumes, with no chaos, to the end.
    resumed = time.monotonic()
    with second_log.open("wb") as sink:
        second = subprocess.Popen(command, env=env, cwd=ROOT, stdout=sink, stderr=sink)
    try:
        second.wait(timeout=300)
    finally:
        kill_all([psutil.Process(second.pid)] if second.poll() is None else [])
    why += f"\nresumed run: {time.monotonic() - resumed:.1f} s, status {second.returncode}"
    print(why)  # the schedule of a passing run, for `pytest -s`
    output = second_log.read_text(errors="replace")
    assert second.returncode == 0, f"{why}: the resumed run failed\n{output}"

    data = out.read_bytes()
    assert data.startswith(complete), f"{why}: the resumed run changed lines it had not written"
    assert data.endswith(b"\n"), f"{why}: the output does not end with a newline"
    got = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            got.append(json.loads(line))
        except json.JSONDecodeError as err:
            pytest.fail(f"{why}: {out}:{number} is not JSON ({err}): {line[:200]!r}")
    counts = collections.Counter(r["id"] for r in got)
    assert [i for i, n in counts.items() if n > 1] == [], f"{why}: duplicated ids"
    assert sorted(counts) == sorted(items), f"{why}: ids lost {sorted(set(items) - set(counts))}"
    for r in got:
        assert "error" not in r, f"{why}: {r}"
        want = EchoEngine().generate([items[r["id"]]])[0]
        assert {k: v for k, v in r.items() if k != "worker"} == want, f"{why}: wrong answer {r}"

    summary = json.loads(out.with_suffix(".summary.json").read_text())
    added = len(got) - len(done_before)
    counts_in_summary = {k: summary[k] for k in ("skipped_already_done", "answered", "errors")}
    assert summary["prompts_in_file"] == PROMPTS, f"{why}: {summary}"
    assert sum(counts_in_summary.values()) == PROMPTS, f"{why}: {counts_in_summary}"
    assert counts_in_summary == {
        "skipped_already_done": len(done_before),
        "answered": added,
        "errors": 0,
    }, f"{why}: summary vs file ({len(done_before)} lines before the resume, {added} added)"
    assert sum(w["prompts"] for w in summary["workers"].values()) == added, f"{why}: {summary}"
    assert summary["duplicates_dropped"] == 0, f"{why}: {summary}"
    assert summary["redispatched_batches"] == 0, f"{why}: no worker died in the resumed run"
