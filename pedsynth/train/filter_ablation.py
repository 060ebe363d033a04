"""The filter rows of the ablation: training data whose rewrites include single-fact errors,
unfiltered, filtered by the embedding score only (LLM-DA), and by embedding + attributes.

From a procedural benchmark: every train caption stays as an ``original`` row and gets one
``rewrite`` row written from the ground truth (:mod:`pedsynth.procedural.rewrites`): a faithful
paraphrase, or with probability ``corrupt`` the same rewrite with one fact changed (a garment
colour or type, the gender, the hair colour, the bag). The project's faithfulness filter
(:func:`pedsynth.tasks.faithfulness.judge`, MiniLM, alpha 0.6) then judges every rewrite once;
the three datasets keep all rewrites, those the embedding check keeps, and those both checks
keep. Val and test are the benchmark's own clean captions, the same in all three.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.tables import stable_id

ALPHA = 0.6
# Row label -> which rewrites the dataset keeps.
FILTER_ROWS = {
    "+rewrites (unfiltered)": "all",
    "+filter (embedding)": "embedding",
    "+filter (attribute)": "attribute",
}


def _rewrites(pairs: pa.Table, bench: Path, corrupt: float, seed: int) -> list[dict[str, Any]]:
    """One rewrite row per train caption: a paraphrase, or a single-fact corruption."""
    from pedsynth.procedural.rewrites import KINDS, Writer, mentioned
    from pedsynth.procedural.rewrites import corrupt as corrupt_facts

    attributes = json.loads((bench / "attributes.json").read_text())
    vocab, phrases = attributes["vocabulary"], attributes["phrases"]
    rng = np.random.default_rng(seed)
    rows = []
    for parent in pairs.to_pylist():
        person = attributes["identities"][str(int(parent["person_id"].rsplit(":", 1)[-1]))]
        said = mentioned(parent["caption"], person, phrases)
        kind, facts = "paraphrase", (person, said)
        if rng.random() < corrupt:
            for candidate in rng.permutation(len(KINDS)):
                changed = corrupt_facts(KINDS[candidate], person, said, rng, vocab)
                if changed is not None:
                    kind, facts = KINDS[candidate], changed
                    break
        caption = Writer(*facts, rng).write()
        rows.append(
            parent
            | {
                "pair_id": stable_id(parent["pair_id"], "rewrite", 0, caption),
                "caption": caption,
                "caption_source": "rewrite",
                "parent_id": parent["pair_id"],
                "source": f"{parent['source']}/rewrite0",
                "generator": f"procedural:{kind}",
            }
        )
    return rows


def build_filter_datasets(
    benchmark: str | Path, out: str | Path, corrupt: float, seed: int
) -> dict[str, dict[str, Any]]:
    """Write one dataset per :data:`FILTER_ROWS` label under ``out``; per label its folder and
    counts (rewrites kept, corruptions among them, paraphrases among them)."""
    from pedsynth.engines.embedder import get_embedder
    from pedsynth.schemas.text import EmbedderConfig
    from pedsynth.tasks import ingest
    from pedsynth.tasks.faithfulness import judge

    bench, out = Path(benchmark), Path(out)
    catalog, _ = ingest.read_catalog(SourceConfig(format="cuhk-pedes", path=str(bench)))
    pairs, _ = ingest.load_images(catalog, IngestConfig())
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    rewrites = _rewrites(train, bench, corrupt, seed)
    verdicts = judge(
        [r["caption"] for r in rewrites],
        train["caption"].to_pylist(),
        embedder=get_embedder(EmbedderConfig()),
        alpha=ALPHA,
        attributes=True,
    )
    keeps = {
        "all": [True] * len(rewrites),
        "embedding": [v.score >= ALPHA for v in verdicts],
        "attribute": [v.reason is None for v in verdicts],
    }
    for row, verdict in zip(rewrites, verdicts, strict=True):
        row["faithfulness"] = verdict.score
    datasets: dict[str, dict[str, Any]] = {}
    for label, rule in FILTER_ROWS.items():
        folder = out / rule
        (folder / "data").mkdir(parents=True, exist_ok=True)
        kept = [r for r, keep in zip(rewrites, keeps[rule], strict=True) if keep]
        rewritten = pa.Table.from_pylist(kept, schema=train.schema)
        tables = {"train": pa.concat_tables([train, rewritten])}
        for split in ("val", "test"):
            tables[split] = pairs.filter(pc.equal(pairs["split"], split))
        for split, table in tables.items():
            path = folder / "data" / f"{split}-00000-of-00001.parquet"
            pq.write_table(table, path, row_group_size=500)
        corrupted = sum(r["generator"] != "procedural:paraphrase" for r in kept)
        datasets[label] = {
            "data": str(folder),
            "rewrites": len(kept),
            "corrupted_rewrites": corrupted,
            "paraphrases": len(kept) - corrupted,
        }
    return datasets
