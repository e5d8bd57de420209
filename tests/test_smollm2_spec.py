"""Speculative greedy decoding of the real SmolLM2 equals its autoregressive greedy decoding."""

import warnings

import jax
import pytest

from drafter.config import BeamConfig
from drafter.sampling import SamplingConfig
from pipeline.engine import Engine, EngineConfig
from pipeline.generate import generate
from pipeline.prompts import PromptItem

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "dtype, lookup, in_place", [("float32", 0, False), ("bfloat16", 4, True), ("float32", 4, False)]
)
def test_smollm2_speculative_greedy_equals_autoregressive(dtype, lookup, in_place):
    config = EngineConfig(
        beam=BeamConfig(2, 3), max_new_tokens=16, devices=2, batch_size=2, time_phases=False,
        dtype=dtype, lookup=lookup, lookup_in_place=in_place,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without the shipped drafter an untrained one is fine
        engine = Engine.from_config(config)
    items = [
        PromptItem(id="short", prompt="What is 2+2?"),
        PromptItem(id="long", prompt="Name three rivers in Europe and say where each one ends."),
    ]
    results = engine.generate(items)
    prompts = [engine.encode(item) for item in items]
    assert len(prompts[0]) != len(prompts[1])
    toks, lengths = engine._batch(prompts)
    want = generate(
        engine.llm_params, engine.llm_config, toks, lengths, SamplingConfig(), jax.random.key(0), 16
    )
    for i, r in enumerate(results):
        assert r["token_ids"] == [int(t) for t in want.tokens[i, : want.lengths[i]]]
        assert r["text"].strip() and r["metrics"]["steps"] >= 1


def test_smollm2_default_tree_for_one_prompt_is_exact_and_accepts():
    """The defaults a user gets for one greedy prompt (the shipped drafter, the best-first tree
    sized per step by the policy, the lookup in place) decode SmolLM2 to its AR tokens, several
    per call where the policy drafts."""
    config = EngineConfig(max_new_tokens=48, devices=1, time_phases=False)
    assert config.beam.tree and config.adaptive
    engine = Engine.from_config(config)
    assert engine.drafter_source.endswith("drafter-smollm2")
    item = PromptItem(id="held-out", prompt="Explain how a refrigerator keeps food cold.")
    [r] = engine.generate([item])
    toks, lengths = engine._batch([engine.encode(item)])
    want = generate(
        engine.llm_params, engine.llm_config, toks, lengths, SamplingConfig(), jax.random.key(0), 48
    )
    assert r["token_ids"] == [int(t) for t in want.tokens[0, : want.lengths[0]]]
    m = r["metrics"]
    tree = config.beam
    assert (m["width"], m["length"], m["tree"]) == (tree.width, tree.length, True)
    assert m["cuts"] == list(tree.cuts) and m["step_costs"]["measured"]
    assert sum(m["steps_by_size"].values()) == m["steps"]
    # An untrained drafter stays near 1. The trained one is drafted at sizes that depend on the
    # machine's measured costs (autoregressive steps count 1), so the bound is one any drafted
    # size clears where the policy drafts on most steps.
    assert m["accepted_per_call"] > 1.3 or 2 * m["steps_by_size"]["0"] > m["steps"], m


def test_bench_decode_interleaves_rounds_and_reports_medians(tmp_path):
    """`specdraft bench decode` on SmolLM2 + the shipped drafter, tiny: every case is timed in
    each round, and the figures are the medians of those rounds."""
    import json
    import statistics

    from cluster.cli import main

    out = tmp_path / "decode.json"
    argv = ["bench", "decode", "--batches", "1", "--beams", "1x2", "2x2", "--max-new-tokens", "4",
            "--repeats", "3", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["repeats"] == 3 and doc["accepted_per_call_counts_bonus_token"]
    assert [(r["batch"], r["width"], r["length"]) for r in doc["results"]] == [(1, 1, 2), (1, 2, 2)]
    ar_seconds = doc["results"][0]["ar_seconds"]
    ar_prefill = doc["results"][0]["ar_prefill_seconds"]
    for r in doc["results"]:
        assert len(r["spec_seconds"]) == 3 and r["ar_seconds"] == ar_seconds  # one AR series
        tokens = r["spec_tok_s"] * statistics.median(r["spec_seconds"])
        assert tokens == pytest.approx(r["ar_tok_s"] * statistics.median(ar_seconds), rel=1e-2)
        assert r["speedup"] == pytest.approx(r["spec_tok_s"] / r["ar_tok_s"])
        per_round = [a / s for s, a in zip(r["spec_seconds"], ar_seconds, strict=True)]
        assert r["speedup_rounds"] == pytest.approx(per_round, rel=2e-2)  # equal token counts
        assert 1.0 <= r["accepted_per_call"] <= 3.0
        assert r["rows_identical_to_ar"] == r["prompts"] == 8  # fp32 greedy: exact
        # The loop's own step cost: whole passes minus the prefill-only passes of the same round.
        assert len(r["spec_prefill_seconds"]) == 3 and r["ar_prefill_seconds"] == ar_prefill
        assert r["ar_loop_steps"] == 8 * 3  # 4 tokens a prompt: the prefill's + 3 iterations
        assert 8 <= r["spec_loop_steps"] <= 8 * 3
        for kind in ("spec", "ar"):
            whole, pre = r[f"{kind}_seconds"], r[f"{kind}_prefill_seconds"]
            loop_s = statistics.median(w - p for w, p in zip(whole, pre, strict=True))
            ms = loop_s * 1e3 / r[f"{kind}_loop_steps"]
            assert r[f"{kind}_loop_step_ms"] == pytest.approx(ms, rel=1e-2, abs=0.05)
        ratio = r["spec_loop_step_ms"] / r["ar_loop_step_ms"]
        assert r["per_call_for_2x"] == pytest.approx(2 * ratio)


def test_bench_decode_on_a_prompt_file(tmp_path):
    """`--prompts FILE --num-prompts N`: the file's first N prompts (chat messages rendered by the
    template, as the engine does) are decoded instead of the built-in questions."""
    import json

    from cluster.cli import main

    prompts = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "Name a planet."},
            {"id": "b", "prompt": [{"role": "user", "content": "Say hi."}]},
            {"id": "c", "prompt": "never decoded"}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "decode.json"
    argv = ["bench", "decode", "--prompts", str(prompts), "--num-prompts", "2", "--batches", "2",
            "--beams", "1x2", "--lookup", "0", "3", "--max-new-tokens", "4", "--repeats", "1",
            "--weights", "fp32", "native", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["prompts_file"] == str(prompts) and doc["weights"] == ["fp32", "native"]
    assert doc["prompts"] == ["Name a planet.", [{"role": "user", "content": "Say hi."}]]
    cases = [(r["weights"], r["width"], r["length"], r["lookup"]) for r in doc["results"]]
    assert cases == [(w, 1, 2, lookup) for w in ("fp32", "native") for lookup in (0, 3)]
    for row in doc["results"]:
        assert row["prompts"] == 2 and row["rows_identical_to_ar"] == 2
        assert row["baseline_ar"] == "fp32"
    fp32, native = doc["results"][0], doc["results"][2]
    assert fp32["ar_speedup_vs_baseline_ar"] == pytest.approx(1.0)
    assert native["speedup_vs_baseline_ar"] == pytest.approx(
        native["speedup"] * native["ar_speedup_vs_baseline_ar"], rel=1e-6
    )
    # SmolLM2's Q4_1 blocks (and the Q8_0 head) against its fp32 panels.
    assert 3 * native["weight_bytes_per_step"] < fp32["weight_bytes_per_step"]


def test_bench_accept_pools_the_engines_acceptance(tmp_path):
    """`specdraft bench accept`: the real engine's tokens per call on the held-out prompts, with
    and without the lookup candidate, pooled over prompts."""
    import json

    from cluster.cli import main

    out = tmp_path / "accept.json"
    argv = ["bench", "accept", "--num-prompts", "3", "--batch", "2", "--beams", "1x3",
            "--lookup", "0", "4i", "--max-new-tokens", "12", "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["num_prompts"] == 3 and doc["tokens_per_call_counts_bonus_token"]
    cases = [(r["width"], r["length"], r["lookup"], r["lookup_in_place"]) for r in doc["results"]]
    assert cases == [(1, 3, 0, False), (1, 3, 4, True)]
    for r in doc["results"]:
        hist = r["accepted_histogram"]
        assert len(hist) == 4 and sum(hist) == r["calls"] > 0 and r["answers"] == 3
        # Each answer's first token comes from the prefill; the calls emit the rest, and their
        # accepted drafts may run up to L past a row's cap or EOS.
        emitted = r["answer_tokens"] - 3
        assert r["tokens_per_call"] == pytest.approx(emitted / r["calls"])
        assert emitted <= sum((n + 1) * c for n, c in enumerate(hist)) <= emitted + 3 * 3
        depth = r["per_depth_acceptance"]
        assert len(depth) == 3 and depth == sorted(depth, reverse=True)
