"""Shard files, fingerprints and the resume rule.

Every shard × stage output is written under ``OUT/_work/<stage>/<key>.<fingerprint>.parquet``
via a temporary name and an atomic rename. The fingerprint hashes everything the output depends
on (the input's fingerprint, the stage config, model ids, prompt hashes, seed, code version), so
a rerun finds finished work by name and skips it, and a changed setting simply misses. The rejects
of a shard are renamed into place *before* its output, so an existing output always has its
rejects next to it: a killed run loses nothing and, rerun, duplicates nothing.

Rejects and failures are different things. A quality reject (unfaithful, a leaked template) is
final for its fingerprint; a failure (``FAILURE_REASONS``: the engine could not answer) is an
accident. A committed shard with failures is tried again by the next run, up to
``MAX_ATTEMPTS`` runs in all. A stage that can (``retry``) sends again only the slots that
failed and keeps every other row and reject of the earlier output; the earlier failure rows stay
as history, renamed ``retried:<reason>``. Until a shard has no failures the stages after it see
a fingerprint that names the attempt, so they recompute too. Each output records, in its
Parquet metadata, how many requests its slots needed, how many failed, which attempt wrote it,
and the prompt and completion tokens the requests of that attempt used (where the engine
reports them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import pedsynth
from pedsynth.atomic import atomic_write_with
from pedsynth.codehash import code_hash
from pedsynth.schemas.tables import REJECTS_SCHEMA

log = logging.getLogger(__name__)

WORK_DIR = "_work"
FAILURE_REASONS = frozenset({"generation_failed", "engine_failed"})
RETRIED = "retried:"  # prefix of a failure reject kept as history after its slot was sent again
MAX_ATTEMPTS = 3  # runs that may try a shard with failures before its failures are final
_REQUESTS, _FAILED, _ATTEMPT = b"pedsynth.requests", b"pedsynth.failed", b"pedsynth.attempt"
_PROMPT_TOKENS, _COMPLETION_TOKENS = b"pedsynth.prompt_tokens", b"pedsynth.completion_tokens"


def with_requests(
    table: pa.Table, requests: int, *, prompt_tokens: int = 0, completion_tokens: int = 0
) -> pa.Table:
    """Mark a stage's output with the number of model requests (slots) it made, so failure
    shares can be computed per stage, and the tokens those requests used (every draft)."""
    metadata = {
        **(table.schema.metadata or {}),
        _REQUESTS: str(requests).encode(),
        _PROMPT_TOKENS: str(prompt_tokens).encode(),
        _COMPLETION_TOKENS: str(completion_tokens).encode(),
    }
    return table.replace_schema_metadata(metadata)


def _meta_int(metadata: dict | None, key: bytes) -> int:
    return int((metadata or {}).get(key, b"0"))


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
    """Write ``table`` to ``path`` so that readers see either nothing or the whole file; every
    page carries a CRC, so a damaged byte is found on reading (:func:`_readable`, verify)."""
    atomic_write_with(
        path,
        lambda tmp: pq.write_table(
            table, tmp, compression="zstd", row_group_size=1_000, write_page_checksum=True
        ),
    )


def _readable(path: Path) -> bool:
    """Whether a committed work file is there and reads back whole (footer, pages, checksums).

    A damaged file (a flipped byte, a truncated copy) counts as absent: the caller computes it
    again, and the log names the file, instead of every rerun stopping on it.
    """
    if not path.exists():
        return False
    try:
        pq.read_table(path, page_checksum_verification=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("%s cannot be read back (%s); computing it again", path, exc)
        return False
    return True


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
    requests: int = 0  # model requests made (0 for stages without a model)
    failed: int = 0  # reject rows that are failures, not quality decisions
    attempt: int = 1  # which run computed this output
    prompt_tokens: int = 0  # tokens of the prompts sent, where the engine reports them
    completion_tokens: int = 0  # tokens generated, every draft (kept or not)

    def content_fingerprint(self) -> str:
        """What the next stage's fingerprint chains to (the ``ShardInput`` protocol): an
        output with failures names its attempt, so a retried one is new input downstream."""
        return self.fingerprint if not self.failed else f"{self.fingerprint}~{self.attempt}"

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
    *,
    retry: Retry | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> ShardResult:
    """Return the finished output for (stage, key, fp), computing and committing it if absent
    (or if it has failures and fewer than ``max_attempts`` runs have tried it: then through
    ``retry`` where the stage has one, else by computing it again)."""
    path, rejects_path = shard_paths(out_dir, stage, key, fp)
    attempt = 1
    retrying = False
    if _readable(path) and _readable(rejects_path):
        metadata = pq.read_schema(path).metadata
        failed, attempt = _meta_int(metadata, _FAILED), max(1, _meta_int(metadata, _ATTEMPT))
        if not failed or attempt >= max_attempts:
            rejects = pq.read_table(rejects_path, columns=["reason"])
            return _result(stage, key, fp, path, rejects_path, rejects, metadata, reused=True)
        attempt += 1
        retrying = retry is not None
    if retrying:
        table, rejects = _retry_failed(path, rejects_path, retry)
    else:
        table, rejects = compute()
    rejects = rejects.cast(REJECTS_SCHEMA) if rejects.schema != REJECTS_SCHEMA else rejects
    failed = sum(n for r, n in _count_reasons(rejects).items() if r in FAILURE_REASONS)
    metadata = {
        **(table.schema.metadata or {}),
        _REQUESTS: str(_meta_int(table.schema.metadata, _REQUESTS)).encode(),
        _FAILED: str(failed).encode(),
        _ATTEMPT: str(attempt).encode(),
    }
    table = table.replace_schema_metadata(metadata)
    write_parquet_atomic(rejects, rejects_path)
    write_parquet_atomic(table, path)  # the commit point: its presence means "done"
    return _result(stage, key, fp, path, rejects_path, rejects, metadata, rows=table.num_rows)


Retry = Callable[[pa.Table, frozenset[str]], tuple[pa.Table, pa.Table]]
"""A stage's way to send again only what failed: given its earlier output and the ``source``
of every slot that failed, the whole new output and the reject rows of the slots it sent."""


def _retry_failed(path: Path, rejects_path: Path, retry: Retry) -> tuple[pa.Table, pa.Table]:
    """The earlier output with its failed slots sent again through ``retry``.

    The earlier rejects stay, except that each failure becomes history (``retried:<reason>``);
    the new rejects say how the slots sent again ended. Requests stay those the shard's slots
    needed (the failure share is of the shard's slots); tokens are this attempt's (what this
    run spent).
    """
    earlier, earlier_rejects = pq.read_table(path), pq.read_table(rejects_path)
    failures = pc.is_in(
        earlier_rejects.column("reason"), value_set=pa.array(sorted(FAILURE_REASONS))
    )
    failed_rows = earlier_rejects.filter(failures)
    table, new_rejects = retry(earlier, frozenset(failed_rows.column("source").to_pylist()))
    history = failed_rows.set_column(
        failed_rows.schema.get_field_index("reason"),
        "reason",
        pc.binary_join_element_wise(RETRIED, failed_rows.column("reason"), ""),
    )
    parts = [earlier_rejects.filter(pc.invert(failures)), history, new_rejects]
    rejects = pa.concat_tables([part.cast(REJECTS_SCHEMA) for part in parts])
    requests = str(_meta_int(earlier.schema.metadata, _REQUESTS)).encode()
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _REQUESTS: requests}
    ), rejects


def _result(
    stage: str,
    key: str,
    fp: str,
    path: Path,
    rejects_path: Path,
    rejects: pa.Table,
    metadata: dict | None,
    *,
    reused: bool = False,
    rows: int | None = None,
) -> ShardResult:
    return ShardResult(
        stage,
        key,
        fp,
        str(path),
        str(rejects_path),
        rows=pq.read_metadata(path).num_rows if rows is None else rows,
        rejected=rejects.num_rows,
        reused=reused,
        rejects_by_reason=_count_reasons(rejects),
        requests=_meta_int(metadata, _REQUESTS),
        failed=_meta_int(metadata, _FAILED),
        attempt=max(1, _meta_int(metadata, _ATTEMPT)),
        prompt_tokens=_meta_int(metadata, _PROMPT_TOKENS),
        completion_tokens=_meta_int(metadata, _COMPLETION_TOKENS),
    )


def read_shard(result: ShardResult | str | Path, columns: list[str] | None = None) -> pa.Table:
    if isinstance(result, ShardResult):
        return result.read(columns)
    return pq.read_table(result, columns=columns)
