"""Atomic file writes: a file at the target path is either the complete new one or the old one.

Writers get a temporary path in the *same directory* as the target (``os.replace`` is only atomic
within one file system) and the temp file is renamed over the target only when the writer returns
without raising. On any exception the temp file is removed and an existing target stays untouched.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[pathlib.Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on failure it is removed.

    ``suffix`` defaults to the target's suffix, because some writers (ONNX, matplotlib) look at it.
    The parent directory must exist: creating directories silently would hide typos in paths.
    """
    target = pathlib.Path(path)
    parent = target.parent if str(target.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(target)!r}: directory {str(parent)!r} does not exist; create it first"
        )
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a directory; give a file path")
    fd, tmp_name = tempfile.mkstemp(
        dir=parent, prefix=f".{target.name}.", suffix=(target.suffix if suffix is None else suffix) + ".tmp"
    )
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        # Keep the permissions a normal open() would give (mkstemp makes 0600 files).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        # After a successful replace tmp no longer exists; after a failure it must not linger.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return pathlib.Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> pathlib.Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode(encoding))
