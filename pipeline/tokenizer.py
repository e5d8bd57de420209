"""Tokenizers for the target model: byte-level BPE from GGUF metadata or from `tokenizer.json`.

Both paths build a `tokenizers.Tokenizer`, so encoding runs in Rust. From GGUF the vocabulary,
merges and token types come from `tokenizer.ggml.*`; the pre-tokenizer is chosen by
`tokenizer.ggml.pre` to match llama.cpp's (SmolLM2's `smollm` splits every digit on its own
before the GPT-2 byte-level split). Chat prompts are rendered with the model's own Jinja
template (`tokenizer.chat_template`), the way transformers renders it; ChatML only when the model
has no template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from pipeline.gguf_file import ModelFileError, bos_token_id, eos_token_ids, open_gguf
from pipeline.gguf_file import field as gguf_field

# Used only when a model carries no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool = True) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer named `pre` (tokenizer.ggml.pre) as a `tokenizers` one."""
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
        # The StarCoder family: single digits first, then the GPT-2 split.
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, _byte_level()])
    if pre in ("gpt-2", "gpt2", "default"):
        return _byte_level()
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, _byte_level(use_regex=False)])
    raise ModelFileError(
        f"{path}: unsupported pre-tokenizer {pre!r} in GGUF field 'tokenizer.ggml.pre'"
        " (supported: smollm/starcoder family, gpt-2, llama3)"
    )


def _rust_from_gguf(reader, path: Path) -> RustTokenizer:
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFileError(
            f"{path}: unsupported tokenizer model {kind!r} in GGUF field 'tokenizer.ggml.model'"
            " (only byte-level BPE, 'gpt2', is supported)"
        )
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    types = list(gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ModelFileError(
            f"{path}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    rust.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"), path)
    rust.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tok, special=(kind_ == _CONTROL), normalized=False)
        for tok, kind_ in zip(tokens, types, strict=True)
        if kind_ in (_CONTROL, _USER_DEFINED)
    ]
    rust.add_tokens(added)
    bos = bos_token_id(reader)
    if gguf_field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        rust.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)],
        )
    return rust


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text <-> token ids, plus the model's chat template and end tokens."""

    rust: RustTokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    chat_template: str | None = None
    source: str = field(default="")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        reader = open_gguf(path)
        return cls(
            rust=_rust_from_gguf(reader, path),
            eos_token_ids=eos_token_ids(reader),
            bos_token_id=bos_token_id(reader),
            chat_template=gguf_field(reader, "tokenizer.chat_template", None),
            source=str(path),
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """`tokenizer.json`, with end tokens, BOS and chat template from the
        `tokenizer_config.json` and `generation_config.json` beside it when present."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such tokenizer file")
        try:
            rust = RustTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFileError(f"{path}: cannot read tokenizer: {err}") from None
        config = _read_json(path.parent / "tokenizer_config.json")
        generation = _read_json(path.parent / "generation_config.json")
        bos = _token_id(rust, config.get("bos_token"), path)
        eos = generation.get("eos_token_id", _token_id(rust, config.get("eos_token"), path))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            rust=rust,
            eos_token_ids=tuple(int(i) for i in eos_ids),
            bos_token_id=bos,
            chat_template=config.get("chat_template"),
            source=str(path),
        )

    @property
    def vocab_size(self) -> int:
        return self.rust.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.rust.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.rust.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their
        ids. `add_special_tokens` adds the model's BOS when its metadata asks for one."""
        return self.rust.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]) by the model's template."""
        source = self.chat_template or CHATML_TEMPLATE
        return _compile_template(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
        )

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat prompt. The template writes any BOS itself, so none is
        added on top (as transformers does)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.rust.id_to_token(token_id) or "")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # Templates are model-supplied data: a sandbox, and the environment transformers uses
    # (trim_blocks, lstrip_blocks, raise_exception, tojson) so they render identically.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path}: invalid JSON: {err}") from None


def _token_id(rust: RustTokenizer, token, path: Path) -> int | None:
    """Id of a token given as text or as transformers' {"content": ...} dict."""
    if token is None:
        return None
    text = token["content"] if isinstance(token, dict) else token
    token_id = rust.token_to_id(text)
    if token_id is None:
        raise ModelFileError(
            f"{path.parent / 'tokenizer_config.json'}: token {text!r} not in vocab"
        )
    return token_id
