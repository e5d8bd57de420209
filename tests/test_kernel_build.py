"""pipeline.kernels' build: its cache key (the compiler's own view of the target), its timeout,
its cached failures and its lock, with stand-in compilers (shell scripts) and a kernel cache in
tmp_path; and the XLA fallback without any C++ compiler. The kernel itself: test_kernels.py."""

import fcntl
import io
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import kernels

ROOT = os.path.dirname(os.path.dirname(__file__))


def _fake_compiler(tmp_path: Path, on_compile: str, on_query: str | None = None) -> str:
    """A stand-in C++ compiler that logs each call's arguments to `calls.log` and runs
    `on_compile` for a build; `--version` and the target query (`-dM`) get fixed answers, the
    target's from `$FAKE_ISA`, unless `on_query` says otherwise."""
    answers = on_query or textwrap.dedent("""\
        case " $* " in
          *" --version "*) echo "fake c++ 1.0"; exit 0;;
          *" -dM "*) echo "#define __FAKE_ISA__ ${FAKE_ISA:-1}"; exit 0;;
        esac""")
    path = tmp_path / "fake-c++"
    log = tmp_path / "calls.log"
    path.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{answers}\n{on_compile}\n')
    path.chmod(0o755)
    return str(path)


def _compiles(tmp_path: Path) -> int:
    """How many times the stand-in compiler was asked to build (not queried for the key)."""
    log = tmp_path / "calls.log"
    return sum("-shared" in line for line in log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A kernel cache in tmp_path, and none of the caller's build settings."""
    monkeypatch.setenv("SPECDRAFT_CACHE", str(tmp_path / "cache"))
    for name in ("SPECDRAFT_KERNEL_CXXFLAGS", "SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", "FAKE_ISA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "kernels"


def test_the_key_is_the_compilers_view_of_the_target_not_proc_cpuinfo(tmp_path, cache, monkeypatch):
    cxx = _fake_compiler(tmp_path, "exit 1")
    key = kernels._out_dir(cxx, [], 10)
    assert key.parent == cache
    monkeypatch.setenv("FAKE_ISA", "2")  # the same compiler and flags on another CPU
    assert kernels._out_dir(cxx, [], 10) != key
    monkeypatch.delenv("FAKE_ISA")
    # /proc/cpuinfo unreadable (as good as an ARM one without "model name"): the same key.
    read = []
    real_open = io.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == "/proc/cpuinfo":
            read.append(file)
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr("builtins.open", guarded_open)
    assert kernels._out_dir(cxx, [], 10) == key and not read
    assert _compiles(tmp_path) == 0  # a key costs queries, not builds


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA flags")
def test_the_key_follows_isa_flags_as_the_real_compiler_resolves_them(cache):
    try:
        cxx = kernels._compiler()
    except RuntimeError as err:
        pytest.skip(str(err))
    native = kernels._target(cxx, [], 60)
    if "__AVX2__" not in native:
        pytest.skip("this CPU has no AVX2")
    narrower = kernels._target(cxx, ["-mno-avx2"], 60)
    assert "__AVX2__" not in narrower and "__AVX__" in narrower
    assert kernels._target(cxx, [], 60) == native  # deterministic
    assert kernels._out_dir(cxx, ["-mno-avx2"], 60) != kernels._out_dir(cxx, [], 60)


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (exited, or a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_hanging_compiler_is_killed_at_the_timeout(tmp_path, cache, monkeypatch):
    """A compiler that hangs on every call, the key's `--version` query included: stopped after
    `$SPECDRAFT_KERNEL_BUILD_TIMEOUT_S`, with what it started (a driver's cc1plus)."""
    child = tmp_path / "child.pid"
    hang = f'sleep 60 & echo $! > "{child}"; wait'
    cxx = _fake_compiler(tmp_path, hang, on_query=hang)
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", "2")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ran past the build timeout of 2 s") as err:
        kernels._build(kernels._compiler())
    assert time.monotonic() - start < 20
    assert "--version" in str(err.value) and "SPECDRAFT_KERNEL_BUILD_TIMEOUT_S" in str(err.value)
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the compiler's child outlived the timeout"


def test_a_build_past_the_timeout_is_cached_as_a_failure(tmp_path, cache, monkeypatch):
    cxx = _fake_compiler(tmp_path, "exec sleep 60")
    monkeypatch.setenv("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", "2")
    with pytest.raises(RuntimeError, match="ran past the build timeout of 2 s"):
        kernels._build(cxx)
    out_dir = kernels._out_dir(cxx, [], 2)
    assert "ran past the build timeout" in (out_dir / kernels.FAILED).read_text()
    assert not list(out_dir.glob("*.tmp"))  # the half-written library is removed
    with pytest.raises(RuntimeError, match="ran past the build timeout of 2 s"):
        kernels._build(cxx)  # from the marker: no second build, no second wait
    assert _compiles(tmp_path) == 1


def test_a_failed_build_is_cached_and_not_retried_until_its_marker_is_deleted(tmp_path, cache):
    cxx = _fake_compiler(tmp_path, 'echo "small_matmul.cc:1: error: boom" >&2; exit 3')
    with pytest.raises(RuntimeError) as first:
        kernels._build(cxx)
    marker = kernels._out_dir(cxx, [], 10) / kernels.FAILED
    reason = str(first.value)
    assert "exited with 3" in reason and "error: boom" in reason
    assert f"{marker} (or its folder) is deleted" in reason
    assert "error: boom" in marker.read_text() and "-shared" in marker.read_text()
    assert _compiles(tmp_path) == 1
    # Another process with the same key: the cached reason, without a build.
    probe = (
        "from pipeline import kernels; assert not kernels.available();"
        " print(kernels.unavailable_reason())"
    )
    env = {**os.environ, "CXX": cxx}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == reason
    assert _compiles(tmp_path) == 1
    # Deleting the marker lets the next attempt build again.
    marker.unlink()
    with pytest.raises(RuntimeError, match="error: boom"):
        kernels._build(cxx)
    assert _compiles(tmp_path) == 2


def test_the_wait_for_another_processs_build_is_bounded(tmp_path, cache, monkeypatch):
    cxx = _fake_compiler(tmp_path, "exit 1")
    monkeypatch.setenv("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", "1")
    monkeypatch.setattr(kernels, "LOCK_MARGIN_S", 0.5)
    out_dir = kernels._out_dir(cxx, [], 1)
    out_dir.mkdir(parents=True)
    with open(out_dir / ".lock", "w") as held:  # another build in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"waited 1.5 s for another process's build"):
            kernels._build(cxx)
        assert time.monotonic() - start < 10
    assert _compiles(tmp_path) == 0 and not (out_dir / kernels.FAILED).exists()


def test_a_bad_build_timeout_is_named(monkeypatch):
    monkeypatch.delenv("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", raising=False)
    assert kernels._build_timeout() == kernels.BUILD_TIMEOUT_S
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv("SPECDRAFT_KERNEL_BUILD_TIMEOUT_S", bad)
        with pytest.raises(RuntimeError, match="must be a positive number of seconds"):
            kernels._build_timeout()


def test_without_any_compiler_matmul_and_the_engine_fall_back_to_xla(tmp_path):
    """A fresh process with no $CXX and a PATH without g++ or c++."""
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax, numpy as np
        import pytest
        from pipeline import kernels
        from pipeline.engine import Engine, EngineConfig
        from pipeline.llm import init_params
        from test_kernels import CONFIG
        assert not kernels.available()
        print("REASON", kernels.unavailable_reason())
        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 64), dtype=np.float32)
        w = rng.standard_normal((64, 96), dtype=np.float32)
        packed = kernels.PackedWeight(kernels.pack(w))
        jaxpr = str(jax.make_jaxpr(lambda a: kernels.matmul(a, packed))(x))
        assert "ffi_call" not in jaxpr, jaxpr
        np.testing.assert_allclose(kernels.matmul(x, packed), x @ w, rtol=1e-5, atol=1e-4)
        with pytest.raises(RuntimeError, match="kernel unavailable: no C.. compiler"):
            kernels.kernel_matmul(x, packed.packed)
        params = init_params(CONFIG, jax.random.key(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = Engine.from_params(CONFIG, params,
                                     config=EngineConfig(devices=1, time_phases=False))
        print("PATH", eng.matmul)
        print("WARNED", any("kernel unavailable" in str(w.message) for w in caught))
        with pytest.raises(ValueError, match="matmul is 'kernel' but no C.. compiler"):
            Engine.from_params(CONFIG, params, config=EngineConfig(devices=1, matmul="kernel"))
    """)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(empty), SPECDRAFT_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    assert shutil.which("g++", path=env["PATH"]) is None
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REASON no C++ compiler: no g++ or c++ on PATH, and $CXX is not set" in done.stdout
    assert "PATH xla" in done.stdout and "WARNED True" in done.stdout
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached
