"""``pedsynth export-ranking``: RAR ranking records from the memory's index.

A tiny procedural build with the memory stage (tiny random-weight CLIP: its retrieval is poor,
so both cases occur — the true image retrieved, and the true image missed and placed by the
seeded draw) is exported; each record is checked against the build's Parquet and against the
pixels of its contact sheet: the first number of the answer is the tile that shows the
caption's own image.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pedsynth.cli import main
from pedsynth.export.ranking import export_ranking
from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.manifest import resolve_build
from pedsynth.schemas.vision import ClipModelConfig, MemoryConfig
from pedsynth.tasks import sources
from pedsynth.tasks.stages import StageContext, run_dataset_stage
from pedsynth.tasks.write import write_dataset
from pedsynth.train.engine_ranker import LABEL_BAND

K = 4
TILE = 256  # the default tile height
TINY = ClipModelConfig(model="pedsynth-tiny-clip", pretrained="random", batch_size=32)
MEMORY = MemoryConfig(clip=TINY, dedupe=False, hnsw_m=16, hard_negatives_k=3, recall_queries=8)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """Ingest → memory → write, as the flow runs them, without Prefect."""
    from pedsynth.procedural import generate

    root = tmp_path_factory.mktemp("export-ranking")
    generate(root / "bench", identities=12, images_per_identity=3, seed=3, workers=1)
    out = root / "out"
    source = SourceConfig(format="cuhk-pedes", path=str(root / "bench"))
    chunks, _ = sources.plan_chunks(source, out, 40)
    shards = [sources.ingest_chunk(c, IngestConfig(), out) for c in chunks]
    context = StageContext(out_dir=str(out), fingerprint="", shard_rows=40)
    shards = run_dataset_stage("memory", MEMORY, 0, shards, context)
    config = {"name": "tiny", "write": {"card_examples": 0, "card_plots": False}}
    write_dataset(
        out, shards, [s.rejects_path for s in shards], shard_rows=40, config=config, stages={}
    )
    return out


@pytest.fixture(scope="module")
def rows(build) -> dict[str, dict]:
    table = pq.read_table(resolve_build(build) / "data")
    return {r["pair_id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def exported(build, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ranking") / "export"
    export_ranking(build, folder, k=K, split="train", seed=11)
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tile_boxes(images: list[bytes]) -> list[tuple[int, int, int, int]]:
    """Where each candidate sits on a sheet: crops scaled to the tile height, side by side."""
    boxes, x = [], 0
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            width = max(1, round(img.width * TILE / img.height))
        boxes.append((x, LABEL_BAND, x + width, LABEL_BAND + TILE))
        x += width
    return boxes


def difference(sheet: Image.Image, box: tuple[int, int, int, int], data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as img:
        tile = img.convert("RGB").resize((box[2] - box[0], TILE))
    return float(np.abs(np.asarray(sheet.crop(box), float) - np.asarray(tile, float)).mean())


def test_every_answer_starts_with_the_tile_of_the_true_image(exported, rows):
    records = read_jsonl(exported / "ranking.jsonl")
    train_pairs = {p for p, r in rows.items() if r["split"] == "train"}
    assert sorted(r["pair_id"] for r in records) == sorted(train_pairs)
    image_of = {r["image_id"]: r["image"]["bytes"] for r in rows.values()}
    person_of = {r["image_id"]: r["person_id"] for r in rows.values()}
    for record in records:
        row = rows[record["pair_id"]]
        assert record["true_image"] == row["image_id"] and record["caption"] == row["caption"]
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and row["caption"] in human["value"]
        assert f"{K} numbered images" in human["value"]
        answer = [int(n) for n in gpt["value"].split(", ")]
        assert answer == record["answer"] and sorted(answer) == list(range(1, K + 1))
        tiles = record["candidates"]
        assert len(tiles) == len(set(tiles)) == K
        assert all(rows_split(rows, t) == "train" for t in tiles)
        assert tiles[answer[0] - 1] == row["image_id"]
        # same-person tiles right after the true one, then the rest in tile (retrieval) order
        same = [n for n in answer[1:] if person_of[tiles[n - 1]] == row["person_id"]]
        assert answer[1 : 1 + len(same)] == sorted(same)
        assert answer[1 + len(same) :] == sorted(answer[1 + len(same) :])

        sheet_path = exported / record["image"]
        with Image.open(sheet_path) as sheet:
            sheet = sheet.convert("RGB")
        crops = [image_of[t] for t in tiles]
        boxes = tile_boxes(crops)
        assert sheet.size == (boxes[-1][2], TILE + LABEL_BAND)  # exactly K tiles, in that order
        # by pixels: of all tiles, the one the answer names first is the true image
        diffs = [difference(sheet, box, image_of[row["image_id"]]) for box in boxes]
        assert diffs[answer[0] - 1] == min(diffs) and diffs[answer[0] - 1] < 6, diffs


def rows_split(rows: dict[str, dict], image_id: str) -> str:
    return next(r["split"] for r in rows.values() if r["image_id"] == image_id)


def test_true_images_the_index_missed_are_placed_by_the_seed(exported):
    records = read_jsonl(exported / "ranking.jsonl")
    missed = [r for r in records if not r["true_retrieved"]]
    found = [r for r in records if r["true_retrieved"]]
    assert missed and found  # the tiny CLIP's retrieval gives both cases
    positions = {r["answer"][0] for r in missed}
    assert len(positions) > 1  # not always the last tile
    summary = json.loads((exported / "pedsynth_export.json").read_text())
    assert summary["records"] == len(records) and summary["true_retrieved"] == len(found)
    assert json.loads((exported / "ranking.json").read_text()) == records


def test_the_same_build_and_seed_give_the_same_bytes(build, exported, tmp_path):
    again = tmp_path / "again"
    export_ranking(build, again, k=K, split="train", seed=11)
    assert (again / "ranking.jsonl").read_bytes() == (exported / "ranking.jsonl").read_bytes()
    for record in read_jsonl(exported / "ranking.jsonl")[:5]:
        assert (again / record["image"]).read_bytes() == (exported / record["image"]).read_bytes()
    other = tmp_path / "other-seed"
    export_ranking(build, other, k=K, split="train", seed=12)
    moved = [
        (a["answer"], b["answer"])
        for a, b in zip(
            read_jsonl(exported / "ranking.jsonl"), read_jsonl(other / "ranking.jsonl"), strict=True
        )
        if not a["true_retrieved"]
    ]
    assert any(a != b for a, b in moved)


def test_limit_split_and_errors_through_the_command(build, tmp_path, capsys):
    folder = tmp_path / "val"
    code = main(["export-ranking", str(build), str(folder), "--split", "test", "--limit", "3"])
    assert code == 0 and json.loads(capsys.readouterr().out)["records"] == 3
    records = read_jsonl(folder / "ranking.jsonl")
    assert len(records) == 3 and all((folder / r["image"]).is_file() for r in records)

    no_memory = tmp_path / "no-memory"
    shutil.copytree(build, no_memory, ignore=shutil.ignore_patterns("memory", "_work"))
    code = main(["export-ranking", str(no_memory), str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "memory" in err[0]
    code = main(["export-ranking", str(build), str(tmp_path / "y"), "--split", "dev"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'dev'" in err[0]
