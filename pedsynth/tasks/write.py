"""The write stage: final Parquet shards, the rejects table, the dataset card and the manifest.

Each build is a new version folder ``OUT/versions/<id>/`` (:mod:`pedsynth.versions`); a
finished version is never written over. Inside it, final shards use the Hugging Face layout
``data/{split}-{i:05d}-of-{n:05d}.parquet`` so ``datasets.load_dataset(OUT/latest)`` finds the
splits. ``manifest.json`` is written last: it is the commit marker of a version, and its
``build_fingerprint`` lets a rerun with the same inputs find the version and write nothing.
``OUT/latest`` moves to a new version only after it verifies; old versions are pruned.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth import versions
from pedsynth.schemas.config import WriteConfig
from pedsynth.schemas.manifest import (
    MANIFEST_FILE,
    Changes,
    Manifest,
    SplitChanges,
    StageCounts,
    StageReuse,
    latest_version,
)
from pedsynth.schemas.tables import (
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    reject_row,
    rejects_table,
)
from pedsynth.tasks.memory_index import MEMORY_DIR
from pedsynth.tasks.shards import (
    ShardResult,
    code_version,
    file_sha256,
    fingerprint,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

DATA_DIR = "data"
REJECTS_DIR = "rejects"
MANIFEST = MANIFEST_FILE
REJECTS_PER_FILE = 100_000
STAGE = "write"


def build_fingerprint(inputs: list[ShardResult], shard_rows: int, write_cfg: dict) -> str:
    """What a finished build is recognised by: its inputs, its layout and the write code."""
    return fingerprint(
        inputs=[(r.stage, r.key, r.content_fingerprint()) for r in inputs],
        shard_rows=shard_rows,
        write=write_cfg,
        schema=SCHEMA_VERSION,
        code=code_version(__name__),
    )


def finished_manifest(out_dir: str | Path, build_fp: str) -> Manifest | None:
    """The existing manifest if it describes exactly this build and every shard it names is
    there with the checksum it records (a damaged or replaced shard means: write again)."""
    manifest = Manifest.load(out_dir)
    if manifest is None or manifest.build_fingerprint != build_fp:
        return None
    out = Path(out_dir)
    if not all((out / f).exists() for f in manifest.rejects):
        return None
    for shard in manifest.shards:
        path = out / shard.path
        if not path.exists() or file_sha256(path) != shard.sha256:
            log.warning("%s is missing or differs from the manifest; writing the build again", path)
            return None
    return manifest


def _retract(out: Path) -> None:
    """Before any final file is written over: remove the manifest (the commit marker), so a
    kill from here on leaves a build that says it is unfinished, never an old manifest over
    new shards; and remove the temporary files a killed writer left behind."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for sub in (DATA_DIR, REJECTS_DIR):
        for leftover in (out / sub).glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)


def _keep_mask(table: pa.Table, seen: set[str]) -> tuple[list[bool], list[dict]]:
    """Rows to write: captioned and not already written. The others become reject rows."""
    keep, rejects = [], []
    pair_ids = table.column("pair_id").to_pylist()
    captions_null = pc.is_null(table.column("caption")).to_pylist()
    for i, (pair_id, uncaptioned) in enumerate(zip(pair_ids, captions_null, strict=True)):
        reason = "uncaptioned" if uncaptioned else "duplicate_pair" if pair_id in seen else None
        keep.append(reason is None)
        if reason is None:
            seen.add(pair_id)
            continue
        row = table.slice(i, 1).select(["image_id", "person_id", "split", "source"]).to_pylist()[0]
        detail = (
            "no caption: add a caption stage or a captioned source"
            if reason == "uncaptioned"
            else "an earlier row has the same pair_id"
        )
        rejects.append(reject_row(STAGE, reason, detail, row, pair_id=pair_id))
    return keep, rejects


