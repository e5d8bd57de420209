"""The Ray layer on one embedded local Ray (shared by the module): dispatch, faults, resume.

Uses the echo test engine (cluster/testing.py) so what is tested is the coordinator and the
actors, not a model; the last Ray test runs the real engine on a tiny random model end to end.
"""

import functools
import json
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster.coordinator import (
    AllWorkersDead,
    DispatchConfig,
    IncompleteJob,
    in_process_runner,
    make_batches,
    ray_runner,
    run_job,
    start_workers,
)
from cluster.testing import EchoEngine, TinyEngineFactory
from cluster.worker import WorkerResources
from pipeline.prompts import PromptFile, PromptItem

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def items(n, prefix="p"):
    return [PromptItem(id=f"{prefix}{i}", prompt="word " * (1 + i % 9)) for i in range(n)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(engine, prompts):
    return {r["id"]: r for r in engine.generate(prompts)}


def run_in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=fn()), daemon=True)
    thread.start()
    return thread, box


def wait_for_lines(path: Path, count: int, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"{path} did not reach {count} lines in {timeout_s} s")


def test_batches_group_similar_lengths():
    prompts = [PromptItem(id=str(i), prompt="x" * n) for i, n in enumerate([9, 1, 5, 2, 8, 1])]
    batches = make_batches(prompts, 2)
    assert [[len(p.prompt) for p in b] for b in batches] == [[1, 1], [2, 5], [8, 9]]
    assert [p.id for p in batches[0]] == ["1", "5"]  # stable among equal lengths


def test_two_workers_answer_every_prompt_once_like_the_engine(local_ray, tmp_path):
    engine = EchoEngine(delay_s=0.02)
    pool = start_workers(
        functools.partial(EchoEngine, delay_s=0.02), 2, WorkerResources(cpu_devices=3)
    )
    try:
        devices = ray.get([a.info.remote(devices=True) for a in pool.actors.values()])
        config = DispatchConfig(batch_size=3)
        prompts = items(40)
        out = tmp_path / "out.jsonl"
        summary = run_job(
            PromptFile(prompts, []),
            out,
            "generate",
            ray_runner(pool.actors, "generate", config),
            config,
            progress=False,
        )
    finally:
        pool.shutdown()
    assert [len(d["devices"]) for d in devices] == [3, 3]
    assert all("cpu" in name.lower() for d in devices for name in d["devices"])
    got = records(out)
    assert sorted(r["id"] for r in got) == sorted(p.id for p in prompts)
    want = expected(engine, prompts)
    for r in got:
        assert {k: v for k, v in r.items() if k != "worker"} == want[r["id"]]
    assert {r["worker"] for r in got} == {"worker-0", "worker-1"}
    assert summary["answered"] == 40 and summary["errors"] == 0
    assert summary["tokens"] == sum(len(r["token_ids"]) for r in got)
    assert (
        summary["workers"]["worker-0"]["prompts"] + summary["workers"]["worker-1"]["prompts"] == 40
    )


def test_killed_worker_mid_batch_loses_and_duplicates_nothing(local_ray, tmp_path):
    factory = functools.partial(EchoEngine, delay_s=0.1)
    pool = start_workers(factory, 2, WorkerResources(max_restarts=0))
    config = DispatchConfig(batch_size=2, in_flight_per_worker=2)
    prompts, out = items(30), tmp_path / "out.jsonl"
    runner = ray_runner(pool.actors, "generate", config)
    try:
        thread, box = run_in_thread(
            lambda: run_job(PromptFile(prompts, []), out, "generate", runner, config, False)
        )
        wait_for_lines(out, 2)
        # Both workers hold their in-flight batches now (15 batches, 2 per worker at a time).
        ray.kill(pool.actors["worker-0"], no_restart=True)
        thread.join(timeout=120)
    finally:
        pool.shutdown()
    summary = box["out"]
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == sorted(p.id for p in prompts)
    assert summary["redispatched_batches"] >= 1
    assert summary["duplicates_dropped"] == 0
    # The survivor did most of the work. On a loaded machine worker-0 may die before answering
    # anything, and a worker with no answers has no entry in the summary.
    killed = summary["workers"].get("worker-0", {"prompts": 0})["prompts"]
    assert summary["workers"]["worker-1"]["prompts"] > killed


