"""`specdraft draft` as a product: beam, sample and tree drafts from the engine, their output,
sampled drafts that follow the drafter's own law and each prompt's id, and Parquet output."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chi_square import goodness_of_fit

from cluster.testing import CharTokenizer
from drafter.config import BeamConfig, DrafterConfig
from drafter.drafting import _step_fn
from drafter.model import init_params as init_drafter
from drafter.sampling import SamplingConfig, warp_log_probs
from pipeline import speculative as spec
from pipeline.engine import Engine, EngineConfig
from pipeline.llm import LlamaConfig
from pipeline.llm import init_params as init_llm
from pipeline.prompts import PromptItem

CONFIG = LlamaConfig(32, 32, 64, 2, num_heads=4, num_kv_heads=2, head_dim=8,
                     tie_word_embeddings=False, eos_token_ids=(2,))  # fmt: skip
ITEMS = [
    PromptItem(id="a", prompt="hello there"),
    PromptItem(id="b", prompt="hi"),
    PromptItem(id="c", prompt="a longer question?"),
    PromptItem(id="d", prompt="xyz"),
]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV.update(RAY_AUTH_MODE="disabled", JAX_PLATFORMS="cpu")


def engine(method="beam", width=4, length=5, tree=False, temperature=0.0, batch_size=4):
    config = EngineConfig(beam=BeamConfig(width, length, tree=tree), lookup=0,
                          draft_method=method, draft_log_probs=True, max_new_tokens=2,
                          sampling=SamplingConfig(temperature), batch_size=batch_size,
                          time_phases=False)  # fmt: skip
    llm = init_llm(CONFIG, jax.random.key(0))
    return Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())


@pytest.mark.parametrize("method, tree", [("beam", False), ("sample", False), ("beam", True)])
def test_each_method_gives_w_drafts_with_tokens_text_scores_and_log_probs(method, tree):
    eng = engine(method, tree=tree, temperature=1.0 if method == "sample" else 0.0)
    for record in eng.draft(ITEMS):
        assert record["method"] == ("tree" if tree else method)
        assert isinstance(record["llm_token"], int) and record["llm_text"]
        drafts = record["drafts"]
        assert len(drafts) == (5 if tree else 4)  # a tree's L paths, else W drafts
        for d in drafts:
            assert len(d["log_probs"]) == len(d["tokens"]) and d["text"] == CharTokenizer().decode(
                d["tokens"]
            )
            assert d["score"] == pytest.approx(sum(d["log_probs"]), abs=1e-4)
        lengths = [len(d["tokens"]) for d in drafts]
        # A tree's candidates are its root-to-node paths: the first is one token long.
        assert lengths[0] == 1 and max(lengths) <= 5 if tree else set(lengths) == {5}
        if method == "beam":
            scores = [d["score"] for d in drafts]
            assert scores == sorted(scores, reverse=True)
        assert record["metrics"]["drafted_tokens"] == sum(lengths)


def test_sampled_drafts_follow_the_prompt_id_not_the_batch():
    """A prompt's LLM token and drafts are keyed by its id (and the seed, and the draft index):
    alone, in another batch or in another order it gets the same; another id gets others."""
    eng = engine("sample", temperature=1.0)
    together = {r["id"]: r for r in eng.draft(ITEMS)}
    drafted = [tuple(tuple(d["tokens"]) for d in r["drafts"]) for r in together.values()]
    assert all(len(set(d)) > 1 for d in drafted)  # W distinct samples, really random
    alone = eng.draft([ITEMS[2]])[0]
    reordered = {r["id"]: r for r in eng.draft([ITEMS[3], ITEMS[2], ITEMS[0]])}
    for got in (alone, reordered["c"]):
        assert got["llm_token"] == together["c"]["llm_token"]
        assert got["drafts"] == together["c"]["drafts"]
    renamed = eng.draft([PromptItem(id="c2", prompt=ITEMS[2].prompt)])[0]
    assert renamed["drafts"] != together["c"]["drafts"]


def _sequence_law(params, config, target, llm_state, llm_token, temperature, vocab):
    """P(d1, d2) of two drafted ids under the drafter at `temperature`: [V, V]."""
    step = _step_fn(params, config, target, llm_state)
    rnn0 = jnp.zeros((config.hidden_size,), llm_state.dtype)
    state1, lp1 = step(rnn0, jnp.asarray(llm_token, jnp.int32))
    lp1 = warp_log_probs(lp1, temperature, None, None)
    law = np.zeros((vocab, vocab))
    for d1 in range(vocab):
        _, lp2 = step(state1, jnp.asarray(d1, jnp.int32))  # draft ids are target ids here
        lp2 = warp_log_probs(lp2, temperature, None, None)
        law[d1] = np.exp(np.asarray(lp1[d1] + lp2))
    return law


def test_sampled_drafts_follow_the_drafters_own_sequence_law():
    """Chi-square of 6000 two-token drafts from `SampledDraft` (what `draft --method sample`
    and `generate --draft-method sample` run) against the drafter's exact law at the same
    temperature; the same counts against the law at another temperature are rejected, so the
    test has power."""
    vocab = 8
    config = DrafterConfig(hidden_size=16, vocab_size=vocab, exit_dim=16)
    llm = init_llm(LlamaConfig(vocab, 16, 32, 1, num_heads=2, num_kv_heads=1, head_dim=8),
                   jax.random.key(1))  # fmt: skip
    params = jax.tree.map(lambda x: 2.0 * x, init_drafter(config, jax.random.key(4)))
    target = spec.target_embeddings(llm)
    llm_state = jax.random.normal(jax.random.key(7), (16,))
    hot = SamplingConfig(temperature=0.9)
    width = 6000
    draft = spec.SampledDraft(config, BeamConfig(width, 2), hot)
    inputs = spec.DraftInputs(llm_state, jnp.asarray(3, jnp.int32), jax.random.key(11),
                              jnp.zeros((4,), jnp.int32), jnp.asarray(1))  # fmt: skip
    drafts = jax.jit(draft)((params, target), inputs)
    tokens = np.asarray(drafts.tokens[:, 1:])
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens[:, 0], tokens[:, 1]), 1)
    assert (counts > 0).sum() > 20  # the samples spread over many sequences
    law = _sequence_law(params, config, target, llm_state, 3, 0.9, vocab)
    assert goodness_of_fit(counts, law) > 1e-3
    wrong = _sequence_law(params, config, target, llm_state, 3, 1.2, vocab)
    assert goodness_of_fit(counts, wrong) < 1e-6
    # Each draft's score is its log-probability under that law.
    logp = np.log(law[tokens[:, 0], tokens[:, 1]])
    np.testing.assert_allclose(np.asarray(drafts.scores), logp, rtol=1e-4, atol=1e-4)


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip


def test_draft_help_lists_only_drafting_flags():
    result = cli("draft", "--help")
    assert result.returncode == 0
    for flag in ("--method", "--width", "--length", "--temperature", "--top-k", "--top-p",
                 "--log-probs", "--format", "--seed", "--model", "--drafter"):  # fmt: skip
        assert flag in result.stdout, flag
    for flag in ("--max-new-tokens", "--cuts", "--lookup", "--lookup-in-place", "--tree",
                 "--per-root", "--draft-method"):  # fmt: skip
        assert flag not in result.stdout, flag
    generate = cli("generate", "--help")
    assert "--draft-method" in generate.stdout and "--no-draft" in generate.stdout
    assert "--log-probs" not in generate.stdout


def test_draft_config_from_flags():
    import argparse

    from pipeline.generate_cmd import add_engine_arguments, draft_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, "draft")
    config = lambda *argv: draft_config_from_args(parser.parse_args(list(argv)))
    default = config()
    assert (default.beam, default.draft_method, default.lookup) == (BeamConfig(4, 5), "beam", 0)
    assert default.sampling.temperature == 0.0
    sample = config("--method", "sample", "--top-k", "5")
    assert (sample.draft_method, sample.sampling) == ("sample", SamplingConfig(1.0, 5, None))
    tree = config("--method", "tree", "--width", "3", "--length", "6", "--log-probs")
    assert (tree.beam, tree.draft_log_probs) == (BeamConfig(3, 6, tree=True), True)
    with pytest.raises(ValueError, match="--width must be >= 1"):
        config("--width", "0")


ECHO = "cluster.testing:EchoEngine.from_env"


def test_parquet_output_resumes_and_holds_every_record_once(tmp_path):
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.jsonl"
    ids = [f"q{i}" for i in range(6)]
    first = "".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in ids[:4])
    prompts.write_text(first + json.dumps({"id": "empty", "prompt": " "}) + "\n")
    out = tmp_path / "d.parquet"
    argv = ["draft", "--prompts", str(prompts), "--out", str(out), "--engine-factory", ECHO,
            "--no-progress"]  # fmt: skip
    result = cli(*argv)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids[:4] + ["empty"])
    assert not (tmp_path / "d.parquet.partial.jsonl").exists()
    by_id = {r["id"]: r for r in rows}
    assert by_id["empty"]["error"].startswith("empty prompt") and by_id["q1"]["error"] is None
    assert by_id["q1"]["drafts"][0]["tokens"] and isinstance(by_id["q1"]["llm_token"], int)
    # More prompts later: the rerun answers only the new ones and appends them.
    prompts.write_text(prompts.read_text() + "".join(
        json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in ids[4:]))  # fmt: skip
    again = cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "5 already done" in again.stdout
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids + ["empty"])
