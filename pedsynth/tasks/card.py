"""The dataset card (``OUT/README.md``) of a finished build, with plots and example rows.

The card is what a person reads before using the data and what ``datasets.load_dataset``
reads to find the splits, so its front matter lists the shards per split and declares the
``image`` column as an HF ``Image`` feature (plain Parquet would load it as a dict).

Counts come from the manifest, which the flow keeps while it runs; the Parquet files are
read only for what nothing else records (caption statistics, identity histograms, the
example rows), and only the columns that need: images are read for the example rows alone.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pedsynth.schemas.tables import CAPTION_SOURCES, PAIRS_SCHEMA, SPLITS

HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
"""pedsynth split -> the name ``datasets`` uses (it knows ``validation``, not ``val``)."""

TAGS = ["person-retrieval", "text-to-image-retrieval", "pedsynth"]
TASK_CATEGORIES = ["text-to-image", "image-to-text"]
DEFAULT_CARD_EXAMPLES = 4
THUMBNAIL_SIZE = (128, 256)  # (width, height) bound; pedestrian crops are tall
PLOT_DPI = 100

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")
_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")
_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


# --------------------------------------------------------------------------- captions


def caption_words(caption: str) -> list[str]:
    """Lower-cased words without punctuation, so "Man," and "man" count as one type."""
    return _WORD_RE.findall(caption.lower())


@dataclass
class _Diversity:
    """Caption statistics gathered batch by batch, so no split is held in memory whole."""

    lengths: list[int] = field(default_factory=list)
    chars: int = 0
    openings: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)
    tokens: int = 0
    templates: set[str] = field(default_factory=set)  # template ids of template-guided captions

    def add(self, caption: str, template_id: str | None = None) -> None:
        if template_id:
            self.templates.add(template_id)
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
    acc = _Diversity()
    for caption in captions:
        if caption is not None:
            acc.add(caption)
    return acc.summary()


# --------------------------------------------------------------------------- reading


def _split_files(out: Path) -> dict[str, list[Path]]:
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


def _num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


@dataclass
class _SplitStats:
    pairs: int
    images: int
    identities: int
    images_per_identity: list[int]
    captions_per_identity: list[int]


_SCAN_COLUMNS = ["person_id", "image_id", "caption", "caption_source", "template_id"]
# MLLM captions are reported apart by instruction: static vs template-guided (MLLM4Text-ReID).
_SOURCE_ORDER = ("original", "mllm (static)", "mllm (template)", *CAPTION_SOURCES[1:])


def _diversity_key(source: str | None, template_id: str | None) -> str:
    if source == "mllm":
        return "mllm (template)" if template_id else "mllm (static)"
    return source or "unknown"


def _scan_split(
    paths: Sequence[Path], diversity: dict[str, _Diversity], all_captions: _Diversity
) -> _SplitStats:
    """Identity counts of one split, feeding its captions into the per-source statistics.

    Reads the four light columns batch by batch; only the (person_id, image_id) columns are
    kept until the end, as Arrow arrays, to count distinct images per identity.
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
                    diversity.setdefault(_diversity_key(src, tid), _Diversity()).add(cap, tid)
                    all_captions.add(cap, tid)
    if pairs == 0:
        return _SplitStats(0, 0, 0, [], [])
    images = pa.concat_tables(ids).group_by(["person_id", "image_id"]).aggregate([])
    per_id = images.group_by("person_id").aggregate([("image_id", "count")])
    return _SplitStats(
        pairs=pairs,
        images=images.num_rows,
        identities=per_id.num_rows,
        images_per_identity=per_id["image_id_count"].to_pylist(),
        captions_per_identity=[caps_per_id[p] for p in per_id["person_id"].to_pylist()],
    )


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the card is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Md(str):
    """A table cell that is Markdown already (a link, a code span): not escaped again."""


def _code(value: object) -> _Md:
    """A code span for a table cell; only ``|`` needs escaping there (GFM splits cells first)."""
    text = re.sub(r"\s+", " ", str(value)).replace("`", "'").replace("|", "\\|")
    return _Md(f"`{text}`")


