"""From a configured source to ingest shards: catalogue once, then load images in chunks.

A source's catalogue (one row per image record, no pixels) is fingerprinted by its content, so
an edited annotation file is noticed and an unchanged one is reused. Chunks cut the catalogue
into pieces of about ``shard_rows`` pairs; each chunk's fingerprint covers its own catalogue
rows (so records appended to an annotation file are ingested alone) and the size, mtime, inode
and ctime of its image files (:func:`_stat`), so a replaced image is noticed without hashing
every byte.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.manifest import resolve_build
from pedsynth.schemas.tables import CATALOG_SCHEMA
from pedsynth.tasks import ingest
from pedsynth.tasks.shards import ShardResult, code_version, file_sha256, fingerprint, run_shard

SOURCE_LABEL_KEY = b"pedsynth.source_label"


@dataclass(frozen=True)
class Chunk:
    """One unit of ingest work: a slice of a catalogue, or one existing shard file.

    It is the ingest stage's ``ShardInput``: ``read()`` gives the catalogue rows (or the shard's
    rows, labelled with their source in the schema metadata) and ``content_fingerprint()``
    covers the catalogue slice and the :func:`_stat` of each image file it names.
    """

    source: str  # the source's label
    key: str
    kind: Literal["catalog", "shard"]
    input_path: str  # a catalogue slice [start, stop), or a whole existing shard file
    input_fp: str
    start: int = 0
    stop: int = 0
    shard_rows: int = 0  # rows of an existing shard file

    @property
    def rows(self) -> int:
        return self.stop - self.start if self.kind == "catalog" else self.shard_rows

    @cached_property
    def _catalog_rows(self) -> pa.Table:
        """The catalogue slice, read once per chunk (fingerprint and ingest both need it)."""
        return _read_rows(self.input_path, self.start, self.stop)

    def read(self) -> pa.Table:
        if self.kind == "catalog":
            return self._catalog_rows
        table = pq.read_table(self.input_path)
        metadata = {**(table.schema.metadata or {}), SOURCE_LABEL_KEY: self.source.encode()}
        return table.replace_schema_metadata(metadata)

    def content_fingerprint(self) -> str:
        if self.kind == "shard":
            return self.input_fp
        # The slice's own rows, not the whole catalogue's fingerprint: records appended to the
        # annotation file leave the earlier chunks' fingerprints, and their work, as they were.
        rows = self._catalog_rows
        files = [_stat(p) for p in rows.column("image_path").to_pylist()]
        return fingerprint(rows=_table_fingerprint(rows), files=files, code=code_version(__name__))


def prepare_source(source: SourceConfig) -> SourceConfig:
    """Generate the procedural benchmark when asked for and absent; return a readable source."""
    if source.format != "procedural":
        return source
    root = Path(source.path)
    if not (root / "reid_raw.json").exists():
        from pedsynth.procedural import generate

        generate(
            root,
            identities=source.identities,
            images_per_identity=source.images_per_identity,
            seed=source.seed,
        )
    return source.model_copy(update={"format": "cuhk-pedes", "name": source.label})


def _table_fingerprint(table: pa.Table) -> str:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def shard_files(root: Path) -> list[Path]:
    """The Parquet files of a ``shards`` source: a file, a build's ``data/``, or a folder."""
    if root.is_file():
        return [root]
    if not root.exists():
        raise FileNotFoundError(f"shards source not found: {root}")
    root = resolve_build(root)  # a finished output: the version `latest` names
    data = root / "data" if (root / "data").is_dir() else root
    files = sorted(data.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"shards source {root}: no .parquet files in {data}")
    return files


def plan_chunks(
    source: SourceConfig, out_dir: str | Path, shard_rows: int
) -> tuple[list[Chunk], ShardResult | None]:
    """Catalogue ``source`` (reusing a stored catalogue) and cut it into ingest chunks.

    Returns the chunks and the catalogue's shard result, whose rejects file holds what the
    annotation file itself got wrong (malformed JSON, bad records).
    """
    source = prepare_source(source)
    if source.format == "shards":
        chunks = [
            Chunk(
                source.label,
                f"{source.label}-{i:05d}",
                "shard",
                str(p),
                file_sha256(p),
                shard_rows=pq.read_metadata(p).num_rows,
            )
            for i, p in enumerate(shard_files(Path(source.path)))
        ]
        return chunks, None

    catalog, rejects = ingest.read_catalog(source)
    fp = fingerprint(
        catalog=_table_fingerprint(catalog),
        rejects=_table_fingerprint(rejects),
        code=code_version(__name__),
    )
    result = run_shard(out_dir, "catalog", source.label, fp, lambda: (catalog, rejects))
    weights = pc.max_element_wise(pc.list_value_length(catalog.column("captions")), 1)
    chunks, start, acc = [], 0, 0
    for i, w in enumerate(weights.to_pylist()):
        acc += w
        if acc >= shard_rows:
            chunks.append((start, i + 1))
            start, acc = i + 1, 0
    if start < catalog.num_rows:
        chunks.append((start, catalog.num_rows))
    return [
        Chunk(source.label, f"{source.label}-{k:05d}", "catalog", result.path, fp, a, b)
        for k, (a, b) in enumerate(chunks)
    ], result


def _read_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a catalogue, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    groups, first_row, offset = [], None, 0
    for g in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first_row = offset if first_row is None else first_row
        offset += n
    table = parquet.read_row_groups(groups, use_threads=False) if groups else None
    if table is None:
        return CATALOG_SCHEMA.empty_table()
    return table.cast(CATALOG_SCHEMA).slice(start - first_row, stop - start)


def _stat(path: str) -> tuple[int, int, int, int] | None:
    """What an image file's fingerprint covers: size, mtime, inode and ctime (None if absent).

    Size and mtime alone miss a file replaced by another of the same size whose mtime was set
    back (``touch -r``, ``cp -p``, ``rsync -t``, an unpacked archive). The inode changes when a
    file is replaced by a new one (``mv``, most editors and copy tools), and the ctime changes
    on every write, rename or metadata change and cannot be set from user space, so together
    they notice a swap without hashing each image. A symbolic link is followed: what counts is
    the file it leads to. The safe side of this: a dataset copied or restored to another disk
    (or moved by a tool that rewrites inodes) gets new inodes and ctimes, and its images are
    ingested again once although their content did not change.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def ingest_chunk(chunk: Chunk, cfg: IngestConfig, out_dir: str | Path) -> ShardResult:
    """Load and verify the images of one chunk into an ingest shard (or reuse a finished one)."""
    from pedsynth.tasks.stages import run_shard_stage

    return run_shard_stage("ingest", cfg, 0, chunk, out_dir)