class _SplitWriter:
    """Streams rows of one split into files of ``shard_rows`` rows, named i-of-n."""

    def __init__(self, out_dir: Path, split: str, total_rows: int, shard_rows: int):
        self.out_dir, self.split, self.shard_rows = out_dir, split, shard_rows
        self.n = max(1, math.ceil(total_rows / shard_rows))
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.written: list[dict] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.shard_rows:
            merged = pa.concat_tables(self.pending)
            self._flush(merged.slice(0, self.shard_rows))
            rest = merged.slice(self.shard_rows)
            self.pending, self.pending_rows = [rest], rest.num_rows

    def close(self) -> list[dict]:
        if self.pending_rows or not self.written:
            merged = pa.concat_tables(self.pending) if self.pending else PAIRS_SCHEMA.empty_table()
            self._flush(merged)
        if len(self.written) != self.n:
            raise RuntimeError(f"{self.split}: wrote {len(self.written)} shards, planned {self.n}")
        return self.written

    def _flush(self, table: pa.Table) -> None:
        rel = f"{DATA_DIR}/{self.split}-{len(self.written):05d}-of-{self.n:05d}.parquet"
        write_parquet_atomic(table.combine_chunks(), self.out_dir / rel)
        self.written.append(
            {
                "path": rel,
                "split": self.split,
                "rows": table.num_rows,
                "sha256": file_sha256(self.out_dir / rel),
            }
        )


def _write_rejects(
    out_dir: Path, reject_paths: list[str], extra: list[dict]
) -> tuple[list[str], pa.Table]:
    tables = [pq.read_table(p).cast(REJECTS_SCHEMA) for p in reject_paths]
    tables.append(rejects_table(extra))
    rejects = pa.concat_tables(tables)
    n = max(1, math.ceil(rejects.num_rows / REJECTS_PER_FILE))
    written = []
    for i in range(n):
        rel = f"{REJECTS_DIR}/rejects-{i:05d}-of-{n:05d}.parquet"
        write_parquet_atomic(rejects.slice(i * REJECTS_PER_FILE, REJECTS_PER_FILE), out_dir / rel)
        written.append(rel)
    return written, rejects


def _remove_stale(out_dir: Path, keep: list[str]) -> None:
    keep_set = set(keep)
    for sub in (DATA_DIR, REJECTS_DIR):
        for path in (out_dir / sub).glob("*.parquet"):
            if f"{sub}/{path.name}" not in keep_set:
                path.unlink()


def _totals(shards: list[dict], out_dir: Path, n_rejects: int) -> dict[str, Any]:
    """Counts per split, read back from the written shards (ids only, never images)."""
    by_split: dict[str, dict[str, int]] = {}
    images: set[str] = set()
    splits_of: dict[str, set[str]] = defaultdict(set)
    for split in sorted({s["split"] for s in shards}):
        files = [out_dir / s["path"] for s in shards if s["split"] == split]
        cols = pa.concat_tables(
            [pq.read_table(f, columns=["image_id", "person_id"]) for f in files]
        )
        split_images = set(cols.column("image_id").to_pylist())
        split_people = set(cols.column("person_id").to_pylist())
        by_split[split] = {
            "pairs": cols.num_rows,
            "images": len(split_images),
            "identities": len(split_people),
        }
        images |= split_images
        for pid in split_people:
            splits_of[pid].add(split)
    return {
        "pairs": sum(v["pairs"] for v in by_split.values()),
        "images": len(images),
        "identities": len(splits_of),
        "rejects": n_rejects,
        "by_split": by_split,
        "identities_in_several_splits": sum(1 for v in splits_of.values() if len(v) > 1),
    }


