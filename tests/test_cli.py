"""The `specdraft` command line driven as a user drives it: subprocesses, exit codes, stdout and
stderr. Error paths must exit 2 with a one-line message that says how to fix the problem and no
traceback. (Malformed prompt lines and an unreachable Ray cluster are covered in
tests/test_cluster_job.py.)"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from benchmarks.cli import BENCHMARKS
from cluster.cli import COMMANDS
from pipeline.drafter_io import DEFAULT_DRAFTER
from tests.llama_files import gguf_tensors, hf_config, random_hf_tensors, write_gguf

ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV.update(RAY_AUTH_MODE="disabled", JAX_PLATFORMS="cpu")
SPECDRAFT = Path(sys.executable).parent / "specdraft"


def cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env or ENV)  # fmt: skip


def assert_user_error(result, *needles):
    """Exit 2, one `specdraft CMD: error: ...` line on stderr containing every needle."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdraft "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama GGUF with a byte-level tokenizer (hidden 32): loads in a second, and
    fits no shipped drafter."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += sorted(pre_tokenizers.ByteLevel.alphabet()) + ["hi"]
    meta = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": ["h i"],
            "token_type": [3, 3, 3] + [1] * (len(tokens) - 3)}  # fmt: skip
    cfg = {**hf_config(tied=True), "vocab_size": len(tokens)}
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    return write_gguf(path, cfg, gguf_tensors(cfg, random_hf_tensors(cfg)), tokenizer=meta)


