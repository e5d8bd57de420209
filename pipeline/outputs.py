"""Output paths checked before any work starts, and files written so a failed write keeps what
was there.

`check_writable(path, flag)` answers "could this run write `path`?" without creating anything:
the commands call it for every output right after reading their inputs, so a path that cannot be
written costs one line (exit 2), not a model load and a traceback. `append_text` appends whole
records: if the disk fills (or any write fails) mid-record, the file is cut back to where the
call found it, so it stays valid JSONL and a rerun resumes from it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output that cannot be written; the message names the path and why."""


def check_writable(path: str | os.PathLike, flag: str = "--out", folder: bool = False) -> Path:
    """`path` if this process could create or overwrite it (a file, or a folder with `folder`),
    missing parent folders included; else an OutputPathError naming `flag`, the path and the
    reason. Creates nothing."""
    path = Path(path)
    if path.exists():
        if folder:
            if not path.is_dir():
                raise OutputPathError(f"{flag} {path}: exists and is not a folder")
            _require_access(path, flag, path)
        else:
            if path.is_dir():
                raise OutputPathError(f"{flag} {path}: is a folder, expected a file path")
            _require_access(path, flag, path)
        return path
    # The first ancestor that exists must be a folder this process can create entries in.
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {parent} is a file, not a folder")
    _require_access(parent, flag, path)
    return path


def _require_access(target: Path, flag: str, path: Path) -> None:
    mode = os.W_OK | (os.X_OK if target.is_dir() else 0)
    if os.access(target, mode):
        return
    what = "folder" if target.is_dir() else "file"
    reason = "read-only file system" if _read_only(target) else "permission denied"
    where = "" if target == path else f" (in {target})"
    raise OutputPathError(f"{flag} {path}: cannot write the {what}{where}: {reason}")


def _read_only(target: Path) -> bool:
    try:
        return bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def append_text(fd: int, text: str, path: Path, kept: str) -> None:
    """Append `text` to the open file `fd` (of `path`) in full, or not at all: a failed write
    (full disk, file size limit, I/O error) truncates the file back and raises OutputPathError
    naming `path`, the reason and `kept` (what the file still holds)."""
    data = text.encode("utf-8")
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as err:
        os.ftruncate(fd, start)
        reason = err.strerror or errno.errorcode.get(err.errno, str(err))
        raise OutputPathError(f"cannot write {path}: {reason}; {kept}") from None


def write_text(path: str | os.PathLike, text: str, flag: str) -> None:
    """Write a small whole file (a summary, a JSON report); a failure is one OutputPathError
    naming `flag` and the path instead of a traceback."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise OutputPathError(f"cannot write {flag} {path}: {err.strerror or err}") from None
