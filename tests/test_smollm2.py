"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the model cache.

Needs `specdraft fetch-model` (or `make model`, which `make test` runs first); a missing model
fails with that command in the message. Keeps to ~16 new tokens so the file stays short.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from drafter.sampling import SamplingConfig
from pipeline.generate import generate
from pipeline.gguf_file import field, open_gguf
from pipeline.models import require_model
from pipeline.tokenizer import Tokenizer
from pipeline.weights import load_gguf
from tests.llama_files import reference_bpe

pytestmark = pytest.mark.slow

ASCII_TEXTS = [
    "What is the capital of France?",
    "In 2024, 12345 people   walked 3.5km.\n\n  def f(x): return x**2",
    "It's a well-known fact: they'll say \"hello\" & don't care!",
]


@pytest.fixture(scope="module")
def path():
    return require_model()


@pytest.fixture(scope="module")
def model(path):
    return load_gguf(path)


@pytest.fixture(scope="module")
def tokenizer(path):
    return Tokenizer.from_gguf(path)


def test_config_comes_from_metadata(model):
    config, params = model
    assert (config.num_layers, config.hidden_size, config.num_heads) == (30, 576, 9)
    assert (config.num_kv_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert "lm_head" not in params and params["layers"]["wq"].shape == (30, 576, 576)


def test_tokenizer_round_trips_and_matches_an_independent_bpe(path, tokenizer):
    reader = open_gguf(path)
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    merges = list(field(reader, "tokenizer.ggml.merges"))
    for text in ASCII_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference_bpe(text, tokens, merges), text
        assert tokenizer.decode(ids) == text
    for text in ["héllo wörld — 日本語 🙂", "\t tabs\r\nand\u00a0nbsp"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode(" 42")] == ["Ġ", "4", "2"]


def test_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.id_to_token(tokenizer.eos_token_ids[0]) == "<|im_end|>"
    assert tokenizer.id_to_token(tokenizer.bos_token_id) == "<|im_start|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    # The model's own template adds its default system turn.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_ids[0]) == 2


def test_greedy_generation_knows_the_capital_of_france(model, tokenizer):
    config, params = model
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(
        params,
        config,
        jnp.asarray([ids]),
        [len(ids)],
        SamplingConfig(temperature=0.0),
        jax.random.key(0),
        16,
    )
    n = int(out.lengths[0])
    answer = tokenizer.decode(out.tokens[0, :n])
    assert "Paris" in answer, answer
    # It stops by itself, at its end-of-turn token.
    assert n < 16 and int(out.tokens[0, n - 1]) in config.eos_token_ids, answer
