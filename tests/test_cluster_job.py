"""Real Ray clusters: a `ray start --head` cluster on localhost with a submitted job and a killed
coordinator, and extra nodes (more raylets on this machine) for placement.

The head cluster lives in its own temp dir on free ports; it is stopped by killing exactly the
processes of that cluster (`ray stop` would stop every Ray on the machine, other people's too).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.coordinator import DispatchConfig, ray_runner, run_job, start_workers
from cluster.testing import EchoEngine
from cluster.worker import WorkerResources
from pipeline.prompts import PromptFile, PromptItem, read_prompts

pytestmark = pytest.mark.ray

ECHO = "cluster.testing:EchoEngine.from_env"


@dataclass(frozen=True)
class Head:
    address: str
    dashboard: str
    env: dict
    ray_start: list[str]  # `ray start` with this cluster's temp dir, to add nodes


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """SIGTERM, then SIGKILL, the processes of the cluster in `temp_dir` (and its client server,
    which names only the GCS address) and their children."""
    me, address = os.getpid(), f":{gcs_port}"

    def ours(args):
        return any(temp_dir in arg or arg.endswith(address) for arg in args or ())

    roots = [p for p in psutil.process_iter(["cmdline"]) if p.pid != me and ours(p.info["cmdline"])]
    procs = set(roots)
    for p in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update(p.children(recursive=True))
    procs = [p for p in procs if p.pid != me]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def running_head(dashboard_host: str = "127.0.0.1"):
    """A `ray start --head` cluster in its own temp dir on free ports, stopped afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/sdray")  # short: Ray's unix sockets live in it
    gcs, dashboard, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    ray_start = [
        str(Path(sys.executable).parent / "ray"), "start", "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    command = [
        *ray_start, "--head", f"--port={gcs}",
        f"--dashboard-host={dashboard_host}", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=4",
    ]  # fmt: skip
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, ray_start)
    finally:
        stop_cluster(temp_dir, gcs)