def write_dataset(
    out_dir: str | Path,
    inputs: list[ShardResult],
    reject_paths: list[str],
    *,
    shard_rows: int,
    config: dict,
    stages: dict[str, StageCounts],
    build_fp: str | None = None,
    code_hashes: dict[str, str] | None = None,
    version: str = "",
    previous: tuple[Path, Manifest] | None = None,
) -> Manifest:
    """Write the final dataset from the last stage's shards (in order) and all stages' rejects
    into the folder ``out_dir`` (a version folder, from :class:`WriteStage`).

    Returns the manifest. Skips everything when a manifest for the same build is already there.
    ``previous`` (folder, manifest) is the version this one is compared to in ``changes``.
    """
    started = time.monotonic()
    out = Path(out_dir)
    build_fp = build_fp or build_fingerprint(inputs, shard_rows, config.get("write", {}))
    if (done := finished_manifest(out, build_fp)) is not None:
        return done
    _retract(out)

    seen: set[str] = set()
    masks, write_rejects = [], []
    counts: dict[str, int] = defaultdict(int)
    for r in inputs:  # pass 1: decide which rows are written, so every split's n is known
        head = pq.read_table(
            r.path, columns=["pair_id", "caption", "image_id", "person_id", "split", "source"]
        )
        keep, rejects = _keep_mask(head, seen)
        masks.append(pa.array(keep, pa.bool_()))
        write_rejects += rejects
        for split, k in zip(head.column("split").to_pylist(), keep, strict=True):
            counts[split] += int(k)

    writers = {
        split: _SplitWriter(out, split, n, shard_rows)
        for split, n in sorted(counts.items())
        if n > 0
    }
    for r, mask in zip(inputs, masks, strict=True):  # pass 2: stream rows into final shards
        table = pq.read_table(r.path).cast(PAIRS_SCHEMA).filter(mask)
        for split, writer in writers.items():
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                writer.add(part)
    shards = [entry for w in writers.values() for entry in w.close()]

    reject_files, rejects = _write_rejects(out, reject_paths, write_rejects)
    _remove_stale(out, [s["path"] for s in shards] + reject_files)

    reasons: dict[str, int] = defaultdict(int)
    for row in write_rejects:
        reasons[row["reason"]] += 1
    own = StageCounts(
        shards=len(shards),
        rows_in=sum(r.rows for r in inputs),
        rows_out=sum(s["rows"] for s in shards),
        rejected=len(write_rejects),
        rejects_by_reason=dict(sorted(reasons.items())),
    )
    manifest = Manifest(
        name=config.get("name", "pedsynth"),
        schema_version=SCHEMA_VERSION,
        code_version=code_version(),
        code_hashes={**(code_hashes or {}), STAGE: code_version(__name__).partition("+")[2]},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        build_fingerprint=build_fp,
        config=config,
        shards=shards,
        rejects=reject_files,
        stages={**stages, STAGE: own},
        totals=_totals(shards, out, rejects.num_rows),
        version=version,
        changes=_changes(out, shards, stages, previous),
    )
    if manifest.totals.identities_in_several_splits:
        log.warning(
            "%d identities appear in more than one split",
            manifest.totals.identities_in_several_splits,
        )
    own.seconds = round(time.monotonic() - started, 3)  # the card's drawing excluded
    _write_card(out, manifest)
    manifest.save(out)  # last: the commit marker of the build
    return manifest


def _pairs(folder: Path, shards: list[Any]) -> dict[str, dict[str, str | None]]:
    """split -> pair_id -> caption, read from the shards (three columns, never images)."""
    found: dict[str, dict[str, str | None]] = defaultdict(dict)
    for shard in shards:
        path = shard["path"] if isinstance(shard, dict) else shard.path
        cols = pq.read_table(folder / path, columns=["pair_id", "split", "caption"])
        for pair_id, split, caption in zip(
            *(cols.column(c).to_pylist() for c in ("pair_id", "split", "caption")), strict=True
        ):
            found[split][pair_id] = caption
    return found


def _changes(
    out: Path,
    shards: list[dict],
    stages: dict[str, StageCounts],
    previous: tuple[Path, Manifest] | None,
) -> Changes:
    """Rows added, removed, kept and changed per split since ``previous``, and per stage the
    shards reused from the shared work cache against those computed again."""
    reuse = {
        name: StageReuse(reused=c.reused, recomputed=c.shards - c.reused)
        for name, c in stages.items()
    }
    new = _pairs(out, shards)
    old: dict[str, dict[str, str | None]] = {}
    if previous is not None:
        try:
            old = _pairs(previous[0], previous[1].shards)
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("%s cannot be read to compare with (%s)", previous[0], exc)
            return Changes(previous=previous[1].version or None, stages=reuse)
    splits = {}
    for split in sorted(set(new) | set(old)):
        now, before = new.get(split, {}), old.get(split, {})
        kept = now.keys() & before.keys()
        splits[split] = SplitChanges(
            added=len(now.keys() - before.keys()),
            removed=len(before.keys() - now.keys()),
            kept=len(kept),
            changed=sum(1 for p in kept if now[p] != before[p]),
        )
    return Changes(
        previous=previous[1].version or None if previous else None, splits=splits, stages=reuse
    )


