"""A trivial engine for tests and benchmarks of the Ray layer (not a language model).

`EchoEngine` honours the engine contract of docs/design.md (`generate(items)` / `draft(items)`
returning one result dict per item) without JAX or weights, so coordinator tests and the overhead
benchmark measure the Ray layer alone. Its "tokens" are the prompt's characters' code points,
reversed; the metrics are made up but deterministic, so tests can check that they flow through.
Use it from the command line with `--engine-factory cluster.testing:EchoEngine`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.prompts import PromptItem


@dataclass(frozen=True)
class EchoEngine:
    """Test/bench engine. `delay_s` per batch and `delay_per_token_s` simulate compute time;
    prompts longer than `max_prompt_chars` get a per-prompt error (like a context overflow);
    a prompt containing `fail_marker` makes its whole batch raise (an engine exception), one
    containing `exit_marker` kills the process (a segfault, an OOM kill)."""

    delay_s: float = 0.0
    delay_per_token_s: float = 0.0
    max_prompt_chars: int = 10_000
    fail_marker: str | None = None
    exit_marker: str | None = None

    @classmethod
    def from_env(cls) -> EchoEngine:
        """Configured from SPECDRAFT_ECHO_* environment variables (for subprocess tests)."""
        env = os.environ.get
        return cls(
            delay_s=float(env("SPECDRAFT_ECHO_DELAY_S", "0")),
            delay_per_token_s=float(env("SPECDRAFT_ECHO_DELAY_PER_TOKEN_S", "0")),
            max_prompt_chars=int(env("SPECDRAFT_ECHO_MAX_PROMPT_CHARS", "10000")),
            fail_marker=env("SPECDRAFT_ECHO_FAIL_MARKER"),
            exit_marker=env("SPECDRAFT_ECHO_EXIT_MARKER"),
        )

    def generate(self, items: list[PromptItem]) -> list[dict]:
        return self._run(items, draft=False)

    def draft(self, items: list[PromptItem]) -> list[dict]:
        return self._run(items, draft=True)

    def _run(self, items: list[PromptItem], draft: bool) -> list[dict]:
        texts = [_text(item) for item in items]
        if self.fail_marker and any(self.fail_marker in t for t in texts):
            raise RuntimeError(f"EchoEngine: batch contains the fail marker {self.fail_marker!r}")
        if self.exit_marker and any(self.exit_marker in t for t in texts):
            os._exit(1)
        tokens = sum(len(t) for t in texts)
        time.sleep(self.delay_s + self.delay_per_token_s * tokens)
        return [self._result(item.id, text, draft) for item, text in zip(items, texts, strict=True)]

    def _result(self, item_id: str, text: str, draft: bool) -> dict:
        if len(text) > self.max_prompt_chars:
            return {
                "id": item_id,
                "error": f"prompt has {len(text)} tokens, over the context length "
                f"{self.max_prompt_chars}",
            }
        token_ids = [ord(c) for c in reversed(text)]
        metrics = {
            "new_tokens": len(token_ids),
            "steps": max(1, (len(token_ids) + 1) // 2),
            "accepted_tokens": len(token_ids) // 2,
        }
        result = {"id": item_id, "text": text[::-1], "token_ids": token_ids, "metrics": metrics}
        if draft:
            drafts = [token_ids[1:5], token_ids[2:6]]
            result["llm_token"] = token_ids[0] if token_ids else None
            result["drafts"] = [{"tokens": d, "text": "", "score": -float(len(d))} for d in drafts]
        return result


def _text(item: PromptItem) -> str:
    if item.prompt is not None:
        return item.prompt
    return "\n".join(m["content"] for m in item.messages)


class CharTokenizer:
    """Characters -> ids 4..31 of a 32-token vocabulary; the Tokenizer methods the engine uses."""

    eos_token_ids = (2,)

    def encode_chat(self, messages) -> list[int]:
        return [4 + ord(c) % 28 for m in messages for c in m["content"]]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


@dataclass(frozen=True)
class TinyEngineFactory:
    """The real `pipeline.engine.Engine` over a tiny random Llama (vocabulary 32, hidden 32,
    context `max_seq_len`) and a fresh drafter: weights depend only on `seed`, so every worker
    and the test process build the same model. Greedy by default."""

    seed: int = 0
    max_new_tokens: int = 8
    batch_size: int = 4
    max_seq_len: int = 128

    def __call__(self):
        import jax

        from drafter.config import BeamConfig
        from pipeline.engine import Engine, EngineConfig
        from pipeline.llm import LlamaConfig, init_params

        llm = LlamaConfig(32, 32, 64, 2, num_heads=4, num_kv_heads=2, head_dim=8,
                          tie_word_embeddings=False, max_seq_len=self.max_seq_len,
                          eos_token_ids=(2,))  # fmt: skip
        config = EngineConfig(
            beam=BeamConfig(width=3, length=2),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            time_phases=False,
        )
        params = init_params(llm, jax.random.key(self.seed))
        return Engine.from_params(llm, params, config=config, tokenizer=CharTokenizer())
