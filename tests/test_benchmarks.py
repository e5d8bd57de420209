"""benchmarks/: the beam-search cost model and the `specdraft bench drafter` command (tiny)."""

import argparse
import json
from dataclasses import asdict

import jax
import pytest

from benchmarks.drafter import SHAPES, Shape, beam_search_cost, parse_beam
from cluster.cli import main
from drafter.config import DrafterConfig
from drafter.model import init_params


def _cost_from_params(shape: Shape, batch: int, width: int, length: int):
    """Count from the real params pytree. The layer holding `w_llm` (the per-prompt half) has its
    `w_llm` and bias used once per prompt; every other weight and bias is read once per step, and
    every 2-D weight other than `w_llm` multiplies every row of every step."""
    params = jax.eval_shape(lambda: init_params(DrafterConfig(**asdict(shape)), jax.random.key(0)))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = [(jax.tree_util.keystr(p), x) for p, x in leaves]
    split_layers = {path.rsplit("[", 1)[0] for path, _ in flat if "w_llm" in path}
    once = lambda path: "w_llm" in path or (path.endswith("['b']") and path[:-5] in split_layers)
    per_prompt = sum(x.size for path, x in flat if once(path))
    per_step = sum(x.size for path, x in flat if not once(path))
    per_row = sum(x.size for path, x in flat if x.ndim == 2 and not once(path))
    w_llm = sum(x.size for path, x in flat if "w_llm" in path)
    rows = batch + batch * width * (length - 1)
    flops = 2 * rows * per_row + 2 * batch * w_llm
    weight_bytes = 4 * (length * per_step + per_prompt + rows * shape.hidden_size)  # + embed rows
    return flops, weight_bytes


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("batch, width, length", [(1, 45, 5), (8, 8, 5), (3, 1, 1)])
def test_cost_model_matches_the_params(name, batch, width, length):
    cost = beam_search_cost(SHAPES[name], batch, width, length)
    flops, weight_bytes = _cost_from_params(SHAPES[name], batch, width, length)
    assert cost.flops == flops
    assert cost.weight_bytes == weight_bytes


def test_projection_shape_counts_its_projection():
    with_proj = Shape(hidden_size=8, vocab_size=16, exit_dim=24, num_draft_layers=1)
    flops, weight_bytes = _cost_from_params(with_proj, 2, 3, 4)
    cost = beam_search_cost(with_proj, 2, 3, 4)
    assert (cost.flops, cost.weight_bytes) == (flops, weight_bytes)


def test_parse_beam():
    assert parse_beam("45x5") == (45, 5)
    for bad in ("45", "0x5", "ax5", "2x4r"):  # per root: not what bench drafter times
        with pytest.raises(argparse.ArgumentTypeError):
            parse_beam(bad)


def test_bench_drafter_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "drafter", "--shapes", "tiny", "--batches", "2", "--beams", "3x2", "1x1",
            "--quick", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["gflops"] > 0 and doc["machine"]["gbps"] > 0
    cases = [(r["shape"], r["batch"], r["width"], r["length"]) for r in doc["results"]]
    assert cases == [("tiny", 2, 3, 2), ("tiny", 2, 1, 1)]
    for r in doc["results"]:
        assert r["median_ms"] > 0 and r["bound_ms"] > 0
        assert r["ratio"] == pytest.approx(r["median_ms"] / r["bound_ms"], rel=1e-2)


def test_bench_matmul_writes_json(tmp_path):
    from pipeline import kernels

    if not kernels.available():  # the benchmark compares the kernel with XLA: nothing to time
        pytest.skip(f"the kernel is unavailable: {kernels.unavailable_reason()}")
    out = tmp_path / "matmul.json"
    argv = ["bench", "matmul", "--shapes", "wk", "--rows", "1", "9", "--rounds", "2",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert [(r["shape"], r["rows"]) for r in doc["results"]] == [("wk", 1), ("wk", 9)]
    for r in doc["results"]:
        assert r["xla_ms"] > 0 and r["kernel_ms"] > 0
        assert r["xla_over_kernel"] == pytest.approx(r["xla_ms"] / r["kernel_ms"])
        assert r["weight_pass_ms"] == min(doc["results"][0]["xla_ms"],
                                          doc["results"][0]["kernel_ms"])  # fmt: skip
    assert doc["kernel_tile"]["vector_floats"] in (4, 8, 16)


@pytest.mark.ray
def test_bench_draft_writes_json(tmp_path):
    """`bench draft` on a tiny model: both methods, in process and through one pinned worker."""
    out = tmp_path / "draft.json"
    argv = ["bench", "draft", "--tiny-model", "--num-prompts", "2", "--batch-size", "2",
            "--shapes", "3x2", "--workers", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert {"commit", "jax", "jaxlib", "cpu_model", "cpu_flags", "device_count"} <= set(
        doc["provenance"]
    )
    assert len(doc["load_average_before"]) == len(doc["load_average_after"]) == 3
    rows = {(r["method"], r["where"]): r for r in doc["results"]}
    assert set(rows) == {(m, w) for m in ("beam", "sample") for w in ("in-process", "ray-1")}
    for (method, where), r in rows.items():
        assert (r["width"], r["length"], r["prompts"], r["sequences"]) == (3, 2, 2, 6)
        assert r["sequences_per_s"] == pytest.approx(6 / r["seconds"], rel=1e-2)
        assert r["compiled_batches"] == 0  # the warm-up compiled every batch shape
        if where == "ray-1":
            assert r["pinned"] and len(r["cpus"]) == 1 and len(r["cpus"][0]) == 1
            assert r["identical_to_in_process"] == 2  # keys come from the prompt ids
            base = rows[method, "in-process"]["seconds"]
            assert r["ratio"] == pytest.approx(base / r["seconds"], rel=1e-2)


def test_the_weights_table_reads_decode_and_llama_cpp_json(tmp_path):
    import json

    from benchmarks.tables import main

    row = {"policy": "adaptive", "batch": 8, "weights": "native", "weight_bytes_per_step": 112e6,
           "ar_tok_s": 150.0, "spec_tok_s": 140.0, "speedup_vs_baseline_ar": 1.5,
           "rows_identical_to_ar": 16, "prompts": 16}  # fmt: skip
    decode = tmp_path / "d.json"
    decode.write_text(json.dumps({"prompts_file": "x/heldout-short.jsonl", "results": [row]}))
    llama = tmp_path / "l.json"
    llama.write_text(json.dumps({"benchmark": "llama-cpp", "results": [
        {"tool": "llama-batched-bench", "batch": 8, "tok_s": 165.0},
        {"tool": "llama-batched-bench", "batch": 1, "tok_s": 99.0},
        {"tool": "llama-bench", "batch": 1, "tok_s": 110.0}]}))  # fmt: skip
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["weights", str(decode), str(llama)]) == 0
    assert "| heldout-short | 8 | native | 112 | 150.0 | 140.0 | **1.50** | 16/16 | 165.0 |" in (
        out.getvalue()
    )
    assert main(["nonsense", str(decode)]) == 2
