"""pipeline.engine on a tiny random model: results, metrics, batch-independent sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drafter.config import BeamConfig
from drafter.sampling import SamplingConfig
from pipeline import speculative as spec
from pipeline.drafter_io import target_embeddings
from pipeline.engine import Engine, EngineConfig, row_metrics
from pipeline.generate import generate
from pipeline.llm import ONE_ROW_HEAD_T, LlamaConfig
from pipeline.llm import init_params as init_llm
from pipeline.prompts import PromptItem

CONFIG = LlamaConfig(32, 32, 64, 2, num_heads=4, num_kv_heads=2, head_dim=8,
                     tie_word_embeddings=False, eos_token_ids=(2,))  # fmt: skip


class CharTokenizer:
    """Characters -> ids 4..31; enough of the Tokenizer interface for the engine."""

    def encode_chat(self, messages):
        return [4 + ord(c) % 28 for m in messages for c in m["content"]]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


ITEMS = [
    PromptItem(id="a", prompt="hello there"),
    PromptItem(id="b", prompt="hi"),
    PromptItem(id="c", messages=({"role": "user", "content": "a longer question?"},)),
]
GREEDY = SamplingConfig()


def engine(sampling=GREEDY, batch_size=3):
    config = EngineConfig(beam=BeamConfig(3, 2), sampling=sampling, max_new_tokens=10,
                          batch_size=batch_size, time_phases=False)  # fmt: skip
    llm = init_llm(CONFIG, jax.random.key(0))
    return Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())


def test_greedy_results_equal_autoregressive_and_metrics_add_up():
    eng = engine()
    results = eng.generate(ITEMS)
    assert [r["id"] for r in results] == ["a", "b", "c"]
    prompts = [eng.encode(item) for item in ITEMS]
    toks, lengths = eng._batch(prompts)
    want = generate(eng.llm_params, CONFIG, toks, lengths, SamplingConfig(), jax.random.key(0), 10)
    for i, r in enumerate(results):
        assert r["token_ids"] == [int(t) for t in want.tokens[i, : want.lengths[i]]]
        assert r["text"] == CharTokenizer().decode(r["token_ids"])
        m = r["metrics"]
        assert m["new_tokens"] == len(r["token_ids"]) and m["llm_calls"] == m["steps"] + 1
        assert 1.0 <= m["accepted_per_call"] <= 3.0
        assert len(m["acceptance_per_depth"]) == 2


def test_a_lower_token_limit_reuses_the_executable_and_cuts_every_row():
    eng = engine()
    prompts = [eng.encode(item) for item in ITEMS]
    full, _ = eng.generate_ids(prompts, [0, 1, 2])
    compiled = eng._generate.cache_size()
    first, _ = eng.generate_ids(prompts, [0, 1, 2], max_new=1)  # prefill and first token only
    assert eng._generate.cache_size() == compiled and not eng.last_call_compiled
    assert first.lengths.tolist() == [1, 1, 1] and first.calls.tolist() == [0, 0, 0]
    assert first.tokens[:, 0].tolist() == full.tokens[:, 0].tolist()
    three, _ = eng.generate_ids(prompts, [0, 1, 2], max_new=3)
    assert (three.tokens[:, :3] == full.tokens[:, :3]).all() and three.lengths.max() <= 3
    with pytest.raises(ValueError, match=r"max_new must be in 0\.\.10, got 11"):
        eng.generate_ids(prompts, [0, 1, 2], max_new=11)


def test_sampled_output_does_not_depend_on_the_batch():
    hot = SamplingConfig(temperature=1.0)
    together = engine(hot, batch_size=3).generate(ITEMS)
    alone = engine(hot, batch_size=1).generate(ITEMS)
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]


def test_row_metrics_counts_the_bonus_token():
    m = row_metrics(4, [1, 1, 2], 9)  # accepted 0, 1, 2, 2 drafted tokens -> 1+2+3+3 emitted
    assert m["accepted_per_call"] == pytest.approx(9 / 4)
    np.testing.assert_allclose(m["acceptance_per_depth"], [3 / 4, 2 / 4])
    assert m["llm_calls"] == 5


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="EngineConfig.max_new_tokens"):
        EngineConfig(max_new_tokens=0)


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="EngineConfig.dtype must be one of"):
        EngineConfig(dtype="float16")


def test_bf16_target_keeps_an_fp32_cache_and_hands_the_drafter_fp32_tables():
    llm = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_llm(CONFIG, jax.random.key(0)))
    config = EngineConfig(beam=BeamConfig(3, 2), max_new_tokens=6, time_phases=False)
    eng = Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())
    assert eng.draft_params[1].embed.dtype == jnp.float32
    tied = dataclasses.replace(eng.drafter_config, tie_lm_head=True, exit_dim=CONFIG.hidden_size)
    target = target_embeddings(llm, tied)
    assert {target.embed.dtype, target.lm_head.dtype} == {jnp.dtype(jnp.float32)}
    toks, lengths = eng._batch([eng.encode(item) for item in ITEMS])
    state = spec.start(eng.llm_params, toks, lengths, jnp.full((3,), 6), jax.random.key(0),
                       jnp.arange(3), config=CONFIG, sampling=GREEDY, num_tokens=6, length=2,
                       eos_ids=())  # fmt: skip
    assert state.cache.k.dtype == jnp.float32 and state.cache.v.dtype == jnp.float32
    for r in eng.generate(ITEMS):
        assert 1 <= len(r["token_ids"]) <= 6 and r["metrics"]["steps"] >= 1


def test_phase_times_time_a_draft_and_a_verify_step_of_the_batch():
    eng = engine()
    prompts = [eng.encode(item) for item in ITEMS]
    draft_ms, verify_ms = eng.phase_times(prompts)
    assert draft_ms > 0 and verify_ms > 0
    assert isinstance(eng.llm_params["layers"], tuple)  # held per layer (see Engine.__init__)


def test_draft_returns_beams_rooted_at_the_first_greedy_token():
    eng = engine()
    drafted = eng.draft(ITEMS)
    generated = eng.generate(ITEMS)
    for d, g in zip(drafted, generated, strict=True):
        assert d["id"] == g["id"] and len(d["drafts"]) == 3
        assert d["llm_token"] == g["token_ids"][0]
        assert all(len(b["tokens"]) == 2 for b in d["drafts"])
        scores = [b["score"] for b in d["drafts"]]
        assert scores == sorted(scores, reverse=True)


def test_one_tree_serves_every_batch_and_temperature():
    """`EngineConfig.beam` (the default best-first tree) for every batch and temperature; the
    policy sizes each step, and a sampled draft method needs a W x L shape."""
    tree = BeamConfig(4, 8, tree=True, cuts=(1, 2, 4))
    assert EngineConfig().beam == tree and EngineConfig().adaptive
    llm = init_llm(CONFIG, jax.random.key(0))
    eng = Engine.from_params(CONFIG, llm, config=EngineConfig(adaptive=False))
    assert eng.beam_for(1) == eng.beam_for(8) == tree
    with pytest.raises(ValueError, match="draft_method 'sample'"):
        EngineConfig(draft_method="sample")


def test_the_transposed_head_copy_changes_no_token():
    """EngineConfig.transposed_head holds the untied head a second time as [D, V] for the
    few-row verify logits; greedy output and its AR reference are the same without it."""
    llm = init_llm(CONFIG, jax.random.key(0))
    config = EngineConfig(beam=BeamConfig(3, 2), max_new_tokens=10, time_phases=False)
    with_copy = Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())
    plain = dataclasses.replace(config, transposed_head=False)
    without = Engine.from_params(CONFIG, llm, config=plain, tokenizer=CharTokenizer())
    np.testing.assert_array_equal(with_copy.llm_params["head_t"], llm["lm_head"].T)
    assert "head_t" not in without.llm_params and without.head_one_row_ms is None
    # The one-row layout was timed here; the faster one serves one row (`probe_head_layout`).
    stored_ms, transposed_ms = with_copy.head_one_row_ms
    assert stored_ms > 0 and transposed_ms > 0
    assert (ONE_ROW_HEAD_T in with_copy.llm_params) == (transposed_ms < stored_ms)
    unprobed = dataclasses.replace(config, probe_head_layout=False)
    fixed = Engine.from_params(CONFIG, llm, config=unprobed, tokenizer=CharTokenizer())
    assert fixed.head_one_row_ms is None and ONE_ROW_HEAD_T not in fixed.llm_params
    assert "head_t" in fixed.llm_params
    assert [r["token_ids"] for r in fixed.generate(ITEMS)] == [
        r["token_ids"] for r in without.generate(ITEMS)
    ]
    assert [r["token_ids"] for r in with_copy.generate(ITEMS)] == [
        r["token_ids"] for r in without.generate(ITEMS)
    ]
    # The drafter's head rows: [K, D] for one row of drafting, the transposed copy for several.
    assert with_copy.draft_params_for(1, BeamConfig(1, 4)) is with_copy.draft_params
    assert with_copy.draft_params_for(1, BeamConfig(2, 4)) is with_copy._draft_params_rows
    assert with_copy.draft_params_for(3, BeamConfig(1, 1)) is with_copy._draft_params_rows


def test_a_best_first_tree_for_one_prompt_is_exact():
    """A best-first tree decodes a prompt alone to AR's tokens, drafts with the one-row head
    layout, and its drafts come back as paths without NO_TOKEN."""
    llm = init_llm(CONFIG, jax.random.key(0))
    tree = BeamConfig(3, 4, tree=True)
    config = EngineConfig(beam=tree, max_new_tokens=10, batch_size=1, time_phases=False,
                          adaptive=False)  # fmt: skip
    eng = Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())
    assert eng.draft_params_for(1, tree) is eng.draft_params
    for item, r in zip(ITEMS, eng.generate(ITEMS), strict=True):
        toks, lengths = eng._batch([eng.encode(item)])
        want = generate(eng.llm_params, CONFIG, toks, lengths, GREEDY, jax.random.key(0), 10)
        assert r["token_ids"] == [int(t) for t in want.tokens[0, : want.lengths[0]]]
        m = r["metrics"]
        assert (m["width"], m["length"], m["tree"]) == (3, 4, True)
        assert len(m["acceptance_per_depth"]) == 4
    paths = [d["tokens"] for d in eng.draft(ITEMS[:1])[0]["drafts"]]
    assert len(paths) == 4 and all(1 <= len(p) <= 4 for p in paths)  # 1..4 drafted tokens
    assert all(t >= 0 for p in paths for t in p)


def test_a_per_root_tree_for_one_prompt_is_exact():
    """(2, 4) per root decodes a prompt alone to AR's tokens, and the metrics name the tree."""
    llm = init_llm(CONFIG, jax.random.key(0))
    config = EngineConfig(beam=BeamConfig(2, 4, per_root=True), max_new_tokens=10,
                          batch_size=1, time_phases=False)  # fmt: skip
    eng = Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())
    results = eng.generate(ITEMS)
    for item, r in zip(ITEMS, results, strict=True):
        toks, lengths = eng._batch([eng.encode(item)])
        want = generate(eng.llm_params, CONFIG, toks, lengths, GREEDY, jax.random.key(0), 10)
        assert r["token_ids"] == [int(t) for t in want.tokens[0, : want.lengths[0]]]
        m = r["metrics"]
        assert (m["width"], m["length"], m["per_root"]) == (2, 4, True)
    beams = [d["tokens"] for d in eng.draft(ITEMS[:1])[0]["drafts"]]
    assert len(beams) == 2 and beams[0][0] != beams[1][0]  # two distinct first tokens


