"""``pedsynth verify OUT``: re-read a finished build and say whether it is sound.

``OUT`` is read through :func:`pedsynth.schemas.manifest.resolve_build`: the version ``latest``
names (or the folder itself: a version folder, a build made before versions).

Every final shard the manifest names is read back whole (footer, pages and their CRCs) and
checked against the manifest: the schema is the pairs schema of the manifest's schema version,
row counts and sha256 match, ``pair_id`` is unique over the dataset, every image decodes
(Pillow ``verify`` and ``load``) at the stored width and height. The rejects files must read
back with the rejects schema, and ``data/`` and ``rejects/`` must hold nothing the manifest does
not name (a stray file, a leftover ``.…tmp-…`` file). When the memory stage ran, its faiss
indexes must hold as many vectors as ``memory.json`` says and the captions index one per pair.

Each problem names the file and what is wrong; :func:`verify` returns them all instead of
stopping at the first, so one run lists everything to repair.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pedsynth.errors import PreflightError
from pedsynth.schemas.manifest import MANIFEST_FILE, Manifest, resolve_build
from pedsynth.schemas.tables import PAIRS_SCHEMA, REJECTS_SCHEMA

DATA_DIR, REJECTS_DIR = "data", "rejects"  # as the write stage lays them out
_SCHEMA_VERSION_KEY = b"pedsynth.schema_version"


@dataclass(frozen=True)
class Problem:
    file: str  # relative to the output folder
    problem: str

    def line(self, out: str | Path) -> str:
        return f"{str(out).rstrip('/')}/{self.file}: {self.problem}"


@dataclass
class Report:
    out: str
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    pairs: int = 0
    images: int = 0
    rejects: int = 0

    @property
    def sound(self) -> bool:
        return not self.problems

    def add(self, file: str | Path, problem: str) -> None:
        self.problems.append(Problem(str(file), problem))

    def summary(self) -> str:
        checked = (
            f"{self.shards} shards, {self.pairs} pairs, {self.images} images decoded, "
            f"{self.rejects} rejects"
        )
        if self.sound:
            return f"{self.out}: sound ({checked})"
        files = len({p.file for p in self.problems})
        return f"{self.out}: {len(self.problems)} problems in {files} files ({checked})"

    def to_json(self) -> dict:
        return {
            "out": self.out,
            "sound": self.sound,
            "problems": [asdict(p) for p in self.problems],
            "checked": {
                "shards": self.shards,
                "pairs": self.pairs,
                "images": self.images,
                "rejects": self.rejects,
            },
        }


def load_manifest(out: str | Path) -> Manifest:
    """The manifest of a finished build, or a one-line error saying it is not one."""
    try:
        manifest = Manifest.load(out)
    except ValueError as exc:
        raise PreflightError(f"{out}: {MANIFEST_FILE} cannot be read: {exc}") from None
    if manifest is None:
        raise PreflightError(
            f"{str(out).rstrip('/')}/{MANIFEST_FILE} not found "
            f"(is {out} a finished pedsynth build?)"
        )
    return manifest


def verify(out_dir: str | Path, *, decode_images: bool = True) -> Report:
    """Check the build ``out_dir`` resolves to (``OUT``: the version ``latest`` names; a
    version folder: itself); the report lists every problem found. ``decode_images=False``
    leaves out decoding every image (the build's own check before it moves ``latest``: ingest
    decoded each image already, and the checksums show the files are the ones written)."""
    out = resolve_build(out_dir)
    manifest = load_manifest(out)
    report = Report(str(out))
    tree = _Tree(out)
    seen_pairs: dict[str, str] = {}
    for entry in manifest.shards:
        _check_shard(tree, entry, manifest.schema_version, seen_pairs, report, decode_images)
    report.shards = len(manifest.shards)
    if report.pairs != manifest.totals.pairs:
        report.add(
            MANIFEST_FILE,
            f"totals say {manifest.totals.pairs} pairs, the shards hold {report.pairs}",
        )
    for rel in manifest.rejects:
        _check_rejects(tree, rel, report)
    if report.rejects != manifest.totals.rejects:
        report.add(
            MANIFEST_FILE,
            f"totals say {manifest.totals.rejects} rejects, the rejects files hold "
            f"{report.rejects}",
        )
    named = {e.path for e in manifest.shards} | set(manifest.rejects)
    for sub in (DATA_DIR, REJECTS_DIR):
        for name in tree.names(sub):
            rel = f"{sub}/{name}"
            if rel in named:
                continue
            what = "a temporary file left by an interrupted write" if ".tmp-" in name else "a file"
            report.add(rel, f"{what} the manifest does not name")
    _check_memory(tree, manifest, report)
    return report


class _Tree:
    """The files of one build, on a local disk or in a store (fsspec), read the same way."""

    def __init__(self, out: str | Path):
        from pedsynth.storage import url_fs

        self.fs, root = url_fs(str(out))
        self.root = root.rstrip("/")

    def read(self, rel: str) -> bytes | None:
        """The whole file, or None when it is not there."""
        try:
            return self.fs.cat_file(f"{self.root}/{rel}")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def names(self, sub: str) -> list[str]:
        try:
            found = self.fs.ls(f"{self.root}/{sub}", detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(str(p).rstrip("/").rpartition("/")[2] for p in found)


def _check_shard(
    tree: _Tree,
    entry,
    schema_version: str,
    seen_pairs: dict[str, str],
    report: Report,
    decode_images: bool,
) -> None:
    rel = entry.path
    data = tree.read(rel)
    if data is None:
        report.add(rel, "missing (named by the manifest)")
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        report.add(rel, f"sha256 {digest[:12]}… differs from the manifest's {entry.sha256[:12]}…")
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        report.add(rel, f"cannot be read: {exc}")
        return
    if table.schema.remove_metadata() != PAIRS_SCHEMA.remove_metadata():
        report.add(rel, f"schema differs from the pairs schema: {_schema_diff(table.schema)}")
        return
    version = (table.schema.metadata or {}).get(_SCHEMA_VERSION_KEY, b"").decode()
    if version != schema_version:
        report.add(rel, f"schema version {version!r}, the manifest says {schema_version!r}")
    if table.num_rows != entry.rows:
        report.add(rel, f"{table.num_rows} rows, the manifest says {entry.rows}")
    report.pairs += table.num_rows
    splits = set(table.column("split").to_pylist())
    if splits - {entry.split}:
        report.add(
            rel, f"rows of split(s) {sorted(splits - {entry.split})} in a {entry.split} shard"
        )
    for pair_id in table.column("pair_id").to_pylist():
        if pair_id in seen_pairs:
            report.add(rel, f"pair_id {pair_id} already in {seen_pairs[pair_id]}")
        else:
            seen_pairs[pair_id] = rel
    if decode_images:
        _check_images(rel, table, report)


def _schema_diff(schema: pa.Schema) -> str:
    want = {f.name: f for f in PAIRS_SCHEMA}
    have = {f.name: f for f in schema}
    parts = [f"missing {n}" for n in want if n not in have]
    parts += [f"unexpected {n}" for n in have if n not in want]
    parts += [
        f"{n}: {have[n].type}{'' if have[n].nullable else ' not null'}"
        for n in want
        if n in have and not have[n].equals(want[n])
    ]
    return ", ".join(parts) or "column order differs"


def _check_images(rel: str, table: pa.Table, report: Report) -> None:
    from PIL import Image

    done: set[str] = set()
    columns = table.select(["image_id", "image", "width", "height"]).to_pylist()
    for row in columns:
        image_id = row["image_id"]
        if image_id in done:
            continue
        done.add(image_id)
        data = (row["image"] or {}).get("bytes") or b""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                size = img.size
        except Exception as exc:  # Pillow raises many types for damaged data
            report.add(rel, f"image {image_id} does not decode: {type(exc).__name__}: {exc}")
            continue
        report.images += 1
        if size != (row["width"], row["height"]):
            report.add(
                rel,
                f"image {image_id} is {size[0]}x{size[1]}, the row says "
                f"{row['width']}x{row['height']}",
            )


def _check_rejects(tree: _Tree, rel: str, report: Report) -> None:
    data = tree.read(rel)
    if data is None:
        report.add(rel, "missing (named by the manifest)")
        return
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        report.add(rel, f"cannot be read: {exc}")
        return
    if table.schema.remove_metadata() != REJECTS_SCHEMA.remove_metadata():
        report.add(rel, "schema differs from the rejects schema")
    report.rejects += table.num_rows


def _check_memory(tree: _Tree, manifest: Manifest, report: Report) -> None:
    from pedsynth.tasks.memory_index import (
        CAPTIONS_INDEX,
        IMAGES_INDEX,
        MEMORY_DIR,
        MEMORY_FILE,
    )

    meta_rel = f"{MEMORY_DIR}/{MEMORY_FILE}"
    meta = tree.read(meta_rel)
    if "memory" not in manifest.stages and meta is None and not tree.names(MEMORY_DIR):
        return
    try:
        if meta is None:
            raise FileNotFoundError("missing")
        counts = json.loads(meta)["counts"]
    except (OSError, ValueError, KeyError) as exc:
        report.add(meta_rel, f"cannot be read: {exc}")
        return
    duplicates = manifest.stages.get("write")
    duplicate_pairs = duplicates.rejects_by_reason.get("duplicate_pair", 0) if duplicates else 0
    expected = {
        IMAGES_INDEX: (counts.get("images"), f"{meta_rel} counts"),
        CAPTIONS_INDEX: (manifest.totals.pairs + duplicate_pairs, "the manifest's pairs"),
    }
    import faiss
    import numpy as np

    for name, (want, where) in expected.items():
        rel = f"{MEMORY_DIR}/{name}"
        try:
            blob = tree.read(rel)
            if blob is None:
                raise RuntimeError("missing")
            ntotal = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)).ntotal
        except Exception as exc:  # faiss raises RuntimeError with its own message
            report.add(rel, f"cannot be read: {str(exc).strip().splitlines()[0]}")
            continue
        if ntotal != want:
            report.add(rel, f"holds {ntotal} vectors, {where} say {want}")
