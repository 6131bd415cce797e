"""Atomic file writes: a crash never leaves a half-written file under its final name.

The data goes to a temporary file in the same folder, is flushed and fsynced, and is
then renamed over the destination (os.replace is atomic on POSIX and Windows); on
any exception the temporary file is removed and the destination keeps its old content.

Temporary files are named ``.<name>.<pid>@<host>.<random>.tmp``: they are hidden, never
end in the destination's extension (so no loader lists them), and say which process
wrote them, so ``remove_stale_temps`` can delete those left by a killed process without
touching a write in progress. A write that fails on a full disk raises ``DiskFullError``,
which names the folder and how much space to free, whatever the writer (torch's own
error on a full disk is "[enforce fail at inline_container.cc] unexpected pos").
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_RE = re.compile(r"^\..+?\.(?:(?P<pid>\d+)@(?P<host>[0-9a-f]{6})\.)?[0-9a-f]{12}\.tmp$")
STALE_TEMP_AGE_S = 600   # an untagged temp (another host, an older release) untouched this long is stale
# torch.save / safetensors report a full disk in their own words; these say the write itself failed.
_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left")
MB = 1 << 20


class DiskFullError(OSError):
    """No space left where a file was being written; says where and how much to free."""


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
    """Create an empty temp file '.<base>.<pid>@<host>.<random>.tmp' (mode follows umask)."""
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temp file in {directory}: clean up stale .tmp files there")


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MB) on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / MB


def is_disk_full(exc: BaseException, directory: str | os.PathLike) -> bool:
    """True for ENOSPC / EDQUOT, and for a writer's own 'write failed' error when the disk is (nearly) full."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    if isinstance(exc, (RuntimeError, OSError)) and any(s in str(exc) for s in _WRITE_FAILED):
        with contextlib.suppress(OSError):
            return free_mb(directory) < 64
    return False


def disk_full_error(directory: str | os.PathLike, needed_bytes: int, cause: BaseException | None = None
                    ) -> DiskFullError:
    need = max(1, -(-int(needed_bytes) // MB))
    try:
        free = f"{free_mb(directory):.0f} MB free now"
    except OSError:
        free = "free space unknown"
    msg = (f"no space left on {directory}: free at least {need} MB there ({free}), or point the folder at a larger "
           f"disk, then resume the job")
    if cause is not None:
        msg += f" (the writer said: {type(cause).__name__}: {str(cause)[:200]})"
    return DiskFullError(errno.ENOSPC, msg)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success it replaces ``path``.

    The temp file is created empty in the same directory (see the module doc for its
    name); the body writes it. On normal exit it is fsynced and ``os.replace``d onto
    ``path``; on any exception it is deleted and the exception re-raised, so ``path``
    keeps its old content. A full disk is re-raised as ``DiskFullError``. Parent
    directories are created.
    """
    final = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(final)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = _create_temp(directory, os.path.basename(final))
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 minus the umask
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file owner-only
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException as exc:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.path.getsize(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if not isinstance(exc, DiskFullError) and isinstance(exc, Exception) and is_disk_full(exc, directory):
            with contextlib.suppress(OSError):
                written = max(written, os.path.getsize(final))  # the file it replaces: a fair guess of its size
            raise disk_full_error(directory, written + MB, exc) from exc
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def _pid_alive(pid: int) -> bool:
    """False only when no process has that id (another user's process raises PermissionError: alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = True,
                       untagged_age_s: float = STALE_TEMP_AGE_S) -> list[str]:
    """Delete the temp files of interrupted atomic writes under ``folder``; return their paths.

    A temp is stale when the process that wrote it (same host) is gone, or, for a temp of
    another host or without a process tag, when it was last modified over ``untagged_age_s``
    ago (10 minutes by default: a live writer keeps touching it; 0 for a folder that only
    this process writes).
    A write in progress is never touched."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    files = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    now = time.time()
    for f in files:
        m = _TEMP_RE.match(f.name)
        if m is None or not f.is_file():
            continue
        try:
            ours = m["host"] == _HOST and m["pid"] is not None
            stale = (not _pid_alive(int(m["pid"]))) if ours else now - f.stat().st_mtime >= untagged_age_s
            if stale:
                f.unlink()
                removed.append(str(f))
        except OSError as e:
            logger.warning("IDLoRA: could not remove the stale temp file %s: %s", f, e)
    if removed:
        logger.info("IDLoRA: removed %d temp file(s) of interrupted writes under %s", len(removed), root)
    return removed


def read_safetensors(path: Path, damaged: type[Exception], fix: str,
                     keep=lambda key: True) -> tuple[dict, dict[str, str]]:
    """(tensors whose key ``keep`` accepts, metadata) of a safetensors file on the CPU. A file that is there but
    cannot be read raises ``damaged``, naming the file, the reader's reason and ``fix``."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise damaged(f"{path} is not a readable safetensors file ({e}){fix}") from None