def test_restarted_worker_rejoins(local_ray, tmp_path):
    # Enough work left after the kill (~7 s for one worker) to outlast a restart (0-4 s here).
    factory = functools.partial(EchoEngine, delay_s=0.25)
    pool = start_workers(factory, 2, WorkerResources(max_restarts=1))
    config = DispatchConfig(batch_size=2)
    prompts, out = items(60), tmp_path / "out.jsonl"
    runner = ray_runner(pool.actors, "generate", config)
    old_pid = pool.info["worker-0"]["pid"]
    try:
        thread, box = run_in_thread(
            lambda: run_job(PromptFile(prompts, []), out, "generate", runner, config, False)
        )
        wait_for_lines(out, 2)
        before = sum(r["worker"] == "worker-0" for r in records(out))
        ray.kill(pool.actors["worker-0"], no_restart=False)
        thread.join(timeout=120)
        new_pid = ray.get(pool.actors["worker-0"].info.remote())["pid"]
    finally:
        pool.shutdown()
    got = records(out)
    assert sorted(r["id"] for r in got) == sorted(p.id for p in prompts)
    assert box["out"]["redispatched_batches"] >= 1
    assert new_pid != old_pid
    assert sum(r["worker"] == "worker-0" for r in got) > before  # worked again after restart


def test_prompt_that_kills_workers_is_isolated_as_an_error(local_ray, tmp_path):
    factory = functools.partial(EchoEngine, exit_marker="POISON")
    pool = start_workers(factory, 2, WorkerResources(max_restarts=2))
    # One batch in flight per worker, so each death loses exactly the poisoned call.
    config = DispatchConfig(batch_size=4, in_flight_per_worker=1, max_batch_attempts=1)
    prompts = [*items(7), PromptItem(id="bad", prompt="word POISON")]
    out = tmp_path / "out.jsonl"
    try:
        summary = run_job(
            PromptFile(prompts, []),
            out,
            "generate",
            ray_runner(pool.actors, "generate", config),
            config,
            progress=False,
        )
    finally:
        pool.shutdown()
    got = {r["id"]: r for r in records(out)}
    assert sorted(got) == sorted(p.id for p in prompts)
    assert got["bad"]["error"] == "the worker process died running this prompt (1 tries)"
    assert all("text" in r for i, r in got.items() if i != "bad")
    assert summary["split_batches"] == 1 and summary["redispatched_batches"] == 2


def test_all_workers_dead_stops_with_a_resumable_file(local_ray, tmp_path):
    pool = start_workers(
        functools.partial(EchoEngine, exit_marker="POISON"), 1, WorkerResources(max_restarts=0)
    )
    config = DispatchConfig(batch_size=1, in_flight_per_worker=1)
    prompts = [PromptItem(id="ok", prompt="a"), PromptItem(id="bad", prompt="POISON zz")]
    out = tmp_path / "out.jsonl"
    try:
        with pytest.raises(AllWorkersDead, match="1 prompts not done. Re-run"):
            run_job(
                PromptFile(prompts, []),
                out,
                "generate",
                ray_runner(pool.actors, "generate", config),
                config,
                progress=False,
            )
    finally:
        pool.shutdown()
    assert [r["id"] for r in records(out)] == ["ok"]


def test_engine_exception_fails_only_the_guilty_prompt(local_ray, tmp_path):
    pool = start_workers(functools.partial(EchoEngine, fail_marker="BOOM"), 1, WorkerResources())
    config = DispatchConfig(batch_size=8)
    prompts = [*items(5), PromptItem(id="bad", prompt="BOOM")]
    out = tmp_path / "out.jsonl"
    try:
        run_job(
            PromptFile(prompts, []),
            out,
            "draft",
            ray_runner(pool.actors, "draft", config),
            config,
            progress=False,
        )
    finally:
        pool.shutdown()
    got = {r["id"]: r for r in records(out)}
    assert "fail marker 'BOOM'" in got["bad"]["error"]
    assert got["bad"]["error"].startswith("engine failed on this prompt: RuntimeError")
    want = {r["id"]: r for r in EchoEngine().draft(items(5))}
    assert {
        i: {k: v for k, v in r.items() if k != "worker"} for i, r in got.items() if i != "bad"
    } == want


def test_engine_that_cannot_load_reports_why(local_ray):
    def broken():
        raise FileNotFoundError("no model at /nowhere.gguf; run `specdraft fetch-model`")

    with pytest.raises(RuntimeError, match="2 of 2 workers could not build.*fetch-model"):
        start_workers(broken, 2, WorkerResources())


