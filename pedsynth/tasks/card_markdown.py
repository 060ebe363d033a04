"""The dataset card's text: Hugging Face front matter and the Markdown sections.

The front matter is what ``datasets.load_dataset`` reads to find the splits, so it lists the
shards per split and declares the ``image`` column as an HF ``Image`` feature (plain Parquet
would load it as a dict). Every section is a pure function of the manifest and the statistics
of :mod:`pedsynth.tasks.card_stats`; table cells are escaped here and nowhere else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from pedsynth.schemas.tables import PAIRS_SCHEMA
from pedsynth.tasks.card_stats import SPLIT_COUNT_KEYS, BuildStats, SplitCounts
from pedsynth.tasks.image_metadata import policy_note

HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
"""pedsynth split -> the name ``datasets`` uses (it knows ``validation``, not ``val``)."""

TAGS = ["person-retrieval", "text-to-image-retrieval", "pedsynth"]
TASK_CATEGORIES = ["text-to-image", "image-to-text"]
STAGE_COLUMNS = [
    "stage",
    "rows in",
    "rows out",
    "rejected",
    "shards",
    "reused",
    "time",
    "rows/s",
    "tokens (prompt / completion)",
    "tokens/s",
]
MISSING = "—"

_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


def hf_split(split: str) -> str:
    return HF_SPLIT_NAMES.get(split, split)


# --------------------------------------------------------------------------- cells


class Md(str):
    """A table cell that is Markdown already (a link, a code span): not escaped again."""


def code(value: object) -> Md:
    """A code span for a table cell; only ``|`` needs escaping there (GFM splits cells first)."""
    text = re.sub(r"\s+", " ", str(value)).replace("`", "'").replace("|", "\\|")
    return Md(f"`{text}`")


def md_escape(value: object) -> str:
    """Text safe inside a Markdown table cell: no raw ``|``, newlines or HTML tags."""
    if isinstance(value, Md):
        return value
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;")
    text = text.replace(">", "&gt;").replace("|", "\\|")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` is one letter per column (``l``/``r``), left by default."""
    align = align.ljust(len(header), "l")
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    """Counts with thousands separators, ratios with 3 decimals, missing as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_seconds(seconds: float | None) -> str:
    """Wall time as a person reads it: ``4.2 s``, ``3 min 05 s``, ``2 h 03 min``."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def fmt_rate(rows_per_s: float | None) -> str:
    if rows_per_s is None:
        return MISSING
    return f"{rows_per_s:,.0f}" if rows_per_s >= 100 else f"{rows_per_s:.1f}"


# --------------------------------------------------------------------------- front matter


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


def data_files(stats: BuildStats) -> list[dict[str, Any]]:
    """``configs[0].data_files``: a glob per split, or the non-empty shards when some are empty.

    ``datasets`` fails on a shard with a 0-row row group, so empty shards are left out and
    a split with no rows at all is not listed.
    """
    entries = []
    for split, paths in stats.files.items():
        full = [p for p in paths if stats.rows[p] > 0]
        if not full:
            continue
        if len(full) == len(paths):
            entries.append({"split": hf_split(split), "path": f"data/{split}-*"})
        else:
            entries.append({"split": hf_split(split), "path": [f"data/{p.name}" for p in full]})
    return entries


def front_matter(name: str, files: list[dict[str, Any]], pairs: int) -> str:
    meta: dict[str, Any] = {
        "pretty_name": name,
        "task_categories": TASK_CATEGORIES,
        "tags": TAGS,
        "size_categories": [_size_category(pairs)],
    }
    if files:
        meta["configs"] = [{"config_name": "default", "data_files": files}]
        meta["dataset_info"] = {"config_name": "default", "features": _features_yaml()}
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{body}---\n"


# --------------------------------------------------------------------------- sections


def sources_section(config: Mapping[str, Any]) -> str:
    rows = []
    for s in config.get("sources") or []:
        if isinstance(s, Mapping):
            label = s.get("name") or s.get("format") or "?"
            split = s.get("split", "") if s.get("format") == "folder" else "from annotations"
            rows.append([label, s.get("format", MISSING), code(s.get("path", "")), split])
        else:
            rows.append([str(s), MISSING, MISSING, ""])
    body = table(["name", "format", "path", "split"], rows) if rows else "None."
    note = policy_note(config.get("ingest") or {})
    return f"## Sources\n\n{body}\n" + (f"\n{note}\n" if note else "")


