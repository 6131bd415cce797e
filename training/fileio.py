"""Atomic file writes: a crash never leaves a half-written file under its final name.

The data goes to a temporary file in the same folder, is flushed and fsynced, and is
then renamed over the destination (os.replace is atomic on POSIX and Windows); on
any exception the temporary file is removed and the destination keeps its old content.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Iterator

logger = logging.getLogger(__name__)

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        logger.debug("could not open %s to fsync it: %s", directory, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.debug("could not fsync directory %s: %s", directory, exc)
    finally:
        os.close(fd)


def _create_temp(directory: str, base: str) -> str:
    """Create an empty temp file '.<base>.<random>.tmp' (mode follows umask)."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temp file in {directory}: clean up stale .tmp files there")


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success it replaces ``path``.

    The temp file is created empty in the same directory (name starts with
    '.' and ends with '.tmp'); the body writes it. On normal exit it is
    fsynced and ``os.replace``d onto ``path``; on any exception it is
    deleted and the exception re-raised, so ``path`` keeps its old content.
    Parent directories are created.
    """
    final = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(final)
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temp(directory, os.path.basename(final))
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 minus the umask
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file owner-only
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
