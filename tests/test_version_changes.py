"""A second version says what changed since the first, in its manifest and its card."""

from __future__ import annotations

import json
import shutil

from pedsynth.schemas.manifest import Manifest, resolve_build
from tests.test_build import run_build


def test_the_new_version_counts_added_removed_and_changed_pairs(
    prefect_server, procedural_small, tmp_path
):
    source = tmp_path / "bench"
    shutil.copytree(procedural_small, source)
    out = tmp_path / "out"
    run_build(out, [f"cuhk-pedes:{source}"], "shard_rows=40")
    first = Manifest.load(out)
    assert first is not None and first.changes is not None and first.changes.previous is None
    assert "The first version of this output." in (resolve_build(out) / "README.md").read_text()

    annotation = source / "reid_raw.json"
    records = json.loads(annotation.read_text())
    train = [r for r in records if r["split"] == "train"]
    dropped = train[-2:]  # two train images leave the dataset
    edited = train[0]
    edited["captions"][0] = "A man in a long grey coat with a black umbrella and white shoes."
    records = [r for r in records if r not in dropped]
    annotation.write_text(json.dumps(records))
    removed = sum(len(r["captions"]) for r in dropped)

    run_build(out, [f"cuhk-pedes:{source}"], "shard_rows=40")
    second = Manifest.load(out)
    assert second is not None and second.version != first.version
    changes = second.changes
    assert changes is not None and changes.previous == first.version
    train_pairs = first.totals.by_split["train"].pairs
    got = changes.splits["train"]
    # An original caption's pair_id hashes its text: the edited one is a new pair, its old
    # text a removed one (``changed`` counts generated captions redrawn under one pair_id).
    assert (got.added, got.removed, got.kept, got.changed) == (
        1,
        removed + 1,
        train_pairs - removed - 1,
        0,
    )
    assert changes.splits["test"].changed == changes.splits["test"].removed == 0
    assert changes.stages["ingest"].recomputed > 0

    card = (resolve_build(out) / "README.md").read_text()
    section = card.split("## What changed", 1)[1].split("\n## ", 1)[0]
    assert f"Since version `{first.version}`" in section
    assert f"| train | 1 | {removed + 1} | {train_pairs - removed - 1} | 0 |" in section


def test_new_source_images_are_ingested_alone(prefect_server, procedural_small, tmp_path):
    source = tmp_path / "bench"
    shutil.copytree(procedural_small, source)
    out = tmp_path / "out"
    run_build(out, [f"cuhk-pedes:{source}"], "shard_rows=40")
    first = Manifest.load(out)
    assert first is not None

    annotation = source / "reid_raw.json"
    records = json.loads(annotation.read_text())
    template = next(r for r in records if r["split"] == "train")
    new = []
    for i in range(3):  # three new photos of a new person, appended as a dataset grows
        rel = f"train/90000/90000_{i:02d}.jpg"
        (source / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "imgs" / template["file_path"], source / "imgs" / rel)
        new.append({**template, "id": 90000, "file_path": rel})
    annotation.write_text(json.dumps(records + new))

    run_build(out, [f"cuhk-pedes:{source}"], "shard_rows=40")
    second = Manifest.load(out)
    assert second is not None and second.changes is not None
    ingest = second.changes.stages["ingest"]
    assert ingest.recomputed <= 2 < ingest.reused  # the last chunk and a new one, no more
    added = sum(len(r["captions"]) for r in new)
    assert second.changes.splits["train"].added == added
    assert second.changes.splits["train"].removed == 0
    assert second.totals.pairs == first.totals.pairs + added
