"""Shard files, fingerprints and the resume rule.

Every shard × stage output is written under ``OUT/_work/<stage>/<key>.<fingerprint>.parquet``
via a temporary name and an atomic rename. The fingerprint hashes everything the output depends
on (the input's fingerprint, the stage config, model ids, prompt hashes, seed, code version), so
a rerun finds finished work by name and skips it, and a changed setting simply misses. The rejects
of a shard are renamed into place *before* its output, so an existing output always has its
rejects next to it: a killed run loses nothing and, rerun, duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import pedsynth
from pedsynth.atomic import atomic_write_with
from pedsynth.codehash import code_hash
from pedsynth.schemas.tables import REJECTS_SCHEMA

WORK_DIR = "_work"


def code_version(*modules: str) -> str:
    """``version+hash`` of the code reached from ``modules`` (default: the whole package).

    Fingerprints use it so that a change to the code that computes an output recomputes it;
    see :mod:`pedsynth.codehash`.
    """
    return f"{pedsynth.__version__}+{code_hash(*modules)}"


def fingerprint(**parts: Any) -> str:
    """Hash JSON-able ``parts`` (key order does not matter) into 16 hex characters."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` to ``path`` so that readers see either nothing or the whole file."""
    atomic_write_with(
        path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=1_000)
    )


@dataclass(frozen=True)
class ShardResult:
    """What a stage reports for one shard: small, so flows can pass it between tasks."""

    stage: str
    key: str
    fingerprint: str
    path: str
    rejects_path: str
    rows: int
    rejected: int
    reused: bool = False
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    def content_fingerprint(self) -> str:
        """What the next stage's fingerprint chains to (the ``ShardInput`` protocol)."""
        return self.fingerprint

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, columns=columns)


def shard_paths(out_dir: str | Path, stage: str, key: str, fp: str) -> tuple[Path, Path]:
    base = Path(out_dir) / WORK_DIR / stage
    return base / f"{key}.{fp}.parquet", base / f"{key}.{fp}.rejects.parquet"


def _count_reasons(rejects: pa.Table) -> dict[str, int]:
    if rejects.num_rows == 0:
        return {}
    counts = rejects.group_by("reason").aggregate([("reason", "count")]).to_pylist()
    return {row["reason"]: row["reason_count"] for row in sorted(counts, key=lambda r: r["reason"])}


def run_shard(
    out_dir: str | Path,
    stage: str,
    key: str,
    fp: str,
    compute: Callable[[], tuple[pa.Table, pa.Table]],
) -> ShardResult:
    """Return the finished output for (stage, key, fp), computing and committing it if absent."""
    path, rejects_path = shard_paths(out_dir, stage, key, fp)
    reused = path.exists() and rejects_path.exists()
    if reused:
        rows = pq.read_metadata(path).num_rows
        rejects = pq.read_table(rejects_path, columns=["reason"])
    else:
        table, rejects = compute()
        rejects = rejects.cast(REJECTS_SCHEMA) if rejects.schema != REJECTS_SCHEMA else rejects
        write_parquet_atomic(rejects, rejects_path)
        write_parquet_atomic(table, path)  # the commit point: its presence means "done"
        rows = table.num_rows
    return ShardResult(
        stage,
        key,
        fp,
        str(path),
        str(rejects_path),
        rows=rows,
        rejected=rejects.num_rows,
        reused=reused,
        rejects_by_reason=_count_reasons(rejects),
    )


def read_shard(result: ShardResult | str | Path, columns: list[str] | None = None) -> pa.Table:
    if isinstance(result, ShardResult):
        return result.read(columns)
    return pq.read_table(result, columns=columns)
