"""What the dataset card reports about a finished build, read from its Parquet files.

Counts come from the manifest, which the flow keeps while it runs; the shards are read only for
what nothing else records (caption statistics, identity histograms, the example rows), and only
the columns that need: the light id and caption columns batch by batch, the image column for
the few example rows alone. Nothing here formats or draws; :mod:`pedsynth.tasks.card_markdown`
and :mod:`pedsynth.tasks.card_figures` do.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth.schemas.tables import CAPTION_SOURCES, SPLITS

SPLIT_COUNT_KEYS = ("pairs", "images", "identities")

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")
_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")
_SCAN_COLUMNS = ["person_id", "image_id", "caption", "caption_source", "template_id"]
_EXAMPLE_COLUMNS = ["pair_id", "image_id", "person_id", "image", "caption", "caption_source"]
# MLLM captions are reported apart by instruction: static vs template-guided (MLLM4Text-ReID).
SOURCE_ORDER = ("original", "mllm (static)", "mllm (template)", *CAPTION_SOURCES[1:])


# --------------------------------------------------------------------------- captions


def caption_words(caption: str) -> list[str]:
    """Lower-cased words without punctuation, so "Man," and "man" count as one type."""
    return _WORD_RE.findall(caption.lower())


def _diversity_sample() -> Any:
    from pedsynth.diversity import DiversitySample  # it imports caption_words from here

    return DiversitySample()


@dataclass
class CaptionStats:
    """Caption statistics gathered batch by batch, so no split is held in memory whole."""

    lengths: list[int] = field(default_factory=list)
    chars: int = 0
    openings: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)
    tokens: int = 0
    templates: set[str] = field(default_factory=set)  # template ids of template-guided captions
    diversity: Any = field(default_factory=lambda: _diversity_sample())  # pedsynth.diversity

    def add(self, caption: str, template_id: str | None = None) -> None:
        if template_id:
            self.templates.add(template_id)
        self.diversity.add(caption, template_id)
        words = caption_words(caption)
        self.lengths.append(len(words))
        self.chars += len(caption)
        self.openings.add(" ".join(words[:3]))
        self.types.update(words)
        self.tokens += len(words)

    def summary(self) -> dict[str, float | int]:
        n = len(self.lengths)
        if n == 0:
            return {
                "count": 0,
                "mean_words": 0.0,
                "median_words": 0.0,
                "mean_chars": 0.0,
                "distinct_openings": 0.0,
                "type_token_ratio": 0.0,
            }
        return {
            "count": n,
            "mean_words": sum(self.lengths) / n,
            "median_words": float(statistics.median(self.lengths)),
            "mean_chars": self.chars / n,
            "distinct_openings": len(self.openings) / n,
            "type_token_ratio": len(self.types) / self.tokens if self.tokens else 0.0,
        }


def caption_diversity(captions: Sequence[str | None]) -> dict[str, float | int]:
    """Length and diversity of a set of captions, to compare caption sources.

    Words are lower-cased ``\\w+`` runs (punctuation dropped). ``distinct_openings`` is the
    number of distinct first-three-word openings over the number of captions (templated
    captions score low); ``type_token_ratio`` is distinct words over all words. ``None``
    entries are skipped; an empty input gives zeros.
    """
    acc = CaptionStats()
    for caption in captions:
        if caption is not None:
            acc.add(caption)
    return acc.summary()


def _source_key(source: str | None, template_id: str | None) -> str:
    if source == "mllm":
        return "mllm (template)" if template_id else "mllm (static)"
    return source or "unknown"


# --------------------------------------------------------------------------- shards


def split_files(out: Path) -> dict[str, list[Path]]:
    """Shards on disk per split, known splits first, so the card describes what is there."""
    found: dict[str, list[Path]] = {}
    data = out / "data"
    if data.is_dir():
        for path in sorted(data.glob("*.parquet")):
            m = _SHARD_RE.match(path.name)
            if m:
                found.setdefault(m["split"], []).append(path)
    order = [s for s in SPLITS if s in found] + sorted(s for s in found if s not in SPLITS)
    return {s: found[s] for s in order}


@dataclass
class SplitStats:
    pairs: int
    images: int
    identities: int
    images_per_identity: list[int]
    captions_per_identity: list[int]


def _scan_split(
    paths: Sequence[Path], by_source: dict[str, CaptionStats], all_captions: CaptionStats
) -> SplitStats:
    """Identity counts of one split, feeding its captions into the per-source statistics.

    Reads the light columns batch by batch; only the (person_id, image_id) columns are kept
    until the end, as Arrow arrays, to count distinct images per identity.
    """
    ids: list[pa.Table] = []
    caps_per_id: Counter[str] = Counter()
    pairs = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=_SCAN_COLUMNS, batch_size=65_536):
            pairs += batch.num_rows
            ids.append(pa.table({"person_id": batch["person_id"], "image_id": batch["image_id"]}))
            captioned = pc.filter(batch["person_id"], pc.is_valid(batch["caption"]))
            for vc in pc.value_counts(captioned).to_pylist():
                caps_per_id[vc["values"]] += vc["counts"]
            for cap, src, tid in zip(
                batch["caption"].to_pylist(),
                batch["caption_source"].to_pylist(),
                batch["template_id"].to_pylist(),
                strict=True,
            ):
                if cap is not None:
                    by_source.setdefault(_source_key(src, tid), CaptionStats()).add(cap, tid)
                    all_captions.add(cap, tid)
    if pairs == 0:
        return SplitStats(0, 0, 0, [], [])
    images = pa.concat_tables(ids).group_by(["person_id", "image_id"]).aggregate([])
    per_id = images.group_by("person_id").aggregate([("image_id", "count")])
    return SplitStats(
        pairs=pairs,
        images=images.num_rows,
        identities=per_id.num_rows,
        images_per_identity=per_id["image_id_count"].to_pylist(),
        captions_per_identity=[caps_per_id[p] for p in per_id["person_id"].to_pylist()],
    )


@dataclass
class BuildStats:
    """Everything the card reads from ``OUT/data``, in one pass over the light columns."""

    files: dict[str, list[Path]]  # split -> its shards, in order
    rows: dict[Path, int]  # shard -> row count (from the Parquet footer)
    splits: dict[str, SplitStats]
    by_source: dict[str, CaptionStats]  # in the order the card lists caption sources
    all_captions: CaptionStats

    def split_rows(self, split: str) -> int:
        return sum(self.rows[p] for p in self.files.get(split, []))

    def example_split(self) -> str | None:
        """The split the examples come from: train, else the first split with rows."""
        return next((s for s in ["train", *self.files] if self.split_rows(s)), None)


def scan_build(out: Path) -> BuildStats:
    files = split_files(out)
    rows = {p: pq.ParquetFile(p).metadata.num_rows for ps in files.values() for p in ps}
    by_source: dict[str, CaptionStats] = {}
    all_captions = CaptionStats()
    splits = {split: _scan_split(paths, by_source, all_captions) for split, paths in files.items()}
    order = [s for s in SOURCE_ORDER if s in by_source]
    order += sorted(s for s in by_source if s not in SOURCE_ORDER)
    return BuildStats(files, rows, splits, {s: by_source[s] for s in order}, all_captions)


def example_rows(stats: BuildStats, split: str, n: int) -> list[dict[str, Any]]:
    """``n`` evenly spaced rows of one split, reading only their row groups' needed columns."""
    paths = stats.files.get(split, [])
    total = stats.split_rows(split)
    if n <= 0 or total == 0:
        return []
    n = min(n, total)
    wanted = sorted({(k * total) // n for k in range(n)})
    out: list[dict[str, Any]] = []
    start = 0
    for path in paths:
        end = start + stats.rows[path]
        local = [i - start for i in wanted if start <= i < end]
        if local:
            pf = pq.ParquetFile(path)
            rg_start = 0
            for rg in range(pf.num_row_groups):
                rg_rows = pf.metadata.row_group(rg).num_rows
                hits = [i - rg_start for i in local if rg_start <= i < rg_start + rg_rows]
                if hits:
                    group = pf.read_row_group(rg, columns=_EXAMPLE_COLUMNS)
                    out += group.take(pa.array(hits)).to_pylist()
                rg_start += rg_rows
        start = end
    return out


# --------------------------------------------------------------------------- counts


@dataclass
class SplitCounts:
    """One line of the card's split table: the manifest's counts, the data's where it has none."""

    split: str
    counts: dict[str, int | None]  # SPLIT_COUNT_KEYS
    shards: int


def split_counts(
    stats: BuildStats, manifest_by_split: Mapping[str, Any]
) -> tuple[list[SplitCounts], list[str]]:
    """Counts per split (data splits first, then manifest-only ones) and their disagreements."""
    lines: list[SplitCounts] = []
    mismatches: list[str] = []
    for split in dict.fromkeys([*stats.files, *manifest_by_split]):
        recorded = manifest_by_split.get(split) or {}
        scanned = stats.splits.get(split)
        counts: dict[str, int | None] = {}
        for key in SPLIT_COUNT_KEYS:
            data_value = getattr(scanned, key) if scanned else None
            counts[key] = recorded.get(key, data_value)
            if data_value is not None and key in recorded and recorded[key] != data_value:
                mismatches.append(f"{split}.{key}: manifest {recorded[key]}, data {data_value}")
        lines.append(SplitCounts(split, counts, len(stats.files.get(split, []))))
    return lines, mismatches


def build_totals(stats: BuildStats, totals: Mapping[str, Any]) -> dict[str, int | None]:
    """The manifest's totals, else summed over the splits (splits share no images)."""
    return {
        key: totals.get(key, sum(getattr(s, key) for s in stats.splits.values()))
        for key in SPLIT_COUNT_KEYS
    }


def rejects_by_stage_reason(
    stages: Mapping[str, Any], out: Path
) -> tuple[list[tuple[str, str, int]], str]:
    """Rejects by (stage, reason) and where they were counted: the manifest, else ``rejects/``.

    The manifest's rows keep stage order and list each stage's reasons by count; the ones
    counted from the files are sorted by count.
    """
    found: list[tuple[str, str, int]] = []
    for name, counts in stages.items():
        by_reason = counts.get("rejects_by_reason") if isinstance(counts, Mapping) else None
        for reason, n in sorted((by_reason or {}).items(), key=lambda kv: (-kv[1], kv[0])):
            found.append((name, reason, n))
    if found:
        return found, "manifest"
    rejects_dir = out / "rejects"
    files = sorted(rejects_dir.glob("*.parquet")) if rejects_dir.is_dir() else []
    counted: Counter[tuple[str, str]] = Counter()
    for f in files:
        t = pq.read_table(f, columns=["stage", "reason"])
        counted.update(zip(t["stage"].to_pylist(), t["reason"].to_pylist(), strict=True))
    ordered = sorted(counted.items(), key=lambda kv: -kv[1])
    return [(stage, reason, n) for (stage, reason), n in ordered], "rejects/"


# --------------------------------------------------------------------------- edits

_EDIT_COLUMNS = ["image_id", "caption_source", "caption", "parent_id", "edit"]


@dataclass
class EditExample:
    """One edited image of the card's before/after grid."""

    parent_image_id: str
    image_id: str
    attribute: str
    original: str | None
    target: str
    before: bytes | None = None
    after: bytes | None = None


@dataclass
class EditSummary:
    """Edited images and captions per (region, method, mask backend), and a few examples."""

    counts: list[tuple[str, str, str, int, int]]  # region, method, mask, images, captions
    examples: list[EditExample]

    @property
    def images(self) -> int:
        return sum(c[3] for c in self.counts)


def _read_edit_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        if "edit" not in pq.ParquetFile(path).schema_arrow.names:
            continue
        edits = [("caption_source", "=", "edit")]
        table = pq.read_table(path, columns=_EDIT_COLUMNS, filters=edits)
        rows += table.to_pylist()
    return rows


def _image_bytes(paths: Sequence[Path], image_ids: set[str]) -> dict[str, bytes]:
    """The bytes of ``image_ids`` (first row of each), reading only their rows' image cells."""
    found: dict[str, bytes] = {}
    if not image_ids:
        return found
    for path in paths:
        wanted = sorted(image_ids - set(found))
        if not wanted:
            break
        table = pq.read_table(
            path, columns=["image_id", "image"], filters=[("image_id", "in", wanted)]
        )
        for image_id, image in zip(
            table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True
        ):
            if image_id not in found and image and image.get("bytes"):
                found[image_id] = image["bytes"]
    return found


def edit_summary(stats: BuildStats, n_examples: int) -> EditSummary:
    """What the edit stage added to the build: counts over every split, and ``n_examples``
    evenly spaced edited images (with their parents' bytes) of the first split that has edits.
    Edits never cross splits, so a parent is looked up in its edit's split only."""
    images: dict[tuple[str, str, str], set[str]] = {}
    captions: Counter[tuple[str, str, str]] = Counter()
    example_split: list[dict[str, Any]] | None = None
    example_paths: Sequence[Path] = ()
    for paths in stats.files.values():
        rows = _read_edit_rows(paths)
        for row in rows:
            edit = row.get("edit") or {}
            region = str(edit.get("attribute") or "?").rsplit("_", 1)[0]
            key = (region, str(edit.get("method") or "?"), str(edit.get("mask") or "?"))
            images.setdefault(key, set()).add(row["image_id"])
            captions[key] += 1
        if rows and example_split is None:
            example_split, example_paths = rows, paths
    lines = [(*key, len(ids), captions[key]) for key, ids in sorted(images.items())]
    examples: list[EditExample] = []
    if example_split and n_examples > 0:
        first: dict[str, dict[str, Any]] = {}
        for row in sorted(example_split, key=lambda r: r["image_id"]):
            if row.get("edit"):  # an edit row without its struct has no parent to show
                first.setdefault(row["image_id"], row)
        ids = sorted(first)
        n = min(n_examples, len(ids))
        for k in [] if n == 0 else sorted({(j * len(ids)) // n for j in range(n)}):
            edit = first[ids[k]]["edit"]
            examples.append(
                EditExample(
                    edit["parent_image_id"],
                    ids[k],
                    edit["attribute"],
                    edit.get("original"),
                    edit["target"],
                )
            )
        wanted = {e.image_id for e in examples} | {e.parent_image_id for e in examples}
        data = _image_bytes(example_paths, wanted)
        for e in examples:
            e.before, e.after = data.get(e.parent_image_id), data.get(e.image_id)
    return EditSummary(lines, examples)
