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


def test_smollm2_speculative_greedy_equals_autoregressive():
    config = EngineConfig(
        beam=BeamConfig(2, 3), max_new_tokens=16, devices=2, batch_size=2, time_phases=False
    )
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