def splits_section(
    stats: BuildStats, lines: list[SplitCounts], totals: Mapping[str, Any], mismatches: list[str]
) -> str:
    """The split table (one line per split and a total) and notes on empty or odd splits."""
    rows = [
        [hf_split(line.split), *(fmt(line.counts[k]) for k in SPLIT_COUNT_KEYS), fmt(line.shards)]
        for line in lines
    ]
    all_shards = sum(line.shards for line in lines)
    rows.append(["**total**", *(fmt(totals[k]) for k in SPLIT_COUNT_KEYS), fmt(all_shards)])
    parts = ["## Splits\n", table(["split", *SPLIT_COUNT_KEYS, "shards"], rows, "lrrrr"), ""]
    empty = [hf_split(s) for s in stats.files if not stats.split_rows(s)]
    if empty:
        parts.append(f"Empty splits, not listed for `datasets`: {', '.join(empty)}.\n")
    if mismatches:
        parts.append("**Warning:** the manifest and the data disagree: " + "; ".join(mismatches))
        parts.append("")
    return "\n".join(parts)


def changes_section(changes: Mapping[str, Any] | None) -> str:
    """What this version changed since the one ``latest`` named before it (the manifest's
    ``changes``): pairs by split, and which stages computed again."""
    if not changes:
        return ""
    previous = changes.get("previous")
    if previous is None:
        return "## What changed\n\nThe first version of this output.\n"
    split_rows = [
        [hf_split(split), *(fmt(c.get(k, 0)) for k in ("added", "removed", "kept", "changed"))]
        for split, c in (changes.get("splits") or {}).items()
    ]
    stage_rows = [
        [name, fmt(c.get("reused", 0)), fmt(c.get("recomputed", 0))]
        for name, c in (changes.get("stages") or {}).items()
    ]
    parts = [
        "## What changed\n",
        f"Since version {code(previous)}; pairs matched by `pair_id` (*changed*: kept, "
        "with another caption).\n",
        table(["split", "added", "removed", "kept", "changed"], split_rows, "lrrrr"),
        "",
    ]
    if stage_rows:
        parts += [
            "Shards per stage, reused from the shared work cache or computed again:\n",
            table(["stage", "reused", "recomputed"], stage_rows, "lrr"),
            "",
        ]
    return "\n".join(parts)


def _stage_row(name: str, counts: object) -> list[str]:
    c: Mapping[str, Any] = counts if isinstance(counts, Mapping) else {}
    return [
        name,
        fmt(c.get("rows_in")),
        fmt(c.get("rows_out")),
        fmt(c.get("rejected")),
        fmt(c.get("shards")),
        fmt(c.get("reused")),
        fmt_seconds(c.get("seconds")),
        fmt_rate(c.get("rows_per_s")),
        fmt_tokens(c.get("prompt_tokens"), c.get("completion_tokens")),
        fmt_rate(c.get("tokens_per_s") or None),
    ]


def fmt_tokens(prompt: int | None, completion: int | None) -> str:
    """``prompt / completion`` token counts; a dash for a stage that reported none."""
    if not prompt and not completion:
        return MISSING
    return f"{fmt(prompt or 0)} / {fmt(completion or 0)}"


def stages_section(
    stages: Mapping[str, Any], rejects: list[tuple[str, str, int]], origin: str
) -> str:
    """Rows in, rows out, rejected, shards (reused), time and tokens per stage, then rejects by
    reason."""
    parts = ["## Pipeline stages\n"]
    if stages:
        rows = [_stage_row(name, counts) for name, counts in stages.items()]
        parts.append(table(STAGE_COLUMNS, rows, "lrrrrrrrrr") + "\n")
    else:
        parts.append("No stage counts recorded.\n")
    parts.append("### Rejects by reason\n")
    if rejects:
        parts.append(
            table(["stage", "reason", "count"], [[s, r, fmt(n)] for s, r, n in rejects], "llr")
        )
        parts.append(f"\n(counted from {origin})\n")
    else:
        parts.append("No rejected rows.\n")
    return "\n".join(parts)


def captions_section(stats: BuildStats) -> str:
    if not stats.by_source:
        return "## Captions\n\nNo captions.\n"
    rows = []
    for label, acc in [*stats.by_source.items(), ("**all**", stats.all_captions)]:
        st = acc.summary()
        rows.append(
            [
                label,
                fmt(st["count"]),
                f"{st['mean_words']:.1f}",
                f"{st['median_words']:.1f}",
                f"{st['mean_chars']:.1f}",
                fmt(st["distinct_openings"]),
                fmt(st["type_token_ratio"]),
                fmt(len(acc.templates)) if acc.templates else MISSING,
            ]
        )
    header = [
        "caption_source",
        "captions",
        "mean words",
        "median words",
        "mean chars",
        "distinct openings",
        "type/token",
        "templates used",
    ]
    return (
        "## Captions\n\n"
        + table(header, rows, "lrrrrrrr")
        + "\n\n*distinct openings*: distinct first-three-word openings per caption; "
        "*type/token*: distinct words over all words (lower-cased, punctuation dropped); "
        "*mllm (static)* / *mllm (template)*: MLLM captions from the static instruction / "
        "from a sentence-pattern template; *templates used*: distinct templates.\n"
        + diversity_section(stats)
    )