@pytest.fixture
def io(tmp_path) -> list[str]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    return ["--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]


def test_both_entry_points_are_the_same_cli_and_list_every_subcommand():
    via_module = cli("--help")
    via_script = subprocess.run([str(SPECDRAFT), "--help"], capture_output=True, text=True,
                                timeout=60, env=ENV)  # fmt: skip
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    assert via_module.stdout.startswith("usage: specdraft")
    for name, (_, help_text) in COMMANDS.items():
        assert name in via_module.stdout and help_text in via_module.stdout
    # No subcommand: argparse's usage error, exit 2, from both.
    bare = subprocess.run([str(SPECDRAFT)], capture_output=True, text=True, timeout=60, env=ENV)
    assert bare.returncode == 2 and "COMMAND" in bare.stderr


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["generate"], ["--prompts", "--out", "--model", "--drafter", "--address", "--local",
                        "--workers", "--plot", "--width", "--length", "--temperature",
                        "--dtype", "--lookup", "--lookup-in-place"]),
        (["draft"], ["--prompts", "--out", "--model", "--drafter", "--width", "--length"]),
        (["train"], ["--model", "--out", "--export", "--steps", "--batch", "--lr", "--width",
                     "--eval-beams"]),
        (["bench"], list(BENCHMARKS)),
        (["bench", "decode"], ["--out", "--model", "--batches", "--beams", "--dtype", "--prompts",
                               "--num-prompts", "--lookup"]),
        (["bench", "accept"], ["--out", "--prompts", "--beams", "--lookup", "--batch"]),
        (["bench", "drafter"], ["--out", "--shapes", "--batches", "--beams"]),
        (["bench", "llm"], ["--out", "--batches", "--dtype"]),
        (["bench", "cluster"], ["--out"]),
        (["info"], ["--model", "--drafter", "--address", "--json"]),
        (["fetch-model"], ["--cache", "--wheel", "--force"]),
    ],
)  # fmt: skip
def test_every_subcommand_help_explains_its_flags(argv, flags):
    result = cli(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: specdraft {' '.join(argv)}")
    listed = re.findall(r"^  (--[a-z][\w-]*)", result.stdout, re.MULTILINE)
    assert set(flags) - set(BENCHMARKS) <= set(listed)
    for flag in {*flags, *listed}:  # the main flags, and every other option, are explained
        assert len(_help_text(result.stdout, flag)) > 5, (flag, result.stdout)


def test_info_json_describes_devices_model_and_drafter(tiny_model, tmp_path):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = cli("info", "--json", "--model", str(tiny_model), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    devices = report["devices"]
    assert devices["backend"] == "cpu" and devices["count"] == len(devices["devices"]) == 4
    assert devices["mesh"] and _product(devices["mesh"].values()) == 4
    model = report["model"]
    assert model["path"] == str(tiny_model) and "error" not in model
    assert (model["hidden_size"], model["num_layers"], model["vocab_size"]) == (32, 2, 260)
    shipped = json.loads((DEFAULT_DRAFTER / "drafter.json").read_text())
    assert report["drafter"]["path"] == str(DEFAULT_DRAFTER)
    assert report["drafter"]["llm"] == shipped["llm"]
    assert report["ray"]["connected"] is False and "--address" in report["ray"]["hint"]


def test_info_without_a_fetched_model_says_how_to_fetch_it(tmp_path):
    env = {**ENV, "SPECDRAFT_CACHE": str(tmp_path / "empty-cache")}
    result = cli("info", "--drafter", str(tmp_path / "nowhere"), env=env)
    assert result.returncode == 0, result.stderr  # info reports problems, it does not fail
    sections = result.stdout.split("\n")
    assert "model:" in sections and "drafter:" in sections and "devices:" in sections
    model = result.stdout.split("model:")[1].split("drafter:")[0]
    assert str(tmp_path / "empty-cache") in model and "specdraft fetch-model" in model
    drafter = result.stdout.split("drafter:")[1]
    assert str(tmp_path / "nowhere") in drafter and "not found" in drafter


def test_generate_with_a_missing_model_names_the_fetch_command(io, tmp_path):
    result = cli("generate", *io, "--model", str(tmp_path / "absent.gguf"))
    assert_user_error(result, str(tmp_path / "absent.gguf"), "specdraft fetch-model")
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_with_a_missing_drafter_folder_names_it_and_the_fix(io, tiny_model, tmp_path):
    missing = tmp_path / "no-drafter"
    result = cli("generate", *io, "--model", str(tiny_model), "--drafter", str(missing))
    assert_user_error(result, f"drafter folder {missing} not found", "specdraft train")


def test_a_missing_drafter_folder_is_named_before_the_model_loads(io, tmp_path):
    # A model file that exists but cannot load: the drafter error must come first.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    missing = tmp_path / "no-drafter"
    result = cli("generate", *io, "--model", str(broken), "--drafter", str(missing))
    assert_user_error(result, f"drafter folder {missing} not found", "specdraft train")


def test_generate_with_a_drafter_for_another_model_says_so(io, tiny_model):
    # The shipped drafter is SmolLM2's (hidden 576); the tiny model's hidden size is 32.
    result = cli("draft", *io, "--model", str(tiny_model))
    assert_user_error(result, str(DEFAULT_DRAFTER), "hidden_size=576", "hidden_size=32",
                      "specdraft train")  # fmt: skip


def test_generate_with_a_missing_prompt_file_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = cli("generate", "--prompts", str(missing), "--out", str(tmp_path / "o.jsonl"))
    assert_user_error(result, str(missing), "no such prompt file")


def test_train_with_a_missing_model_names_the_fetch_command(tmp_path):
    result = cli("train", "--model", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "r"))
    assert_user_error(result, str(tmp_path / "absent.gguf"), "specdraft fetch-model")
    assert not (tmp_path / "r").exists()


def test_train_with_a_bad_eval_beam_names_it(tmp_path):
    result = cli("train", "--eval-beams", "2x3", "0x4", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--eval-beams" in result.stderr and "'0x4'" in result.stderr
    assert not (tmp_path / "r").exists()


def test_bench_decode_with_zero_repeats_names_the_flag(tmp_path):
    result = cli("bench", "decode", "--repeats", "0", "--out", str(tmp_path / "d.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--repeats" in result.stderr and "got 0" in result.stderr
    assert not (tmp_path / "d.json").exists()


def test_bench_decode_with_a_malformed_prompt_file_names_file_and_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "fine"}) + "\n{oops\n")
    result = cli("bench", "decode", "--prompts", str(prompts), "--out", str(tmp_path / "d.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--prompts" in result.stderr and f"{prompts}:2" in result.stderr
    assert not (tmp_path / "d.json").exists()


def test_bench_with_an_unknown_benchmark_lists_the_known_ones():
    result = cli("bench", "nosuch")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'nosuch'" in result.stderr
    assert all(repr(name) in result.stderr for name in BENCHMARKS)
    assert result.stdout == ""


def _help_text(usage: str, flag: str) -> str:
    """The explanation argparse prints for `flag` (on its line, or the next if the flag and its
    metavar are long); "" if the flag is listed without one."""
    lines = usage.splitlines()
    pattern = re.compile(rf"\s+{re.escape(flag)}(?:[ ,].*?)?(?:\s{{2,}}(\S.*))?$")
    for i, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            if match.group(1):
                return match.group(1)
            following = lines[i + 1] if i + 1 < len(lines) else ""
            return following.strip() if following.startswith(" " * 8) else ""
    raise AssertionError(f"{flag} not listed in:\n{usage}")


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def test_engine_flags_carry_the_dtype():
    from pipeline.generate_cmd import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args([])).dtype == "float32"
    assert engine_config_from_args(parser.parse_args(["--dtype", "bfloat16"])).dtype == "bfloat16"


def test_engine_flags_carry_the_lookup():
    from pipeline.generate_cmd import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config_from_args(parser.parse_args([]))
    assert (config.lookup, config.lookup_in_place) == (4, True)
    config = engine_config_from_args(parser.parse_args(["--lookup", "3", "--no-lookup-in-place"]))
    assert (config.lookup, config.lookup_in_place) == (3, False)
    assert engine_config_from_args(parser.parse_args(["--lookup", "0"])).lookup == 0
    with pytest.raises(ValueError, match="EngineConfig.lookup"):
        engine_config_from_args(parser.parse_args(["--lookup", "-2"]))


def test_engine_flags_carry_the_tree():
    from drafter.config import BeamConfig
    from pipeline.generate_cmd import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    shape = lambda argv: engine_config_from_args(parser.parse_args(argv)).beam
    default = BeamConfig(4, 8, tree=True, cuts=(1, 2, 4))  # every batch's, sized per step
    assert shape([]) == default
    assert shape(["--width", "2", "--length", "3"]) == BeamConfig(2, 3)  # W beams of L
    assert shape(["--length", "2"]) == BeamConfig(4, 2)
    per_root = ["--width", "2", "--length", "4", "--per-root"]
    assert shape(per_root) == BeamConfig(2, 4, per_root=True)
    tree = ["--width", "3", "--length", "5", "--tree"]
    assert shape(tree) == BeamConfig(3, 5, tree=True, cuts=(1, 2, 4))  # the default's cuts
    assert shape(["--tree"]) == default
    assert shape(["--tree", "--length", "3"]) == BeamConfig(4, 3, tree=True, cuts=(1, 2))
    with pytest.raises(ValueError, match="per_root and tree"):
        engine_config_from_args(parser.parse_args([*tree, "--per-root"]))
    with pytest.raises(ValueError, match="BeamConfig.width"):
        engine_config_from_args(parser.parse_args(["--width", "0"]))
    config = engine_config_from_args(parser.parse_args(["--fixed", "--draft-method", "sample"]))
    assert (config.adaptive, config.beam) == (False, BeamConfig(1, 4))  # samples: no tree
    with pytest.raises(ValueError, match="draft_method 'sample'"):
        engine_config_from_args(parser.parse_args(["--tree", "--length", "3",
                                                   "--draft-method", "sample"]))  # fmt: skip


def test_engine_flags_carry_the_cuts():
    from drafter.config import BeamConfig
    from pipeline.generate_cmd import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = lambda *argv: engine_config_from_args(parser.parse_args(list(argv)))
    assert config("--cuts", "4", "2").beam == BeamConfig(4, 8, tree=True, cuts=(2, 4))
    assert config("--cuts").beam.cuts == ()  # the full tree or none
    got = config("--tree", "--length", "6", "--cuts", "3")
    assert got.beam == BeamConfig(4, 6, tree=True, cuts=(3,))
    with pytest.raises(ValueError, match="best-first"):
        config("--width", "2", "--cuts", "1")
    with pytest.raises(ValueError, match="BeamConfig.cuts"):
        config("--tree", "--cuts", "8")


def test_bench_lookup_values():
    from benchmarks.decode import parse_lookup

    assert [parse_lookup(x) for x in ("0", "4", "3i")] == [(0, False), (4, False), (3, True)]
    for bad in ("-1", "0i", "x", "4ii"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lookup(bad)


def test_bench_beam_values():
    from benchmarks.decode import parse_beam
    from drafter.config import BeamConfig

    assert parse_beam("2x4r") == BeamConfig(2, 4, per_root=True)
    assert parse_beam("1x4") == BeamConfig(1, 4)
    assert parse_beam("4x5t") == BeamConfig(4, 5, tree=True)
    for bad in ("2x4rr", "0x4", "x", "2x4rt", "4x5tt"):
        with pytest.raises(argparse.ArgumentTypeError, match="WxL|>= 1"):
            parse_beam(bad)


def test_train_on_your_own_prompt_files_records_them(tiny_model, tmp_path):
    train = tmp_path / "mine.jsonl"
    rows = [{"id": f"t{i}", "prompt": f"hi number {i}"} for i in range(6)]
    rows.insert(2, {"id": "blank", "prompt": "   "})
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout = tmp_path / "held.txt"
    heldout.write_text("a question nobody trained on\n\nanother one\n")
    out = tmp_path / "run"
    files = ["--train-file", str(train), "--heldout-file", str(heldout)]
    result = cli("train", "--model", str(tiny_model), *files, "--out", str(out), "--steps", "2",
                 "--batch", "8", "--max-new-tokens", "6", "--save-every", "2", "--eval-beams",
                 timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipping train prompt 'blank': empty prompt" in result.stderr
    info = json.loads((out / "drafter" / "drafter.json").read_text())
    data = info["data"]
    assert (data["train_file"], data["heldout_file"]) == (str(train), str(heldout))
    assert (data["train_prompts"], data["heldout_prompts"]) == (6, 2)
    assert 0 < data["train_tokens"] <= 6 * 6 and 0 < data["heldout_tokens"] <= 2 * 6
    assert data["train_file_sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()[:16]
    assert info["eval"]["sequences"] == 2
    # The same folder with other training prompts: its cached answers are not theirs.
    train.write_text("\n".join(f"other prompt {i}" for i in range(6)))
    again = cli("train", "--model", str(tiny_model), *files, "--out", str(out), timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    error = [ln for ln in again.stderr.splitlines() if ln.startswith("specdraft train: error")]
    assert len(error) == 1 and "cached data was made with" in error[0], again.stderr
    assert "choose another output folder" in error[0]


def test_train_refuses_a_heldout_prompt_that_is_also_a_training_prompt(tmp_path):
    train, heldout = tmp_path / "t.txt", tmp_path / "h.jsonl"
    train.write_text("one\ntwo\nthree\n")
    heldout.write_text(json.dumps({"id": "h1", "prompt": [{"role": "user", "content": "two"}]}))
    # The model does not exist: the prompt files are checked before anything loads.
    result = cli("train", "--model", str(tmp_path / "absent.gguf"), "--train-file", str(train),
                 "--heldout-file", str(heldout), "--out", str(tmp_path / "r"))  # fmt: skip
    assert_user_error(result, str(heldout), "'h1'", "training prompt '2'", str(train))
    assert not (tmp_path / "r").exists()


def test_train_with_a_malformed_prompt_file_names_file_and_line(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"id": "a", "prompt": "fine"}) + "\n{not json\n")
    result = cli("train", "--train-file", str(train), "--out", str(tmp_path / "r"))
    assert_user_error(result, f"{train}:2")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,floor", [("--steps", "0", 1), ("--train-prompts", "-1", 1),
                                              ("--max-new-tokens", "0", 1), ("--warmup", "-2", 0),
                                              ("--batch", "x", None)])  # fmt: skip
def test_train_refuses_an_out_of_range_count_before_any_work(tmp_path, flag, value, floor):
    result = cli("train", flag, value, "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {flag}" in result.stderr
    want = f"must be >= {floor}, got {value}" if floor is not None else repr(value)
    assert want in result.stderr
    assert not (tmp_path / "r").exists()


ECHO = "cluster.testing:EchoEngine.from_env"


@pytest.mark.parametrize(
    "command, out_flag",
    [
        (["generate"], "--out"),
        (["draft"], "--out"),
        (["train"], "--out"),
        (["bench", "decode"], "--out"),
    ],
)
def test_an_output_under_a_regular_file_is_one_line_before_any_model_loads(
    tmp_path, io, command, out_flag
):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    out = blocker / "sub" / "o.jsonl"
    # The model does not exist either: the error must be the output's, found first.
    model = ["--model", str(tmp_path / "absent.gguf")]
    extra = io[:2] if command[0] in ("generate", "draft") else []
    result = cli(*command, *extra, *model, out_flag, str(out))
    assert_user_error(result, str(out), f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "a file, not a folder\n"


def test_an_output_that_is_a_folder_is_one_line(tmp_path, io):
    result = cli("generate", *io[:2], "--out", str(tmp_path), "--engine-factory", ECHO)
    assert_user_error(result, str(tmp_path), "is a folder")


def _without_root_file_access():
    """A preexec_fn for root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so the program it executes runs with an ordinary user's file permissions."""
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl

    def apply():
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return apply


def test_an_unwritable_output_folder_for_a_non_root_user_is_one_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = locked / "sub" / "o.jsonl"
    drop = {"preexec_fn": _without_root_file_access()} if os.geteuid() == 0 else {}
    argv = ["generate", "--prompts", str(prompts), "--out", str(out),
            "--model", str(tmp_path / "absent.gguf")]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                            text=True, timeout=120, env=ENV, **drop)  # fmt: skip
    assert_user_error(result, str(out), f"(in {locked}): permission denied")
    assert list(locked.iterdir()) == []


def _limit_file_size(limit: int):
    """A preexec_fn: the kernel refuses writes past `limit` bytes (EFBIG; Python ignores
    SIGXFSZ), as a full disk refuses them (ENOSPC): a record is cut mid-line the same way."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_mid_run_keeps_valid_jsonl_names_the_file_and_resumes(tmp_path):
    prompts = tmp_path / "p.jsonl"
    ids = [f"q{i:02d}" for i in range(40)]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"prompt {i} " * 3}) + "\n"
                               for i in ids))  # fmt: skip
    out = tmp_path / "o.jsonl"
    argv = [sys.executable, "-m", "pipeline", "generate", "--prompts", str(prompts), "--out",
            str(out), "--engine-factory", ECHO, "--batch-size", "4", "--no-progress"]  # fmt: skip
    full = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV,
                          preexec_fn=_limit_file_size(3000))  # fmt: skip
    assert_user_error(full, f"cannot write {out}", "re-run to resume")
    data = out.read_bytes()
    assert 0 < len(data) <= 3000 and data.endswith(b"\n")
    kept = [json.loads(line)["id"] for line in data.decode().splitlines()]
    assert 0 < len(kept) < len(ids)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert again.returncode == 0, again.stderr
    lines = out.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ids  # each exactly once
    assert lines[: len(kept)] == data.decode().splitlines()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["skipped_already_done"] == len(kept)
    assert summary["answered"] == len(ids) - len(kept)