@pytest.fixture(scope="module")
def head():
    with running_head() as cluster:
        yield cluster


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_submitted_to_a_running_cluster(head, tmp_path):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"id": f"q{i}", "prompt": "tell me " * (i + 1)} for i in range(9)]
        + [{"id": "empty", "prompt": " "}, {"id": "long", "prompt": "x" * 500}],
    )
    out = tmp_path / "out.jsonl"
    client = JobSubmissionClient(head.dashboard)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m cluster.job generate --prompts {prompts} --out {out} "
        f"--workers 2 --batch-size 2 --engine-factory {ECHO} --no-progress",
        runtime_env={"env_vars": {"SPECDRAFT_ECHO_MAX_PROMPT_CHARS": "200"}},
        entrypoint_num_cpus=0,
    )
    deadline = time.monotonic() + 180
    while not client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline, "job did not finish in 180 s"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    got = {r["id"]: r for r in records(out)}
    assert sorted(got) == sorted([f"q{i}" for i in range(9)] + ["empty", "long"])
    want = {r["id"]: r for r in EchoEngine().generate(read_prompts(prompts).items[:9])}
    for i in range(9):
        assert {k: v for k, v in got[f"q{i}"].items() if k != "worker"} == want[f"q{i}"]
    assert got["empty"]["error"].startswith("empty prompt")
    assert "over the context length 200" in got["long"]["error"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert sorted(summary["worker_placement"]) == ["worker-0", "worker-1"]
    assert "total" in logs and str(out) in logs


def test_killed_coordinator_resumes_without_loss_or_duplicates(head, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "cluster.job", "generate", "--prompts", str(prompts),
        "--out", str(out), "--address", head.address, "--workers", "2",
        "--batch-size", "2", "--engine-factory", ECHO, "--no-progress",
    ]  # fmt: skip
    slow = dict(head.env, SPECDRAFT_ECHO_DELAY_S="0.3")
    first = subprocess.Popen(command, env=slow, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_text().splitlines()) < 4:
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "first run wrote nothing in 120 s"
        time.sleep(0.02)
    first.kill()  # SIGKILL: no cleanup, no final flush
    first.wait(timeout=30)
    done_before = len(records(out))
    assert 4 <= done_before < 40
    second = subprocess.run(command, env=head.env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    ids = [r["id"] for r in records(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(1, 41)]  # text lines: ids 1..40
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["skipped_already_done"] == done_before
    assert summary["answered"] == 40 - done_before


def test_workers_spread_over_simulated_gpu_nodes(head):
    # Two more nodes (raylets on this machine), each with room for both workers: only the SPREAD
    # placement group separates them. Their "GPUs" are Ray resources only (no devices): what is
    # tested is the accounting and placement; the head node has no GPUs, so no worker lands there.
    for agent_port in free_ports(2):
        subprocess.run(
            [*head.ray_start, f"--address={head.address}", "--num-cpus=2", "--num-gpus=2",
             f"--dashboard-agent-listen-port={agent_port}"],
            env=head.env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    ray.init(address=head.address, log_to_driver=False)
    try:
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
        pool = start_workers(EchoEngine, 2, WorkerResources(cpus=1, gpus=1), spread=True)
        config = DispatchConfig(batch_size=2)
        prompts = [PromptItem(id=str(i), prompt="hello " * i) for i in range(1, 13)]
        try:
            summary = run_job(
                PromptFile(prompts, []), Path(tempfile.mkdtemp()) / "out.jsonl", "generate",
                ray_runner(pool.actors, "generate", config), config, progress=False,
            )  # fmt: skip
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
    placed = {info["node_id"] for info in pool.info.values()}
    assert len(gpu_nodes) == 2 and placed == gpu_nodes
    assert [len(info["gpu_ids"]) for info in pool.info.values()] == [1, 1]
    assert summary["answered"] == 12
    assert all(w["prompts"] > 0 for w in summary["workers"].values())


def specdraft(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def test_cli_local_mode_writes_results_summary_plot_and_resumes(tmp_path):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": "hi " * i} for i in range(1, 7)]
    )
    out, png = tmp_path / "out.jsonl", tmp_path / "report.png"
    common = ["--prompts", str(prompts), "--out", str(out), "--engine-factory", ECHO]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local = ["--local", "--workers", "2", "--devices-per-worker", "2", "--batch-size", "2"]
    first = specdraft("generate", *common, *local, "--plot", str(png), "--no-progress", env=env)
    assert first.returncode == 0, first.stderr
    assert sorted(r["id"] for r in records(out)) == [f"q{i}" for i in range(1, 7)]
    assert "total" in first.stdout and png.stat().st_size > 10_000
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert sorted(summary["worker_placement"]) == ["worker-0", "worker-1"]
    again = specdraft("draft", *common, "--no-progress", env=env)  # in-process, nothing left
    assert again.returncode == 0, again.stderr
    assert "6 already done" in again.stdout and len(records(out)) == 6


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"'], "p.jsonl:2: not valid JSON"),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "p.jsonl:2: duplicate id"),
    ],
)
def test_cli_bad_prompt_file_exits_2_naming_the_line(tmp_path, lines, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    result = specdraft("generate", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                       "--engine-factory", ECHO)  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_unreachable_cluster_says_how_to_start_one(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}])
    (port,) = free_ports(1)  # nothing listens there
    io = ["--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    result = specdraft("generate", *io, "--address", f"127.0.0.1:{port}", "--engine-factory", ECHO)
    assert result.returncode == 2, result.stderr
    assert "cannot reach a Ray cluster" in result.stderr and "ray start --head" in result.stderr


def test_info_on_a_loopback_cluster_does_not_warn(head):
    result = specdraft("info", "--address", head.address, "--json", env=head.env, timeout=120)
    assert result.returncode == 0, result.stderr
    ray_report = json.loads(result.stdout)["ray"]
    assert ray_report["connected"] and ray_report["dashboard"].endswith(head.dashboard[-5:])
    assert "warning" not in ray_report and "WARNING" not in result.stderr


def test_info_warns_when_the_job_api_listens_beyond_loopback():
    with running_head(dashboard_host="0.0.0.0") as exposed:
        result = specdraft("info", "--address", exposed.address, env=exposed.env, timeout=120)
    assert result.returncode == 0, result.stderr
    port = exposed.dashboard.rsplit(":", 1)[1]
    warning = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1, result.stderr
    assert f"(port {port}) listen on 0.0.0.0" in warning[0]
    assert "--dashboard-host 127.0.0.1" in warning[0] and "RAY_AUTH_MODE=token" in warning[0]


def test_listening_addresses_are_read_from_the_kernel():
    from cluster.commands.info import exposure_warning, listening_hosts

    with contextlib.ExitStack() as stack:
        wide, local = (stack.enter_context(socket.socket()) for _ in range(2))
        wide.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        for s in (wide, local):
            s.listen()
        wide_port, local_port = wide.getsockname()[1], local.getsockname()[1]
        assert listening_hosts(wide_port) == ["0.0.0.0"]
        assert listening_hosts(local_port) == ["127.0.0.1"]
        assert exposure_warning(f"127.0.0.1:{wide_port}") is not None
        assert exposure_warning(f"http://127.0.0.1:{local_port}") is None
        assert "10.0.0.5" in exposure_warning(f"10.0.0.5:{local_port}")