def test_resume_skips_done_ids_and_repairs_a_torn_line(tmp_path):
    prompts, out = items(10), tmp_path / "out.jsonl"
    engine = EchoEngine()
    done = engine.generate(prompts[:4])
    torn = json.dumps(engine.generate(prompts[4:5])[0])[:20]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + torn)
    config = DispatchConfig(batch_size=3)
    summary = run_job(
        PromptFile(prompts, [{"id": "empty", "error": "empty prompt"}]),
        out,
        "generate",
        in_process_runner(engine, "generate"),
        config,
        progress=False,
    )
    got = records(out)  # every line parses: the torn one was cut
    assert [r["id"] for r in got[:4]] == [p.id for p in prompts[:4]]
    assert sorted(r["id"] for r in got) == sorted([p.id for p in prompts] + ["empty"])
    assert summary["skipped_already_done"] == 4 and summary["answered"] == 6
    again = run_job(
        PromptFile(prompts, [{"id": "empty", "error": "empty prompt"}]),
        out,
        "generate",
        in_process_runner(engine, "generate"),
        config,
        progress=False,
    )
    assert again["skipped_already_done"] == 11 and again["answered"] == 0
    assert len(records(out)) == 11


def test_foreign_output_file_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"no_id": 1}\n')
    with pytest.raises(ValueError, match="out.jsonl:2: not a result record"):
        run_job(
            PromptFile(items(1), []),
            out,
            "generate",
            in_process_runner(EchoEngine(), "generate"),
            DispatchConfig(),
            progress=False,
        )


def test_real_tiny_engine_on_two_workers_equals_the_engine_run_directly(local_ray, tmp_path):
    factory = TinyEngineFactory(max_new_tokens=6, batch_size=4, max_seq_len=64)
    texts = ["hello", "what is this?", "tell me more", "ok", "a b c d", "why", "zz", "eight!"]
    prompts = [PromptItem(id=f"t{i}", prompt=t) for i, t in enumerate(texts)]
    too_long = PromptItem(id="long", prompt="x" * 80)  # > 64-token context
    pool = start_workers(factory, 2, WorkerResources(cpu_devices=2), timeout_s=300)
    config = DispatchConfig(batch_size=4)
    out = tmp_path / "out.jsonl"
    try:
        summary = run_job(
            PromptFile([*prompts, too_long], []), out, "generate",
            ray_runner(pool.actors, "generate", config), config, progress=False,
        )  # fmt: skip
    finally:
        pool.shutdown()
    got = {r["id"]: r for r in records(out)}
    assert sorted(got) == sorted([p.id for p in prompts] + ["long"])
    assert "exceeds the context" in got["long"]["error"]
    direct = {r["id"]: r for r in factory().generate(prompts)}
    for item in prompts:
        assert got[item.id]["token_ids"] == direct[item.id]["token_ids"]
        assert got[item.id]["text"] == direct[item.id]["text"]
    assert {got[p.id]["worker"] for p in prompts} == {"worker-0", "worker-1"}
    assert summary["answered"] == 8 and summary["errors"] == 1
    assert summary["tokens"] == sum(len(direct[p.id]["token_ids"]) for p in prompts)


def test_few_prompts_are_cut_so_every_worker_gets_a_batch(tmp_path):
    summary = run_job(
        PromptFile(items(6), []), tmp_path / "out.jsonl", "generate",
        in_process_runner(EchoEngine(), "generate"), DispatchConfig(batch_size=8),
        progress=False, workers=2,
    )  # fmt: skip
    assert summary["workers"]["in-process"]["batches"] == 2


def test_a_runner_that_loses_a_batch_fails_the_job_instead_of_finishing(tmp_path):
    """A batch neither answered nor recorded as an error (a runner bug) must not end as a
    finished job: the error says how many and that a rerun finishes them."""

    def loses_the_last_batch(batches, stats, on_batch):
        in_process_runner(EchoEngine(), "generate")(batches[:-1], stats, on_batch)

    out = tmp_path / "out.jsonl"
    with pytest.raises(IncompleteJob, match="2 prompts were neither answered"):
        run_job(PromptFile(items(6), []), out, "generate", loses_the_last_batch,
                DispatchConfig(batch_size=4), progress=False)  # fmt: skip
    assert len(out.read_text().splitlines()) == 4
    summary = run_job(PromptFile(items(6), []), out, "generate",
                      in_process_runner(EchoEngine(), "generate"), DispatchConfig(batch_size=4),
                      progress=False)  # fmt: skip
    assert (summary["skipped_already_done"], summary["answered"]) == (4, 2)
