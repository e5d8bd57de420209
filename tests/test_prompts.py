"""Reading prompt files: both formats, and every error names the file and the line."""

import json

import pytest

from pipeline.prompts import PromptFileError, PromptItem, read_prompts


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_text_and_chat_prompts(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write(
        tmp_path,
        "p.jsonl",
        [
            json.dumps({"id": "a", "prompt": "Hello there"}),
            "",
            json.dumps({"id": 7, "prompt": chat, "extra": 1}),
            json.dumps({"prompt": "no id"}),
        ],
    )
    got = read_prompts(path)
    assert got.errors == []
    assert got.items == [
        PromptItem(id="a", prompt="Hello there"),
        PromptItem(id="7", messages=tuple(chat)),
        PromptItem(id="4", prompt="no id"),
    ]
    assert got.items[1].text_length == len("Be brief.") + len("Hi")


def test_plain_text_lines_take_line_numbers_as_ids(tmp_path):
    path = write(tmp_path, "p.txt", ["first prompt", "", "  second prompt  "])
    got = read_prompts(path)
    assert [(i.id, i.prompt) for i in got.items] == [("1", "first prompt"), ("3", "second prompt")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "b", "prompt": "x"', "p.jsonl:2: not valid JSON"),
        ('["a list"]', "p.jsonl:2: expected a JSON object"),
        ('{"id": "b"}', "p.jsonl:2: missing field 'prompt'"),
        ('{"id": "b", "prompt": 3}', "p.jsonl:2: field 'prompt' must be a string or a list"),
        ('{"id": [1], "prompt": "x"}', "p.jsonl:2: field 'id' must be a string or an integer"),
        ('{"id": "b", "prompt": [{"role": "bot", "content": "x"}]}', "field 'prompt[0].role'"),
        ('{"id": "b", "prompt": [{"role": "user", "content": 1}]}', "field 'prompt[0].content'"),
        ('{"id": "b", "prompt": ["hi"]}', "p.jsonl:2: field 'prompt[0]' must be an object"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad_line, message):
    path = write(tmp_path, "p.jsonl", [json.dumps({"id": "a", "prompt": "ok"}), bad_line])
    with pytest.raises(PromptFileError, match="p.jsonl:2") as info:
        read_prompts(path)
    assert message in str(info.value)


def test_duplicate_ids_name_both_lines(tmp_path):
    lines = [json.dumps({"id": i, "prompt": "x"}) for i in ("a", "b", "a")]
    with pytest.raises(PromptFileError, match=r"p.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        read_prompts(write(tmp_path, "p.jsonl", lines))


def test_integer_and_string_ids_collide(tmp_path):
    lines = [json.dumps({"id": 1, "prompt": "x"}), json.dumps({"id": "1", "prompt": "y"})]
    with pytest.raises(PromptFileError, match="duplicate id '1'"):
        read_prompts(write(tmp_path, "p.jsonl", lines))


def test_empty_prompts_become_error_records_and_the_rest_runs(tmp_path):
    lines = [
        json.dumps({"id": "empty", "prompt": "   "}),
        json.dumps({"id": "ok", "prompt": "fine"}),
        json.dumps({"id": "no-messages", "prompt": []}),
        json.dumps({"id": "blank-chat", "prompt": [{"role": "user", "content": ""}]}),
    ]
    got = read_prompts(write(tmp_path, "p.jsonl", lines))
    assert [i.id for i in got.items] == ["ok"]
    assert [e["id"] for e in got.errors] == ["empty", "no-messages", "blank-chat"]
    assert all("empty prompt" in e["error"] and "p.jsonl:" in e["error"] for e in got.errors)
    assert got.errors[0]["error"].endswith("p.jsonl:1)")
    assert sorted(got.ids) == ["blank-chat", "empty", "no-messages", "ok"]


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        read_prompts(tmp_path / "absent.jsonl")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(write(tmp_path, "blank.txt", ["", "  "]))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="bin.txt: not UTF-8"):
        read_prompts(binary)


def test_prompt_item_needs_exactly_one_form():
    with pytest.raises(ValueError, match="exactly one"):
        PromptItem(id="x")
    with pytest.raises(ValueError, match="exactly one"):
        PromptItem(id="x", prompt="a", messages=({"role": "user", "content": "b"},))