def diversity_section(stats: BuildStats) -> str:
    """Distinct openings, fixed-size TTR, Self-BLEU and templates per caption source
    (:mod:`pedsynth.diversity`), so MLLM captions compare with the originals."""
    rows = []
    for label, acc in [*stats.by_source.items(), ("**all**", stats.all_captions)]:
        d = acc.diversity.summary()
        ttr = f"{d['ttr']:.3f}" + ("" if d["ttr_windows"] else " (all words)")
        rows.append(
            [
                label,
                fmt(d["captions"]),
                fmt(d["distinct_openings"]),
                ttr,
                f"{d['self_bleu']:.3f}" if d["bleu_sample"] >= 2 else MISSING,
                fmt(d["templates_used"]) if d["templates_used"] else MISSING,
            ]
        )
    header = [
        "caption_source",
        "captions",
        "distinct openings",
        "TTR@1000",
        "Self-BLEU",
        "templates",
    ]
    return (
        "\n### Diversity\n\n"
        + table(header, rows, "lrrrrr")
        + "\n\n*TTR@1000*: mean type/token ratio over consecutive 1,000-word windows of a "
        "seeded sample of up to 2,000 captions (sizes compare; *(all words)* when the sample "
        "has fewer than 1,000 words); *Self-BLEU*: mean BLEU-4 of each of up to 500 sampled "
        "captions against the others (lower = more diverse; 1 = all alike); "
        "*templates*: distinct template ids (`pedsynth.diversity`).\n"
    )


def examples_section(split: str | None, rows: list[list[object]], undecodable: list[str]) -> str:
    """The example table; ``undecodable`` names the example images whose bytes did not decode."""
    if not rows:
        return "## Examples\n\nNo examples.\n"
    parts = [
        "## Examples\n",
        f"Evenly spaced rows of the {hf_split(split or '')} split.\n",
        table(["image", "person_id", "caption_source", "caption"], rows) + "\n",
    ]
    if undecodable:
        names = ", ".join(code(i) for i in undecodable)
        parts.append(
            f"**Warning:** {len(undecodable)} example image(s) could not be decoded, so the "
            f"shards hold damaged image bytes: {names}.\n"
        )
    return "\n".join(parts)


def _py(text: str) -> str:
    """A Python string literal in double quotes, as ruff-formatted code would have it."""
    return json.dumps(text, ensure_ascii=False)


def how_to_load(out: Path, stats: BuildStats, hf_splits: list[str]) -> str:
    root = str(out.resolve())
    first = next(iter(stats.files), "train")
    split_list = ", ".join(hf_splits) or "(none)"
    return f"""## How to load

With `datasets` (the front matter above names the splits: {split_list}; `image` decodes to a
PIL image):

```python
from datasets import load_dataset

ds = load_dataset({_py(root)})
row = ds[{_py(hf_split(first))}][0]
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


def columns_section() -> str:
    version = PAIRS_SCHEMA.metadata[b"pedsynth.schema_version"].decode()
    rows = [[code(f.name), code(f.type), "yes" if f.nullable else "no"] for f in PAIRS_SCHEMA]
    return (
        f"## Columns\n\nPairs schema version `{version}`.\n\n"
        + table(["column", "type", "nullable"], rows)
        + "\n"
    )


def edits_section(summary: Any, grid: str | None) -> str:
    """Edited images by region, method and mask backend (:func:`card_stats.edit_summary`),
    and the before/after grid when one was drawn; empty when the build has no edits."""
    if not summary.counts:
        return ""
    rows = [[r, m, k, fmt(n), fmt(c)] for r, m, k, n, c in summary.counts]
    parts = [
        "## Edits\n",
        f"The edit stage added {fmt(summary.images)} edited images (each a new `image_id`, "
        "`caption_source=edit`, its parent in `parent_id` and `edit.parent_image_id`). Rejected "
        "edits are under *Rejects by reason* (stage `edit`).\n",
        table(["region", "method", "mask", "edited images", "captions"], rows, "lllrr") + "\n",
    ]
    if grid:
        parts.append(f"![Before and after editing]({grid})\n")
        parts.append("Each pair: the parent image (left) and the edited image (right).\n")
    return "\n".join(parts)
