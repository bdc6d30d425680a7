"""Files that are either the previous version or the new one, never half-written.

Why: local state (the model registry, a worker's learned policy and popularity counts) is rewritten
while the process runs; a crash or a kill -9 mid-write must leave the last good file, not a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder.

    `mode`: mkstemp creates 0600 files; state other processes read (Triton reads config.pbtxt,
    possibly as another user in docker-compose) needs the usual 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_publish_dir(final: Path, fill: Callable[[Path], object]) -> Path:
    """Create folder `final` complete or not at all: `fill` writes into a hidden staging folder
    beside it (`.staging-*`: Triton ignores what is not a version number), whose files are fsynced
    and which is then renamed to `final` in one step. Fails if `final` exists (a racing writer
    took the name); the staging folder is removed on any failure."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
    try:
        fill(staging)
        for p in staging.rglob("*"):
            if p.is_file():
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(staging, final)  # atomic on one file system
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