def test_the_policy_gets_step_costs_measured_here_and_reports_its_choices(tmp_path, monkeypatch):
    """`EngineConfig.adaptive`: a table of step costs for the batch's rows from
    `pipeline.tree_costs` (timings, so only their shape is checked), cached on disk; the output
    stays greedy AR's and the metrics count the steps by the size verified."""
    monkeypatch.setenv("SPECDRAFT_STEP_COSTS", str(tmp_path / "step-costs"))
    tree = BeamConfig(3, 4, tree=True, cuts=(1, 2))
    config = EngineConfig(beam=tree, max_new_tokens=10, time_phases=False, devices=1)
    eng = Engine.from_params(CONFIG, init_llm(CONFIG, jax.random.key(0)), config=config,
                             tokenizer=CharTokenizer())  # fmt: skip
    costs = eng.costs_for(3)
    assert (costs.sizes, costs.rows, costs.measured) == ((1, 2, 4), 3, True)
    assert costs.ar > 0 and all(c > 0 for c in costs.verify) and len(costs.draft) == 3
    assert eng.costs_for(3) is costs  # measured once
    assert len(list((tmp_path / "step-costs").glob("*.json"))) == 1
    again = Engine.from_params(CONFIG, init_llm(CONFIG, jax.random.key(0)), config=config)
    assert again.costs_for(3) == costs  # from the disk cache, not re-timed
    results = eng.generate(ITEMS)
    prompts = [eng.encode(item) for item in ITEMS]
    toks, lengths = eng._batch(prompts)
    want = generate(eng.llm_params, CONFIG, toks, lengths, SamplingConfig(), jax.random.key(0), 10)
    for i, r in enumerate(results):
        assert r["token_ids"] == [int(t) for t in want.tokens[i, : want.lengths[i]]]
        m = r["metrics"]
        assert m["cuts"] == [1, 2] and m["step_costs"] == costs.as_dict()
        assert set(m["steps_by_size"]) == {"0", "1", "2", "4"}
        assert sum(m["steps_by_size"].values()) == m["steps"]
    fixed = dataclasses.replace(config, adaptive=False)
    eng = Engine.from_params(CONFIG, init_llm(CONFIG, jax.random.key(0)), config=fixed)
    model = eng.costs_for(3)
    assert model.ar is None and model.verify == (1.06, 1.12, 1.24) and not model.measured


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_draft_is_plain_autoregressive_with_the_same_output(temperature):
    """`EngineConfig.speculate=False` (`generate --no-draft`): the same engine and keys without
    the drafter; one target call per token after the first, and, seed-exact, the speculative
    output token for token at any temperature."""
    sampling = SamplingConfig(temperature=temperature)
    llm = init_llm(CONFIG, jax.random.key(0))
    config = EngineConfig(beam=BeamConfig(3, 2), sampling=sampling, max_new_tokens=10,
                          batch_size=3, time_phases=False)  # fmt: skip
    plain = dataclasses.replace(config, speculate=False)
    speculative = Engine.from_params(CONFIG, llm, config=config, tokenizer=CharTokenizer())
    ar = Engine.from_params(CONFIG, llm, config=plain, tokenizer=CharTokenizer())
    want, got = speculative.generate(ITEMS), ar.generate(ITEMS)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    for r in got:
        m = r["metrics"]
        assert m["speculative"] is False and (m["width"], m["length"]) == (0, 0)
        assert m["steps"] == m["new_tokens"] - 1 and m["accepted_per_call"] == 1.0
    assert all(r["metrics"]["speculative"] for r in want)