def md_escape(value: object) -> str:
    """Text safe inside a Markdown table cell: no raw ``|``, newlines or HTML tags."""
    if isinstance(value, _Md):
        return value
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;")
    text = text.replace(">", "&gt;").replace("|", "\\|")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` is one letter per column (``l``/``r``), left by default."""
    esc = md_escape
    align = align.ljust(len(header), "l")
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    """Counts with thousands separators, ratios with 3 decimals, missing as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _size_category(n: int) -> str:
    for bound, label in _SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>1B"


def _hf_dtype(t: pa.DataType) -> dict[str, Any]:
    """One PAIRS_SCHEMA type as a ``dataset_info.features`` YAML entry (minus the name)."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_hf_dtype(f.type)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _hf_dtype(t.value_type)
        # ``sequence`` is read by both old (<4) and new ``datasets`` releases.
        return {"sequence": inner["dtype"] if set(inner) == {"dtype"} else inner}
    names = {"float": "float32", "double": "float64", "halffloat": "float16", "bool": "bool"}
    return {"dtype": names.get(str(t), str(t))}


def _features_yaml() -> list[dict[str, Any]]:
    """PAIRS_SCHEMA as HF features, with ``image`` decoded to a PIL image by ``datasets``."""
    out = []
    for f in PAIRS_SCHEMA:
        entry = {"dtype": "image"} if f.name == "image" else _hf_dtype(f.type)
        out.append({"name": f.name, **entry})
    return out


def _data_files(files: dict[str, list[Path]], rows: dict[Path, int]) -> list[dict[str, Any]]:
    """``configs[0].data_files``: a glob per split, or the non-empty shards when some are empty.

    ``datasets`` fails on a shard with a 0-row row group, so empty shards are left out and
    a split with no rows at all is not listed.
    """
    entries = []
    for split, paths in files.items():
        full = [p for p in paths if rows[p] > 0]
        if not full:
            continue
        hf = HF_SPLIT_NAMES.get(split, split)
        if len(full) == len(paths):
            entries.append({"split": hf, "path": f"data/{split}-*"})
        else:
            entries.append({"split": hf, "path": [f"data/{p.name}" for p in full]})
    return entries


def _front_matter(manifest: Mapping[str, Any], data_files: list[dict[str, Any]], pairs: int) -> str:
    meta: dict[str, Any] = {
        "pretty_name": str(manifest.get("name") or "pedsynth"),
        "task_categories": TASK_CATEGORIES,
        "tags": TAGS,
        "size_categories": [_size_category(pairs)],
    }
    if data_files:
        meta["configs"] = [{"config_name": "default", "data_files": data_files}]
        meta["dataset_info"] = {"config_name": "default", "features": _features_yaml()}
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{body}---\n"


# --------------------------------------------------------------------------- plots


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    _atomic_write(path, buf.getvalue())


def _hist_plot(
    path: Path, series: Mapping[str, Sequence[int]], title: str, xlabel: str, ylabel: str
) -> None:
    """Step histograms of integer values, one per series, sharing integer-aligned bins.

    Uses a bare ``Figure`` on the Agg canvas: no pyplot state, safe in worker threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [v for vs in series.values() for v in vs]
    if values:
        lo, hi = min(values), max(values)
        step = max(1, (hi - lo + 1) // 40)  # at most ~40 bins
        bins = [lo - 0.5 + step * k for k in range((hi - lo) // step + 2)]
        for label, vs in series.items():
            if vs:
                ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=f"{label} ({len(vs)})")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save_figure(fig, path)


# --------------------------------------------------------------------------- examples


def _example_rows(paths: list[Path], rows: dict[Path, int], n: int) -> list[dict[str, Any]]:
    """``n`` evenly spaced rows of one split, reading only their row groups' needed columns."""
    total = sum(rows[p] for p in paths)
    if n <= 0 or total == 0:
        return []
    n = min(n, total)
    wanted = sorted({(k * total) // n for k in range(n)})
    columns = ["pair_id", "image_id", "person_id", "image", "caption", "caption_source"]
    out: list[dict[str, Any]] = []
    start = 0
    for path in paths:
        end = start + rows[path]
        local = [i - start for i in wanted if start <= i < end]
        if local:
            pf = pq.ParquetFile(path)
            rg_start = 0
            for rg in range(pf.num_row_groups):
                rg_rows = pf.metadata.row_group(rg).num_rows
                hits = [i - rg_start for i in local if rg_start <= i < rg_start + rg_rows]
                if hits:
                    group = pf.read_row_group(rg, columns=columns)
                    out += group.take(pa.array(hits)).to_pylist()
                rg_start += rg_rows
        start = end
    return out


def _thumbnail(image: Mapping[str, Any] | None, path: Path) -> bool:
    """Save a small JPEG of a pairs-table image cell; False if it cannot be decoded."""
    from PIL import Image

    data = (image or {}).get("bytes")
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail(THUMBNAIL_SIZE)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    _atomic_write(path, buf.getvalue())
    return True


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "x"


# --------------------------------------------------------------------------- the card


def _source_rows(config: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for s in config.get("sources") or []:
        if isinstance(s, Mapping):
            label = s.get("name") or s.get("format") or "?"
            split = s.get("split", "") if s.get("format") == "folder" else "from annotations"
            rows.append([label, s.get("format", "—"), _code(s.get("path", "")), split])
        else:
            rows.append([str(s), "—", "—", ""])
    return rows


def _stage_rows(stages: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, counts in stages.items():
        c = counts if isinstance(counts, Mapping) else {}
        rows.append(
            [name, _fmt(c.get("rows_in")), _fmt(c.get("rows_out")), _fmt(c.get("rejected"))]
        )
    return rows


def _reject_rows(stages: Mapping[str, Any], out: Path) -> tuple[list[list[str]], str]:
    """Rejects by (stage, reason): from the manifest, else counted in ``OUT/rejects``."""
    rows = []
    for name, counts in stages.items():
        by_reason = counts.get("rejects_by_reason") if isinstance(counts, Mapping) else None
        for reason, n in sorted((by_reason or {}).items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append([name, reason, _fmt(n)])
    if rows:
        return rows, "manifest"
    rejects_dir = out / "rejects"
    files = sorted(rejects_dir.glob("*.parquet")) if rejects_dir.is_dir() else []
    counts: Counter[tuple[str, str]] = Counter()
    for f in files:
        t = pq.read_table(f, columns=["stage", "reason"])
        counts.update(zip(t["stage"].to_pylist(), t["reason"].to_pylist(), strict=True))
    rows = [[s, r, _fmt(n)] for (s, r), n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return rows, "rejects/"


def _py(text: str) -> str:
    """A Python string literal in double quotes, as ruff-formatted code would have it."""
    return json.dumps(text, ensure_ascii=False)


def _how_to_load(out: Path, files: dict[str, list[Path]], hf_splits: list[str]) -> str:
    root = str(out.resolve())
    first = next(iter(files), "train")
    split_list = ", ".join(hf_splits) or "(none)"
    return f"""## How to load

With `datasets` (the front matter above names the splits: {split_list}; `image` decodes to a
PIL image):

```python
from datasets import load_dataset

