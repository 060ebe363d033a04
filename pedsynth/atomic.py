"""The one way pedsynth commits a file: write beside it under a hidden name, fsync, rename.

A reader (or a rerun after a kill) sees either the old file or the whole new one, never half
of one. Every writer of the project (work shards, final shards, rejects, the manifest, the
card, faiss indexes, checkpoints) goes through :func:`atomic_path`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no glob for ``*.parquet`` (or the like) matches."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | Path, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it becomes ``path``.

    The temporary file is fsynced and renamed over ``path``; on any error it is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # pyarrow's and faiss's name no file
            raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """Commit whatever ``write(tmp_path)`` puts at the temporary path (pyarrow, faiss, …)."""
    with atomic_path(path) as tmp:
        write(tmp)
