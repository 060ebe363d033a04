"""build-dataset end to end on the procedural benchmark, read back the ways users read it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pedsynth.schemas.tables import PAIRS_SCHEMA, REJECTS_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def run_build(out: Path, sources: list[str], *overrides: str) -> dict:
    """Ingest and write only (no config file), so these tests do not depend on model stages."""
    from pedsynth.flows.build_dataset import build_dataset

    return build_dataset(
        config=None, sources=sources, out=str(out), overrides=["workers=2", *overrides]
    )


@pytest.fixture(scope="module")
def built(prefect_server, procedural_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    manifest = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=50")
    return out, manifest


def _annotations(root: Path) -> list[dict]:
    return json.loads((root / "reid_raw.json").read_text())


def test_layout_and_shard_names(built):
    out, manifest = built
    files = sorted(p.name for p in (out / "latest" / "data").glob("*.parquet"))
    assert files == sorted(Path(s["path"]).name for s in manifest["shards"])
    for split in {s["split"] for s in manifest["shards"]}:
        mine = [f for f in files if f.startswith(f"{split}-")]
        assert mine == [f"{split}-{i:05d}-of-{len(mine):05d}.parquet" for i in range(len(mine))]
    assert all(s["rows"] <= 50 for s in manifest["shards"])
    assert (out / "latest" / "manifest.json").exists() and (out / "latest" / "README.md").exists()


def test_rows_schema_and_counts(built, procedural_small):
    out, manifest = built
    table = pq.read_table(out / "latest" / "data")
    expected = sum(len(r["captions"]) for r in _annotations(procedural_small))
    assert table.num_rows == expected == manifest["totals"]["pairs"]
    for f in (out / "latest" / "data").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata() == PAIRS_SCHEMA.remove_metadata()
        assert pq.read_schema(f).metadata[b"pedsynth.schema_version"]
    df = pd.read_parquet(out / "latest" / "data", columns=["pair_id", "split", "caption"])
    assert len(df) == expected and df["pair_id"].is_unique
    assert set(df["split"]) == {"train", "val", "test"}


def test_images_are_the_source_bytes(built, procedural_small):
    out, _ = built
    rows = pq.read_table(
        out / "latest" / "data", columns=["image", "width", "height", "image_id"]
    ).to_pylist()
    for row in rows[::7]:
        img = Image.open(io.BytesIO(row["image"]["bytes"]))
        img.load()
        assert img.size == (row["width"], row["height"])
        on_disk = (procedural_small / "imgs" / row["image"]["path"]).read_bytes()
        assert row["image"]["bytes"] == on_disk  # JPEG stored as it was, not re-encoded


def test_splits_identity_disjoint_and_match_annotations(built, procedural_small):
    out, manifest = built
    df = pd.read_parquet(out / "latest" / "data", columns=["person_id", "split"])
    assert df.groupby("person_id")["split"].nunique().max() == 1
    truth = {f"cuhk-pedes:{r['id']}": r["split"] for r in _annotations(procedural_small)}
    assert dict(zip(df["person_id"], df["split"], strict=True)) == truth
    assert manifest["totals"]["identities_in_several_splits"] == 0


def test_lineage_columns_filled(built):
    out, _ = built
    df = pd.read_parquet(
        out / "latest" / "data",
        columns=["caption_source", "generator", "source", "parent_id", "image_id", "caption"],
    )
    assert (df["caption_source"] == "original").all()
    assert df["generator"].eq("dataset:cuhk-pedes").all()
    assert df["source"].str.match(r"cuhk-pedes:reid_raw\.json#\d+").all()
    assert df["parent_id"].isna().all() and df["caption"].str.len().gt(0).all()


def test_manifest_checksums_and_counts(built):
    from pedsynth.tasks.shards import file_sha256

    out, manifest = built
    for s in manifest["shards"]:
        assert file_sha256(out / "latest" / s["path"]) == s["sha256"]
        assert pq.read_metadata(out / "latest" / s["path"]).num_rows == s["rows"]
    assert manifest["stages"]["ingest"]["rows_out"] == manifest["totals"]["pairs"]
    assert manifest["stages"]["write"]["rejected"] == 0
    assert manifest["config"]["shard_rows"] == 50


def test_huggingface_datasets_loads_the_output(built):
    datasets = pytest.importorskip("datasets")
    out, manifest = built
    ds = datasets.load_dataset(str(out / "latest"), cache_dir=str(out.parent / "hf-cache"))
    by_split = manifest["totals"]["by_split"]
    assert {k: len(v) for k, v in ds.items()} == {
        {"val": "validation"}.get(k, k): v["pairs"] for k, v in by_split.items()
    }
    assert ds["train"][0]["image"].size[0] > 0  # decoded as a PIL image


def test_rerun_over_finished_output_does_nothing(built):
    out, manifest = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_build(
        out,
        [
            manifest["config"]["sources"][0]["format"]
            + ":"
            + manifest["config"]["sources"][0]["path"]
        ],
        "shard_rows=50",
    )
    assert again["reused"] is True and again["build_fingerprint"] == manifest["build_fingerprint"]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resharding_reuses_ingest_and_removes_stale_files(
    prefect_server, procedural_small, tmp_path
):
    out = tmp_path / "out"
    first = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=30")
    second = run_build(
        out, [f"cuhk-pedes:{procedural_small}"], "write.card_examples=2", "shard_rows=30"
    )
    assert second["reused"] is False
    assert second["stages"]["ingest"]["reused"] == second["stages"]["ingest"]["shards"]
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    third = run_build(out, [f"cuhk-pedes:{procedural_small}"], "shard_rows=1000")
    assert sorted(os.listdir(out / "latest" / "data")) == sorted(
        Path(s["path"]).name for s in third["shards"]
    )
    assert pq.read_table(out / "latest" / "data").num_rows == first["totals"]["pairs"]


def test_rejects_table_schema(built):
    out, manifest = built
    files = list((out / "latest" / "rejects").glob("*.parquet"))
    assert [f"rejects/{f.name}" for f in files] == manifest["rejects"]
    assert pq.read_schema(files[0]).remove_metadata() == REJECTS_SCHEMA.remove_metadata()


def test_progress_and_counts_are_published_as_artifacts(built):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, manifest = built
    keys = ["build-dataset-progress", "build-dataset-stage-counts", "build-dataset-summary"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    latest = {}
    for art in sorted(found, key=lambda a: a.created):
        latest[art.key] = art
    assert set(latest) == set(keys)
    assert float(latest["build-dataset-progress"].data) == 100.0
    table = latest["build-dataset-stage-counts"].data
    rows = json.loads(table) if isinstance(table, str) else table
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["write"]["rows_out"] == manifest["totals"]["pairs"]
