"""The memory stage (RAR) on the procedural benchmark with planted near-duplicates.

The tiny CLIP has random weights: distinct procedural images reach cosine 0.9975 with it, and a
crop that shifts the image sideways (which moves the whole 128-pixel-wide patch grid) lands in
the same range, while JPEG re-encodes (≥ 0.9998) and a crop of 1–2 rows off the bottom (≥ 0.999)
stay above (all measured). These tests therefore run at ``duplicate_threshold=0.999`` (the
default 0.97 is meant for trained CLIP weights) and plant re-encoded copies and a bottom crop.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.vision import ClipModelConfig, MemoryConfig
from pedsynth.search import search
from pedsynth.tasks import sources
from pedsynth.tasks.memory_index import MEMORY_DIR, read_memory
from pedsynth.tasks.shards import read_shard, run_shard
from pedsynth.tasks.stages import StageContext, run_dataset_stage

TINY = ClipModelConfig(model="pedsynth-tiny-clip", pretrained="random", batch_size=32)
CFG = MemoryConfig(clip=TINY, duplicate_threshold=0.999, hnsw_m=16, hard_negatives_k=5)
LABEL = "cuhk-pedes"


def run_memory(cfg: MemoryConfig, shards: list, out: Path) -> list:
    """The memory stage through the registry, as the flow runs it."""
    context = StageContext(out_dir=str(out), fingerprint="", shard_rows=50)
    return run_dataset_stage("memory", cfg, 0, shards, context)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(procedural_small, tmp_path_factory) -> dict:
    """A copy of the benchmark plus three planted copies, appended after the originals."""
    root = tmp_path_factory.mktemp("planted") / "bench"
    shutil.copytree(procedural_small, root)
    records = json.loads((root / "reid_raw.json").read_text())
    train = [r for r in records if r["split"] == "train"]
    a, b, c = train[0], train[3], train[6]
    other = next(r for r in train if r["id"] not in (a["id"], b["id"], c["id"]))
    (root / "imgs" / "planted").mkdir()
    plants = []
    for name, source, person, change in [
        ("reencoded.jpg", a, a["id"], lambda im: _jpeg(im, 60)),
        ("cropped.jpg", b, b["id"], lambda im: _jpeg(im.crop((0, 0, im.width, im.height - 2)), 95)),
        ("relabelled.jpg", c, other["id"], lambda im: _jpeg(im, 75)),
    ]:  # fmt: skip
        with Image.open(root / "imgs" / source["file_path"]) as im:
            (root / "imgs" / "planted" / name).write_bytes(change(im.convert("RGB")))
        rel = f"planted/{name}"
        records.append(
            {"split": "train", "captions": [f"planted copy {name}"], "file_path": rel,
             "id": person}
        )  # fmt: skip
        plants.append((f"{LABEL}:{rel}", f"{LABEL}:{source['file_path']}"))
    (root / "reid_raw.json").write_text(json.dumps(records))
    return {"root": root, "plants": plants, "images": len(records)}


@pytest.fixture(scope="module")
def built(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory-out")
    chunks, _ = sources.plan_chunks(
        SourceConfig(format="cuhk-pedes", path=str(planted["root"])), out, 50
    )
    shards = [sources.ingest_chunk(c, IngestConfig(), out) for c in chunks]
    results = run_memory(CFG, shards, out)
    return {"out": out, "shards": shards, "results": results}


def _all(results, rejects: bool = False):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(r.rejects_path if rejects else r.path) for r in results])


def test_planted_near_duplicates_are_found(built, planted):
    (reencoded, kept_a), (cropped, kept_b), (relabelled, source_c) = planted["plants"]
    meta = read_memory(built["out"])
    removed = {d["image_id"]: d for d in meta["near_duplicates"]}
    assert set(removed) == {reencoded, cropped}, meta["near_duplicates"]
    assert removed[reencoded]["kept_image_id"] == kept_a
    assert removed[cropped]["kept_image_id"] == kept_b
    assert all(d["similarity"] >= CFG.duplicate_threshold for d in removed.values())

    rejects = _all(built["results"], rejects=True)
    assert set(rejects.column("reason").to_pylist()) == {"near_duplicate"}
    assert sorted(rejects.column("image_id").to_pylist()) == sorted([reencoded, cropped])
    details = dict(
        zip(
            rejects.column("image_id").to_pylist(),
            rejects.column("detail").to_pylist(),
            strict=False,
        )
    )
    assert kept_a in details[reencoded] and "cosine" in details[reencoded]

    kept_images = set(_all(built["results"]).column("image_id").to_pylist())
    assert {kept_a, kept_b, relabelled, source_c} <= kept_images  # cross-identity: both kept
    assert not kept_images & {reencoded, cropped}
    assert len(kept_images) == planted["images"] - 2


def test_cross_identity_duplicates_are_flagged_not_merged(built, planted):
    _, _, (relabelled, source_c) = planted["plants"]
    cross = read_memory(built["out"])["cross_identity_duplicates"]
    assert len(cross) == 1
    pair = {cross[0]["image_id"], cross[0]["other_image_id"]}
    assert pair == {relabelled, source_c}
    assert cross[0]["person_id"] != cross[0]["other_person_id"]
    assert cross[0]["similarity"] >= CFG.duplicate_threshold


def test_hard_negatives_are_other_identities_ordered_by_similarity(built):
    from pedsynth.engines.clip import load_clip

    engine = load_clip(TINY)
    table = _all(built["results"])
    rows = table.select(["image_id", "person_id", "split", "caption", "hard_negatives"]).to_pylist()
    image_person = dict(
        zip(
            table.column("image_id").to_pylist(),
            table.column("person_id").to_pylist(),
            strict=False,
        )
    )
    image_split = dict(
        zip(table.column("image_id").to_pylist(), table.column("split").to_pylist(), strict=False)
    )
    image_bytes = {}
    for r in table.select(["image_id", "image"]).to_pylist():
        image_bytes.setdefault(r["image_id"], r["image"]["bytes"])
    ids = sorted(image_bytes)
    img = engine.encode_images([image_bytes[i] for i in ids]).pooled
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    position = {i: p for p, i in enumerate(ids)}
    txt = engine.encode_texts([r["caption"] for r in rows]).pooled
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    exact_first = 0
    for row, q in zip(rows, txt, strict=True):
        negatives = row["hard_negatives"]
        same_split = [i for i in ids if image_split[i] == row["split"]]
        others = [i for i in same_split if image_person[i] != row["person_id"]]
        assert len(negatives) == min(CFG.hard_negatives_k, len(others))
        assert len(set(negatives)) == len(negatives)
        assert all(image_person[n] != row["person_id"] for n in negatives)
        assert all(image_split[n] == row["split"] for n in negatives)
        sims = [float(img[position[n]] @ q) for n in negatives]
        assert all(a >= b - 1e-5 for a, b in zip(sims, sims[1:], strict=False)), sims
        best = max(others, key=lambda i: float(img[position[i]] @ q))
        exact_first += negatives[0] == best
    assert exact_first / len(rows) >= 0.95  # HNSW finds the true hardest negative


def test_hnsw_recall_at_10_against_exact_search(built):
    """Recompute exact top-10 with numpy over the stored vectors; the recorded recall is it."""
    folder = Path(built["out"]) / MEMORY_DIR
    meta = read_memory(built["out"])
    images = faiss.read_index(str(folder / "images.faiss"))
    captions = faiss.read_index(str(folder / "captions.faiss"))
    base = images.reconstruct_n(0, images.ntotal)
    queries = captions.reconstruct_n(0, captions.ntotal)
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)  # cosine space
    exact = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    params = faiss.SearchParametersHNSW(efSearch=meta["index"]["ef_search"])
    _, found = images.search(queries, 10, params=params)
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, found, strict=True)])
    recorded = meta["recall_at_10"]
    assert recorded["queries"] == meta["counts"]["captions"]  # < 1000: every caption is a query
    assert recorded["hnsw_vs_exact"] == pytest.approx(recall, abs=0.01)
    assert recall >= 0.95


def test_memory_folder_layout(built, planted):
    folder = Path(built["out"]) / MEMORY_DIR
    meta = read_memory(built["out"])
    images = faiss.read_index(str(folder / "images.faiss"))
    captions = faiss.read_index(str(folder / "captions.faiss"))
    assert images.ntotal == meta["counts"]["images"] == planted["images"] - 2
    assert captions.ntotal == meta["counts"]["captions"]
    assert images.metric_type == faiss.METRIC_INNER_PRODUCT and images.d == 64
    assert images.hnsw.nb_neighbors(1) == CFG.hnsw_m
    ids = pq.read_table(folder / "ids.parquet").to_pylist()
    image_rows = [r for r in ids if r["index"] == "images"]
    assert [r["position"] for r in image_rows] == list(range(images.ntotal))
    for split, (lo, hi) in meta["split_ranges"].items():
        assert {r["split"] for r in image_rows[lo:hi]} == {split}  # splits are id ranges
    assert meta["clip"]["model"] == "pedsynth-tiny-clip"


def test_rerun_is_skipped(built):
    stamp = (Path(built["out"]) / MEMORY_DIR / "memory.json").stat().st_mtime_ns
    again = run_memory(CFG, built["shards"], built["out"])
    assert all(r.reused for r in again)
    assert [r.path for r in again] == [r.path for r in built["results"]]
    assert (Path(built["out"]) / MEMORY_DIR / "memory.json").stat().st_mtime_ns == stamp


def test_search_returns_rows_with_captions(built):
    table = _all(built["results"])
    row = table.slice(0, 1).to_pylist()[0]
    hits = search(built["out"], row["caption"], k=5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["captions"] for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    test_hits = search(built["out"], row["caption"], k=3, split="test")
    assert len(test_hits) == 3 and {h["split"] for h in test_hits} == {"test"}
    with pytest.raises(ValueError, match="split 'nope' is not in the memory"):
        search(built["out"], "x", split="nope")


def test_search_without_memory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory.json not found"):
        search(tmp_path, "a man in a red jacket")


def test_cli_search(built, capsys):
    from pedsynth.cli import main

    assert main(["search", str(built["out"]), "a man in a red jacket", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("cuhk-pedes:") >= 3 and "score" in out
    assert main(["search", str(built["out"]), "x", "--split", "nope"]) == 2


def test_dedupe_off_reports_but_keeps(built, tmp_path):
    import shutil as sh

    out = tmp_path / "keep"
    out.mkdir()
    shards = [built["shards"][0], built["shards"][-1]]  # the originals and the planted copies
    results = run_memory(CFG.model_copy(update={"dedupe": False}), shards, out)
    meta = read_memory(out)
    assert meta["counts"]["near_duplicates_found"] == 2
    assert meta["counts"]["near_duplicates_removed"] == 0
    assert sum(r.rejected for r in results) == 0
    sh.rmtree(out)


def test_shard_outputs_keep_the_schema_and_hold_no_rejected_rows(built):
    table = _all(built["results"])
    rejects = _all(built["results"], rejects=True)
    assert read_shard(built["results"][0]).schema == read_shard(built["shards"][0]).schema
    assert table.column("hard_negatives").null_count == 0
    rejected = set(rejects.column("pair_id").to_pylist())
    assert rejected and rejected.isdisjoint(table.column("pair_id").to_pylist())
    inputs = sum(s.rows for s in built["shards"])
    assert table.num_rows + rejects.num_rows == inputs


def test_an_undecodable_image_goes_to_rejects(built, tmp_path):
    """Its rows leave as ``image_decode_error``; it is neither indexed nor a hard negative."""
    import pyarrow as pa

    from pedsynth.schemas.tables import rejects_table

    table = read_shard(built["shards"][0]).slice(0, 24)
    rows = table.to_pylist()
    broken_id = rows[0]["image_id"]
    broken_rows = [r for r in rows if r["image_id"] == broken_id]
    for r in broken_rows:
        r["image"] = {"bytes": b"\x89PNG not really", "path": r["image"]["path"]}
    shard = run_shard(
        tmp_path,
        "ingest",
        "broken-00000",
        "fp-broken",
        lambda: (pa.Table.from_pylist(rows, schema=table.schema), rejects_table([])),
    )
    results = run_memory(CFG, [shard], tmp_path)
    rejects = _all(results, rejects=True).to_pylist()
    assert [r["reason"] for r in rejects] == ["image_decode_error"] * len(broken_rows)
    assert {r["image_id"] for r in rejects} == {broken_id}
    assert {r["pair_id"] for r in rejects} == {r["pair_id"] for r in broken_rows}
    assert all(r["stage"] == "memory" and "cannot decode image" in r["detail"] for r in rejects)
    out = _all(results)
    assert out.num_rows == len(rows) - len(broken_rows)
    assert broken_id not in out.column("image_id").to_pylist()
    assert all(broken_id not in negatives for negatives in out.column("hard_negatives").to_pylist())
    meta = read_memory(tmp_path)
    assert meta["counts"]["undecodable_images"] == 1
    assert broken_id in meta["undecodable_images"]
    ids = pq.read_table(tmp_path / MEMORY_DIR / "ids.parquet")
    assert broken_id not in ids.column("image_id").to_pylist()


def test_build_dataset_flow_with_score_and_memory(prefect_server, procedural_small, tmp_path):
    """build-dataset with ``configs/offline-vision.yaml``: score + memory through Prefect."""
    from pedsynth.flows.build_dataset import build_dataset

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    manifest = build_dataset(
        config=str(repo / "configs" / "offline-vision.yaml"),
        sources=[f"cuhk-pedes:{procedural_small}"],
        out=str(out),
        overrides=["shard_rows=60", "memory.hnsw_m=16", "memory.hard_negatives_k=4"],
    )
    assert {"score", "memory"} <= set(manifest["stages"])
    table = pq.read_table(out / "latest" / "data")
    rows = table.to_pylist()
    assert len(rows) == manifest["totals"]["pairs"] > 0
    person_of = {r["image_id"]: r["person_id"] for r in rows}
    split_of = {r["image_id"]: r["split"] for r in rows}
    # The flow wired the score stage's engine: its cosines, not some other number in [-1, 1].
    from pedsynth.engines.clip import load_clip

    engine = load_clip(ClipModelConfig(model="pedsynth-tiny-clip", pretrained="random"))
    sample = rows[:4]
    img = engine.encode_images([r["image"]["bytes"] for r in sample]).pooled
    txt = engine.encode_texts([r["caption"] for r in sample]).pooled
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose([r["clip_score"] for r in sample], cos, atol=1e-5)
    for row in rows:
        assert 0 < len(row["tokens"]) == len(row["token_noise"])
        assert len(row["hard_negatives"]) == 4
        assert all(person_of[n] != row["person_id"] for n in row["hard_negatives"])
        assert all(split_of[n] == row["split"] for n in row["hard_negatives"])
    for name in ("images.faiss", "captions.faiss", "ids.parquet", "memory.json"):
        assert (out / MEMORY_DIR / name).exists()
    meta = read_memory(out)
    assert meta["counts"]["images"] == len(person_of)
    assert meta["recall_at_10"]["hnsw_vs_exact"] >= 0.95
    hits = search(out, rows[0]["caption"], k=3)  # captions now come from the final shards
    assert len(hits) == 3 and all(h["captions"] for h in hits)
