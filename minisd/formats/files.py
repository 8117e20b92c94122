"""Writing files so that a crash, a full disk or an exception never leaves a half-written one.

Every file minisd writes (weights, configs, tokenizer files, pictures) goes through `atomic_write`:
the bytes go to a temporary file in the same folder, are flushed to disk (fsync), and only then is
the temporary file renamed over the target with `os.replace`, which POSIX and Windows both do in one
step. Until that rename the old file is untouched; if anything fails the temporary file is removed
and the error propagates.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Call `write_fn(tmp)` to write the whole file at the temporary path `tmp` (same folder as
    `path`), fsync it, then rename it over `path`. Returns `path` as a Path.

    On any exception (including KeyboardInterrupt) the old `path`, if there was one, is intact and
    `tmp` is gone. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:  # write_fn may have closed its own handle: sync through a new one
            os.fsync(f.fileno())
        if path.exists():  # keep the old file's permissions rather than mkstemp's 0600
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`path` holds exactly `data`, or (after an error) what it held before."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` holds exactly `text` (UTF-8), or (after an error) what it held before."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened for syncing on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
