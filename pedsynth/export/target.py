"""What both exports share: the finished build they read and the folder they write.

An export folder holds a hidden job file (``.pedsynth-export.json``: what is exported, from
which build, with which options), written before anything else. Every file is committed with
:mod:`pedsynth.atomic`, so a file that exists is whole; a rerun of the same export into the same
folder (after a kill, or after it finished) keeps the files already there and writes the rest.
A folder that is not empty and holds another job (or none) is refused unless ``overwrite``,
which removes what an export writes there (its outputs, the earlier export's outputs named in
the job file, and the job file) and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pedsynth.atomic import atomic_write_bytes
from pedsynth.errors import PreflightError
from pedsynth.schemas.manifest import Manifest, resolve_build

JOB_FILE = ".pedsynth-export.json"
SUMMARY_FILE = "pedsynth_export.json"


def open_build(out_dir: str | Path) -> Manifest:
    """The manifest of the finished build at ``out_dir``, its final shards all present.

    Raises :class:`PreflightError` (one line) for a folder that is not a finished build.
    """
    out = resolve_build(out_dir)  # OUT: the version `latest` names
    if not out.is_dir():
        raise PreflightError(f"{out} is not a folder (expected a finished pedsynth build)")
    try:
        manifest = Manifest.load(out)
    except ValueError as exc:
        raise PreflightError(f"{out}: manifest.json cannot be read: {exc}") from None
    if manifest is None:
        raise PreflightError(f"{out} has no manifest.json (is it a finished pedsynth build?)")
    if not manifest.shards:
        raise PreflightError(f"{out}: the manifest lists no data shards; nothing to export")
    missing = [s.path for s in manifest.shards if not (out / s.path).is_file()]
    if missing:
        raise PreflightError(
            f"{out}: {len(missing)} data shard(s) of the manifest are missing, e.g. {missing[0]}"
        )
    return manifest


def manifest_splits(manifest: Manifest) -> list[str]:
    """The splits of the build's shards: train, val, test first, then any other, in order."""
    from pedsynth.schemas.tables import SPLITS

    found = {s.split for s in manifest.shards}
    return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))


def prepare_folder(
    folder: str | Path, job: dict[str, Any], outputs: list[str], *, overwrite: bool
) -> Path:
    """Make ``folder`` ready for the export ``job`` (a JSON-able dict); returns its path.

    ``outputs`` are the names (files or folders) the export writes inside it.
    """
    folder = Path(folder)
    job = {**job, "outputs": sorted(outputs)}
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"export folder {folder} is a file")
    job_path = folder / JOB_FILE
    entries = list(folder.iterdir()) if folder.is_dir() else []
    if entries:
        previous = _read_job(job_path)
        if previous != job:
            if not overwrite:
                what = "another export" if previous is not None else "other files"
                raise PreflightError(
                    f"export folder {folder} is not empty (it holds {what}); choose an empty "
                    "folder or pass --overwrite"
                )
            earlier = (previous or {}).get("outputs", [])
            for name in sorted({*outputs, *earlier, JOB_FILE}):
                if "/" in name or name in ("", ".", ".."):
                    continue  # only names directly inside the folder
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if _read_job(job_path) != job:
        atomic_write_bytes(_dumps(job), job_path)
    return folder


def _read_job(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_once(path: Path, data: bytes) -> bool:
    """Commit ``data`` at ``path`` unless a (whole, atomically written) file is there already;
    returns whether it wrote."""
    if path.is_file():
        return False
    atomic_write_bytes(data, path)
    return True


def write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(_dumps(value), path)


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
