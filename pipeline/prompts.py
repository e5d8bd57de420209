"""Prompt files: JSONL records or plain text lines, read into `PromptItem`s.

Two formats, chosen by content (a file whose first non-blank line starts with `{` is JSONL):

- JSONL: one object a line, `{"id": "q1", "prompt": "text"}` or `{"id": "q1", "prompt":
  [{"role": "user", "content": "..."}, ...]}` (chat messages, rendered by the tokenizer's chat
  template). `id` may be a string or an integer; if absent, the 1-based line number is the id.
  Other fields are ignored.
- Plain text: every non-blank line is one prompt; its id is its 1-based line number.

Structural problems (bad JSON, a missing or mistyped field, a duplicate id) raise
`PromptFileError` naming the file and line: the file must be fixed before a job starts. An empty
prompt is not structural: it becomes a per-prompt error record and the other prompts still run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message starts with `FILE:LINE:`."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt: either plain `prompt` text or chat `messages` (role/content dicts)."""

    id: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"PromptItem {self.id!r}: give exactly one of prompt or messages")

    @property
    def text_length(self) -> int:
        """Characters of prompt text: a tokenizer-free proxy for its length, used for batching."""
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(m["content"]) for m in self.messages)

    @property
    def chat_messages(self) -> list[dict]:
        """The chat the model sees: the messages, or a plain prompt as one user turn."""
        if self.messages is not None:
            return list(self.messages)
        return [{"role": "user", "content": self.prompt}]

    @property
    def is_empty(self) -> bool:
        if self.prompt is not None:
            return not self.prompt.strip()
        return not any(m["content"].strip() for m in self.messages)


@dataclass(frozen=True)
class PromptFile:
    """A read prompt file: the items to run, and error records for prompts that cannot run."""

    items: list[PromptItem]
    errors: list[dict]  # {"id", "error"}, one per empty prompt

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items] + [e["id"] for e in self.errors]


def read_prompts(path: str | Path) -> PromptFile:
    """Read a JSONL or plain-text prompt file; raises PromptFileError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err.reason})") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    parse = _parse_jsonl_line if first.lstrip().startswith("{") else _parse_text_line
    items, errors, seen = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = parse(line, path, number)
        if item.id in seen:
            raise PromptFileError(
                f"{path}:{number}: duplicate id {item.id!r} (first on line {seen[item.id]})"
            )
        seen[item.id] = number
        if item.is_empty:
            errors.append({"id": item.id, "error": f"empty prompt ({path}:{number})"})
        else:
            items.append(item)
    if not seen:
        raise PromptFileError(f"{path}: no prompts in the file")
    return PromptFile(items=items, errors=errors)


def _parse_text_line(line: str, path: Path, number: int) -> PromptItem:
    return PromptItem(id=str(number), prompt=line.strip())


def _parse_jsonl_line(line: str, path: Path, number: int) -> PromptItem:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        message = f"{where}: not valid JSON ({err.msg} at column {err.colno})"
        raise PromptFileError(message) from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    item_id = record.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        raise PromptFileError(f"{where}: field 'id' must be a string or an integer")
    item_id = str(item_id)
    if "prompt" not in record:
        raise PromptFileError(f"{where}: missing field 'prompt'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return PromptItem(id=item_id, prompt=prompt)
    if isinstance(prompt, list):
        return PromptItem(id=item_id, messages=_messages(prompt, where))
    raise PromptFileError(
        f"{where}: field 'prompt' must be a string or a list of chat messages, "
        f"got {type(prompt).__name__}"
    )


def _messages(raw: list, where: str) -> tuple[dict, ...]:
    messages = []
    for i, message in enumerate(raw):
        field = f"prompt[{i}]"
        if not isinstance(message, dict):
            raise PromptFileError(f"{where}: field '{field}' must be an object with role/content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PromptFileError(f"{where}: field '{field}.role' must be one of {ROLES}")
        if not isinstance(content, str):
            raise PromptFileError(f"{where}: field '{field}.content' must be a string")
        messages.append({"role": role, "content": content})
    return tuple(messages)