def _write_card(out: Path, manifest: Manifest) -> None:
    from pedsynth.tasks.card import write_dataset_card

    write_dataset_card(out, manifest.model_dump(mode="json"))


class WriteStage:
    """The dataset stage that turns the last stage's shards into the published dataset."""

    name = STAGE

    def __init__(self, config: WriteConfig, seed: int = 0):
        self.config = config

    def fingerprint_parts(self) -> dict[str, Any]:
        # Pruning settings shape no output: changing them makes no new version.
        write = self.config.model_dump(mode="json", exclude={"keep_versions"})
        return {"write": write, "schema": SCHEMA_VERSION}

    def run(self, shards: list[ShardResult], context: Any) -> list[ShardResult]:
        """Final shards as results: one per file; the first carries the write rejects.

        The version of this build fingerprint is found, or written as a new version; then
        ``latest`` moves to it once it verifies, and old versions are pruned."""
        out = Path(context.out_dir)
        build_fp = fingerprint(stage=context.fingerprint, shard_rows=context.shard_rows)
        version, manifest = find_version(out, build_fp)
        reused = manifest is not None
        if manifest is None:
            previous = versions.previous_manifest(out)
            version = versions.new_version_id(out, build_fp)
            folder = versions.versions_dir(out) / version
            if "memory" in context.stages and (out / MEMORY_DIR).is_dir():
                versions.link_tree(out / MEMORY_DIR, folder / MEMORY_DIR)
            manifest = write_dataset(
                folder,
                shards,
                list(context.reject_paths),
                shard_rows=context.shard_rows,
                config=context.config,
                stages=context.stages,
                build_fp=build_fp,
                code_hashes=context.code_hashes,
                version=version,
                previous=(
                    (versions.versions_dir(out) / previous.version, previous)
                    if previous is not None
                    else None
                ),
            )
        publish(out, version)
        versions.prune(out, self.config.keep_versions, current=version)
        folder = versions.versions_dir(out) / version
        own = manifest.stages[STAGE]
        return [
            ShardResult(
                stage=STAGE,
                key=Path(entry.path).stem,
                fingerprint=build_fp,
                path=str(folder / entry.path),
                rejects_path="",
                rows=entry.rows,
                rejected=own.rejected if i == 0 else 0,
                reused=reused,
                rejects_by_reason=own.rejects_by_reason if i == 0 else {},
            )
            for i, entry in enumerate(manifest.shards)
        ]


def find_version(out_dir: Path, build_fp: str) -> tuple[str, Manifest | None]:
    """The newest finished version of ``build_fp`` whose shards match their checksums (the one
    ``latest`` names first), or ``("", None)``."""
    ids = versions.version_ids(out_dir)
    candidates = [v for v in ids if versions.fingerprint_of(v) == build_fp]
    current = latest_version(out_dir)
    candidates.sort(key=lambda v: (v == current, v), reverse=True)
    for version in candidates:
        manifest = finished_manifest(versions.versions_dir(out_dir) / version, build_fp)
        if manifest is not None:
            return version, manifest
    return "", None


def publish(out_dir: Path, version: str) -> None:
    """Move ``latest`` to ``version`` once it verifies (nothing to do when it names it)."""
    from pedsynth.verify import verify

    if latest_version(out_dir) == version:
        return
    report = verify(versions.versions_dir(out_dir) / version, decode_images=False)
    if not report.sound:
        first = report.problems[0].line(Path(report.out))
        raise RuntimeError(
            f"version {version} does not verify ({len(report.problems)} problems, e.g. "
            f"{first}); {out_dir / 'latest'} still names the version before it"
        )
    versions.point_latest(out_dir, version)
    log.info("%s now names version %s", out_dir / "latest", version)


def build_stage(config: WriteConfig, seed: int = 0) -> WriteStage:
    return WriteStage(config, seed)