ds = load_dataset({_py(root)})
row = ds[{_py(HF_SPLIT_NAMES.get(first, first))}][0]
row["image"], row["caption"], row["person_id"]
```

With pandas (read the columns you need; `image` holds the encoded bytes):

```python
from pathlib import Path

import pandas as pd

root = Path({_py(root)})
df = pd.concat(
    pd.read_parquet(p, columns=["person_id", "image_id", "caption", "caption_source"])
    for p in sorted(root.glob("data/{first}-*.parquet"))
)
```

With `pyarrow.dataset` (one dataset over all shards, filtered by split):

```python
import pyarrow.dataset as pads

dset = pads.dataset({_py(root + "/data")}, format="parquet")
table = dset.to_table(
    columns=["pair_id", "person_id", "caption"], filter=pads.field("split") == {_py(first)}
)
```
"""


def write_dataset_card(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``OUT/README.md`` and its plots/thumbnails under ``OUT/card/``; return the path.

    Works on partial builds: absent splits, an absent ``rejects/`` and 0-row splits are fine.
    """
    out = Path(out_dir)
    card_dir = out / "card"
    examples_dir = card_dir / "examples"
    config = manifest.get("config") or {}
    totals = manifest.get("totals") or {}
    by_split_manifest = totals.get("by_split") or {}
    stages = manifest.get("stages") or {}

    files = _split_files(out)
    rows = {p: _num_rows(p) for ps in files.values() for p in ps}

    # One pass over the light columns of each split: identity stats and caption stats.
    split_stats: dict[str, _SplitStats] = {}
    diversity: dict[str, _Diversity] = {}
    all_captions = _Diversity()
    for split, paths in files.items():
        split_stats[split] = _scan_split(paths, diversity, all_captions)

    # Plots.
    card_dir.mkdir(parents=True, exist_ok=True)
    ordered_sources = [s for s in _SOURCE_ORDER if s in diversity] + sorted(
        s for s in diversity if s not in _SOURCE_ORDER
    )
    _hist_plot(
        card_dir / "caption_length.png",
        {s: diversity[s].lengths for s in ordered_sources},
        "Caption length by caption source",
        "words per caption",
        "captions",
    )
    _hist_plot(
        card_dir / "images_per_identity.png",
        {HF_SPLIT_NAMES.get(s, s): st.images_per_identity for s, st in split_stats.items()},
        "Images per identity",
        "images",
        "identities",
    )
    _hist_plot(
        card_dir / "captions_per_identity.png",
        {HF_SPLIT_NAMES.get(s, s): st.captions_per_identity for s, st in split_stats.items()},
        "Captions per identity",
        "captions",
        "identities",
    )

    # Example rows: evenly spaced from train, else the first split with rows.
    n_examples = int((config.get("write") or {}).get("card_examples", DEFAULT_CARD_EXAMPLES))
    example_split = next(
        (s for s in ["train", *files] if s in files and sum(rows[p] for p in files[s])), None
    )
    examples = _example_rows(files[example_split], rows, n_examples) if example_split else []
    written: set[Path] = set()
    example_rows = []
    for k, ex in enumerate(examples):
        stem = _safe_name(str(ex["image_id"])).removesuffix(".jpg")
        thumb = examples_dir / f"{k:02d}-{stem}.jpg"
        cell = "(not decodable)"
        if _thumbnail(ex.get("image"), thumb):
            written.add(thumb)
            cell = _Md(f"![{_safe_name(str(ex['image_id']))}](card/examples/{thumb.name})")
        example_rows.append([cell, ex["person_id"], ex["caption_source"], ex["caption"]])
    if examples_dir.is_dir():  # thumbnails of an earlier run that this card no longer shows
        for old in examples_dir.glob("*.jpg"):
            if old not in written:
                old.unlink(missing_ok=True)

    # Counts per split: the manifest's, the data's where the manifest has none.
    count_rows = []
    mismatches = []
    split_names = list(dict.fromkeys([*files, *by_split_manifest]))
    for split in split_names:
        m = by_split_manifest.get(split) or {}
        d = split_stats.get(split)
        vals = []
        for key in ("pairs", "images", "identities"):
            data_val = getattr(d, key) if d else None
            val = m.get(key, data_val)
            if data_val is not None and key in m and m[key] != data_val:
                mismatches.append(f"{split}.{key}: manifest {m[key]}, data {data_val}")
            vals.append(_fmt(val))
        n_shards = len(files.get(split, []))
        count_rows.append([HF_SPLIT_NAMES.get(split, split), *vals, _fmt(n_shards)])
    # Summed over splits when the manifest has no totals (splits share no images).
    total_pairs = totals.get("pairs", sum(st.pairs for st in split_stats.values()))
    total_images = totals.get("images", sum(st.images for st in split_stats.values()))
    total_ids = totals.get("identities", sum(st.identities for st in split_stats.values()))
    count_rows.append(
        [
            "**total**",
            _fmt(total_pairs),
            _fmt(total_images),
            _fmt(total_ids),
            _fmt(sum(len(ps) for ps in files.values())),
        ]
    )

    data_files = _data_files(files, rows)
    hf_splits = [e["split"] for e in data_files]
    name = str(manifest.get("name") or "pedsynth")

    parts = [_front_matter(manifest, data_files, int(total_pairs or 0))]
    parts.append(f"# {name}\n")
    rejects_note = (
        f" The build rejected {_fmt(totals.get('rejects'))} rows"
        + (", listed under `rejects/`." if (out / "rejects").is_dir() else ".")
        if totals.get("rejects") is not None
        else ""
    )
    parts.append(
        f"**{name}** is a text-based person retrieval dataset built by pedsynth "
        f"(code version `{manifest.get('code_version', '?')}`, pairs schema "
        f"`{manifest.get('schema_version', '?')}`) on {manifest.get('created', '?')}. "
        f"Each row is one (image, caption) pair of a person identity: "
        f"{_fmt(total_pairs)} pairs of {_fmt(total_images)} images and "
        f"{_fmt(total_ids)} identities, in Parquet shards under `data/`."
        f"{rejects_note}\n"
    )
    parts.append("## Sources\n")
    src_rows = _source_rows(config)
    parts.append(
        _table(["name", "format", "path", "split"], src_rows) + "\n" if src_rows else "None.\n"
    )
    parts.append("## Splits\n")
    parts.append(_table(["split", "pairs", "images", "identities", "shards"], count_rows, "lrrrr"))
    parts.append("")
    empty = [HF_SPLIT_NAMES.get(s, s) for s, ps in files.items() if not any(rows[p] for p in ps)]
    if empty:
        parts.append(f"Empty splits, not listed for `datasets`: {', '.join(empty)}.\n")
    if mismatches:
        parts.append("**Warning:** the manifest and the data disagree: " + "; ".join(mismatches))
        parts.append("")
    parts.append("## Pipeline stages\n")
    parts.append(
        _table(["stage", "rows in", "rows out", "rejected"], _stage_rows(stages), "lrrr") + "\n"
        if stages
        else "No stage counts recorded.\n"
    )
    reject_rows, reject_origin = _reject_rows(stages, out)
    parts.append("### Rejects by reason\n")
    if reject_rows:
        parts.append(_table(["stage", "reason", "count"], reject_rows, "llr"))
        parts.append(f"\n(counted from {reject_origin})\n")
    else:
        parts.append("No rejected rows.\n")

    parts.append("## Captions\n")
    if ordered_sources:
        stat_rows = []
        for label, acc in [
            *((s, diversity[s]) for s in ordered_sources),
            ("**all**", all_captions),
        ]:
            st = acc.summary()
            stat_rows.append(
                [
                    label,
                    _fmt(st["count"]),
                    f"{st['mean_words']:.1f}",
                    f"{st['median_words']:.1f}",
                    f"{st['mean_chars']:.1f}",
                    _fmt(st["distinct_openings"]),
                    _fmt(st["type_token_ratio"]),
                    _fmt(len(acc.templates)) if acc.templates else "—",
                ]
            )
        parts.append(
            _table(
                [
                    "caption_source",
                    "captions",
                    "mean words",
                    "median words",
                    "mean chars",
                    "distinct openings",
                    "type/token",
                    "templates used",
                ],
                stat_rows,
                "lrrrrrrr",
            )
        )
        parts.append(
            "\n*distinct openings*: distinct first-three-word openings per caption; "
            "*type/token*: distinct words over all words (lower-cased, punctuation dropped); "
            "*mllm (static)* / *mllm (template)*: MLLM captions from the static instruction / "
            "from a sentence-pattern template; *templates used*: distinct templates.\n"
        )
    else:
        parts.append("No captions.\n")
    parts.append("![Caption length by caption source](card/caption_length.png)\n")
    parts.append("## Identities\n")
    parts.append("![Images per identity](card/images_per_identity.png)\n")
    parts.append("![Captions per identity](card/captions_per_identity.png)\n")

    parts.append("## Examples\n")
    if example_rows:
        hf_example = HF_SPLIT_NAMES.get(example_split or "", example_split)
        parts.append(f"Evenly spaced rows of the {hf_example} split.\n")
        header = ["image", "person_id", "caption_source", "caption"]
        parts.append(_table(header, example_rows) + "\n")
    else:
        parts.append("No examples.\n")

    parts.append(_how_to_load(out, files, hf_splits))
    parts.append("## Columns\n")
    parts.append(
        f"Pairs schema version `{PAIRS_SCHEMA.metadata[b'pedsynth.schema_version'].decode()}`.\n"
    )
    parts.append(
        _table(
            ["column", "type", "nullable"],
            [[_code(f.name), _code(f.type), "yes" if f.nullable else "no"] for f in PAIRS_SCHEMA],
        )
        + "\n"
    )

    readme = out / "README.md"
    _atomic_write(readme, "\n".join(parts).encode("utf-8"))
    return readme
