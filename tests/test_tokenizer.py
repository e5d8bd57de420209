"""Tokenizer: a tiny byte-level BPE trained here and written both as GGUF metadata and as
tokenizer.json must encode identically, agree with an independent pure-Python BPE, round-trip
text, treat control tokens as special, and render the model's own chat template."""

from __future__ import annotations

import json

import jinja2
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipeline.gguf_file import ModelFileError
from pipeline.tokenizer import CHATML_TEMPLATE, Tokenizer
from tests.llama_files import (
    TINY,
    gguf_tensors,
    hf_config,
    random_hf_tensors,
    reference_bpe,
    write_gguf,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog 12345 times",
    "hello hello world, the world says hello back! it's 2024.",
    "what is the capital of france? paris is the capital of france.",
] * 20
TEXTS = [
    "hello world",
    "The Capital of France is Paris!",
    "in 2024, 12345 foxes   jumped\n\n  over pi=3.14159",
    "it's   they're\tfine",
]
# A template with a default system turn, like SmolLM2's (written for this test).
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A StarCoder-style (digits split, then GPT-2 byte level) BPE trained on CORPUS, saved as
    tokenizer.json (+ tokenizer_config.json) and as GGUF metadata of a tiny model."""
    tmp = tmp_path_factory.mktemp("tok")
    rust = RustTokenizer(models.BPE())
    # Trained without the digit split, so merges of digits exist and the split must stop them.
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    rust.train_from_iterator(CORPUS, trainer)
    rust.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    rust.decoder = decoders.ByteLevel()
    rust.save(str(tmp / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    saved = json.loads((tmp / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["merges"]]
    tokens = sorted(saved["vocab"], key=saved["vocab"].get)
    assert [saved["vocab"][t] for t in tokens] == list(range(len(tokens)))
    meta = {
        "model": "gpt2",
        "pre": "smollm",
        "tokens": tokens,
        "token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "merges": merges,
        "chat_template": TEMPLATE,
    }
    cfg = {**hf_config(tied=True), "vocab_size": len(tokens), "bos_token_id": 1}
    cfg["eos_token_id"] = 2
    tensors = gguf_tensors(cfg, random_hf_tensors(cfg))
    path = write_gguf(tmp / "tok.gguf", cfg, tensors, tokenizer=meta)
    return {"gguf": path, "json": tmp / "tokenizer.json", "meta": meta, "cfg": cfg, "tmp": tmp}


def test_gguf_and_json_tokenizers_encode_identically_and_round_trip(trained):
    from_gguf = Tokenizer.from_gguf(trained["gguf"])
    from_json = Tokenizer.from_tokenizer_json(trained["json"])
    for text in [*TEXTS, "héllo wörld ✓ 日本"]:
        ids = from_gguf.encode(text)
        assert ids == from_json.encode(text), text
        assert from_gguf.decode(ids) == text
    assert from_gguf.vocab_size == from_json.vocab_size == len(trained["meta"]["tokens"])


def test_gguf_tokenizer_matches_an_independent_bpe(trained):
    tok = Tokenizer.from_gguf(trained["gguf"])
    meta = trained["meta"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference_bpe(text, meta["tokens"], meta["merges"]), text
    # Digits are single tokens although merges of digits exist ("2024" is in the corpus).
    assert any(m.replace(" ", "").isdigit() for m in meta["merges"])
    assert [tok.id_to_token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert len(tok.encode("the capital")) < len("the capital")  # merges were applied


def test_control_tokens_are_special(trained):
    tok = Tokenizer.from_gguf(trained["gguf"])
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1


def test_chat_template_is_the_models_own_with_default_system_turn(trained):
    for tok in (
        Tokenizer.from_gguf(trained["gguf"]),
        Tokenizer.from_tokenizer_json(trained["json"]),
    ):
        text = tok.apply_chat_template([{"role": "user", "content": "hi there"}])
        assert text == (
            "<|im_start|>system\nYou are tiny.<|im_end|>\n"
            "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
        )
        own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(own, add_generation_prompt=False)
        assert "You are tiny." not in text and text.endswith("hi<|im_end|>\n")
        ids = tok.encode_chat([{"role": "user", "content": "hi"}])
        assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
        assert tok.eos_token_ids == (2,)


def test_chatml_fallback_and_template_errors(trained):
    tok = Tokenizer.from_gguf(trained["gguf"])
    plain = Tokenizer(tok.rust, tok.eos_token_ids, tok.bos_token_id, chat_template=None)
    text = plain.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert plain.apply_chat_template([]) == "<|im_start|>assistant\n"
    strict = Tokenizer(tok.rust, (2,), 1, chat_template="{{ raise_exception('no tools') }}")
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])
    assert CHATML_TEMPLATE != TEMPLATE


def test_add_bos_token_metadata_prepends_bos(trained, tmp_path):
    meta = {**trained["meta"], "add_bos_token": True}
    cfg = trained["cfg"]
    tensors = gguf_tensors(cfg, random_hf_tensors(cfg))
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "bos.gguf", cfg, tensors, tokenizer=meta))
    assert tok.encode("hello") == [1, *Tokenizer.from_gguf(trained["gguf"]).encode("hello")]
    assert tok.encode("hello", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("model", "llama", "'tokenizer.ggml.model'"), ("pre", "mystery", "'tokenizer.ggml.pre'")],
)
def test_unsupported_tokenizer_metadata_names_file_and_field(
    trained, tmp_path, field, value, message
):
    meta = {**trained["meta"], field: value}
    cfg = trained["cfg"]
    path = write_gguf(
        tmp_path / "t.gguf", cfg, gguf_tensors(cfg, random_hf_tensors(cfg)), tokenizer=meta
    )
    with pytest.raises(ModelFileError) as info:
        Tokenizer.from_gguf(path)
    assert (
        str(path) in str(info.value)
        and message in str(info.value)
        and repr(value) in str(info.value)
    )


def test_missing_tokenizer_metadata_and_files(trained, tmp_path):
    cfg = {**hf_config(tied=True), "vocab_size": TINY["vocab_size"]}
    path = write_gguf(tmp_path / "none.gguf", cfg, gguf_tensors(cfg, random_hf_tensors(cfg)))
    with pytest.raises(ModelFileError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ModelFileError, match="no such"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ModelFileError, match=str(bad)):
        Tokenizer.from_tokenizer_json(bad)
