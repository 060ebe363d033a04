"""Versions of a build and the ``latest`` pointer (``OUT/versions/<id>/``, ``OUT/latest``).

A version's id is ``<UTC time>-<build fingerprint>`` (``20250102T030405Z-1a2b3c4d5e6f7a8b``):
the time sorts versions by when they were built, the fingerprint finds the version that a
build with the same inputs, settings and code would write, so that build writes nothing. A
version folder is complete when its manifest (written last) is there and every shard matches
its checksum; ``latest`` moves to it only after :func:`pedsynth.verify.verify` says it is
sound, by renaming a new symlink over the old one (a reader sees the old version or the new
one). Pruning keeps ``latest``'s version and the newest others up to ``keep_versions``, and
removes the folders a killed write left behind; it never touches ``_work`` (the stage outputs
versions share).
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from pedsynth.atomic import temp_name
from pedsynth.schemas.manifest import (
    LATEST,
    MANIFEST_FILE,
    VERSIONS_DIR,
    Manifest,
    latest_version,
)

log = logging.getLogger(__name__)


def versions_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / VERSIONS_DIR


def version_ids(out_dir: str | Path) -> list[str]:
    """Every folder under ``OUT/versions/``, oldest first (complete or not)."""
    folder = versions_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def fingerprint_of(version: str) -> str:
    return version.rpartition("-")[2]


def new_version_id(out_dir: str | Path, build_fp: str, now: datetime | None = None) -> str:
    """A fresh id for a version of ``build_fp`` (never one that is already a folder)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    taken = set(version_ids(out_dir))
    version, n = f"{stamp}-{build_fp}", 1
    while version in taken:
        version, n = f"{stamp}.{n}-{build_fp}", n + 1
    return version


def point_latest(out_dir: str | Path, version: str) -> None:
    """Make ``OUT/latest`` name ``version`` in one rename (a relative symlink, so the output
    folder can be moved or mounted elsewhere)."""
    out = Path(out_dir)
    if not (versions_dir(out) / version / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{versions_dir(out) / version} is not a finished version")
    link = out / LATEST
    tmp = temp_name(link)
    os.symlink(f"{VERSIONS_DIR}/{version}", tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    _fsync_dir(out)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(out_dir: str | Path, keep: int, *, current: str | None = None) -> list[str]:
    """Remove old and unfinished versions; returns the ids removed.

    Kept: the version ``latest`` names, ``current`` (the one being published), and the newest
    other finished versions, up to ``keep`` versions in all.
    """
    out = Path(out_dir)
    protected = {v for v in (latest_version(out), current) if v}
    finished = [v for v in version_ids(out) if (versions_dir(out) / v / MANIFEST_FILE).is_file()]
    kept = set(protected)
    for version in reversed(finished):  # newest first
        if len(kept) >= max(keep, len(protected)):
            break
        kept.add(version)
    removed = [v for v in version_ids(out) if v not in kept]
    for version in removed:
        shutil.rmtree(versions_dir(out) / version)
    for leftover in out.glob(f".{LATEST}.tmp-*"):  # a pointer a killed publish left
        leftover.unlink(missing_ok=True)
    if removed:
        log.info("removed %d old or unfinished version(s): %s", len(removed), ", ".join(removed))
    return removed


def previous_manifest(out_dir: str | Path) -> Manifest | None:
    """The manifest of the version ``latest`` names now (what a new version is compared to)."""
    version = latest_version(out_dir)
    if version is None:
        return None
    try:
        return Manifest.load(versions_dir(out_dir) / version)
    except ValueError:
        return None


def link_tree(src: Path, dst: Path) -> None:
    """Put the files of ``src`` into ``dst`` as hard links (a copy where links cannot be made):
    committed files are replaced by rename, never changed in place, so a link keeps the
    content it was made from."""
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
