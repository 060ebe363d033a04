"""Checks a build can make before Prefect starts: its sources are there, its output writable.

Each failure is a :class:`~pedsynth.errors.PreflightError` whose message names the path and
what to do; the CLI prints it as one ``error:`` line. The same problems found later (a disk
that fills up mid-build) are reported the same way by :mod:`pedsynth.errors`.
"""

from __future__ import annotations

import errno
import shutil
import uuid
from pathlib import Path

from pedsynth import storage
from pedsynth.errors import PreflightError
from pedsynth.schemas.config import BuildConfig, SourceConfig

MIN_FREE_BYTES = 64 * 1024 * 1024  # below this a build cannot even write its work shards


def check_output(out: str | Path) -> None:
    """``out`` is (or can be made) a writable folder on a disk that is not full."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"output {path} is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pedsynth-write-check-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = {
            errno.EROFS: "is on a read-only file system",
            errno.EACCES: "is not writable (permission denied)",
            errno.EPERM: "is not writable (operation not permitted)",
            errno.ENOSPC: "is on a full disk",
            errno.ENOTDIR: "has a file where a folder should be",
        }.get(exc.errno, f"cannot be written ({exc.strerror or exc})")
        raise PreflightError(f"output {path} {why}; choose another --out") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise PreflightError(
            f"output {path}: only {free // (1024 * 1024)} MiB free on its disk; "
            "free some space or choose another --out"
        )


def check_source(source: SourceConfig) -> None:
    """The source's files are where its format expects them (procedural ones are generated)."""
    path = Path(source.path).expanduser()
    if storage.is_url(source.path):
        if source.format == "procedural":
            raise ValueError(
                f"procedural source {source.label!r}: generated on a local disk; give a local "
                f"path, not {source.path}"
            )
        storage.check_store(source.path, cfg_block=None, write=False)
        return
    if source.format == "procedural":
        return
    if source.format == "shards":
        from pedsynth.tasks.sources import shard_files

        shard_files(path)
    elif source.format == "folder":
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise FileNotFoundError(f"folder source {source.label!r}: {path} {what}")
    else:
        from pedsynth.tasks.readers import locate_annotation

        locate_annotation(source)


def check_build(cfg: BuildConfig) -> None:
    if not cfg.sources:
        raise PreflightError(
            "no sources: give --source FORMAT:PATH or a `sources:` list in the config"
        )
    for source in cfg.sources:
        try:
            check_source(source)
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            raise PreflightError(str(exc)) from None
        except PermissionError as exc:
            raise PreflightError(f"source {source.label!r}: {exc}") from None
    from pedsynth.engines.preflight import check_build_engines

    check_build_engines(cfg)
    if cfg.caption is not None and cfg.caption.templates is not None:
        from pedsynth.prompts import load_templates

        load_templates(cfg.caption.templates)  # a missing or malformed file: one line, now
    if storage.is_url(cfg.out):
        storage.check_store(cfg.out, cfg_block=cfg.storage.credentials_block, write=True)
    check_output(storage.working_folder(cfg.out, cfg.storage.cache_dir))
