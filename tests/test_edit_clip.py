"""The edit stage's CLIP check with a real tiny CLIP end to end: the recorded scores are what
open_clip computes on the same images and captions, kept captions score higher with the edited
image, and an edit the check cannot accept ends in rejects with both scores."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from pedsynth.engines.cache import clear_kind
from pedsynth.schemas.edit import EditConfig
from pedsynth.tasks.edit import build_stage
from tests.text_shards import ingest_procedural, torch_threads

TINY = {"steps": 2, "height": 64, "width": 32, "device": "cpu", "batch_size": 16}
CLIP_ARCH = "pedsynth-tiny-clip-small"
CLIP_SIZE = (128, 64)
SCORES = re.compile(r"edited image (-?[0-9.]+), with the original (-?[0-9.]+)")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("edit-clip")
    return root / "bench", ingest_procedural(root, identities=6, images_per_identity=2)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An open_clip model built here and its safetensors file, which the stage loads."""
    import open_clip

    from pedsynth.engines.clip import save_safetensors
    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = open_clip.create_model(CLIP_ARCH, force_image_size=CLIP_SIZE).eval()
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_safetensors(model, path)
    return model, str(path)


def _score(model, image: bytes, caption: str) -> float:
    """Cosine of open_clip's pooled embeddings, the image fitted to the crop size by aspect."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    from pedsynth.engines.clip_preprocess import person_transform

    pre = get_model_preprocess_cfg(model)
    transform = person_transform(CLIP_SIZE, "pad", pre["mean"], pre["std"])
    with Image.open(io.BytesIO(image)) as im:
        pixels = transform(im.convert("RGB"))[None]
    with torch.no_grad():
        v = model.encode_image(pixels, normalize=True)[0]
        t = model.encode_text(open_clip.get_tokenizer(CLIP_ARCH)([caption]), normalize=True)[0]
    return float(v @ t)


def _run(bench: Path, table: pa.Table, path: str, **overrides) -> tuple[pa.Table, pa.Table]:
    data = {
        "share": 1.0,
        "diffusion": TINY,
        "masks": {"root": str(bench), "dilate_px": 1},
        "clip": {"model": CLIP_ARCH, "pretrained": path, "image_size": CLIP_SIZE, "device": "cpu"},
        "reannotate": {"max_retries": 1},
    }
    clear_kind("clip")
    with torch_threads(1):
        return build_stage(EditConfig.model_validate(data | overrides), seed=0)(table)


def _parents(table: pa.Table) -> dict[str, dict]:
    return {r["pair_id"]: r for r in table.to_pylist()}


def test_kept_and_rejected_scores_equal_open_clip(shard, clip):
    bench, table = shard
    model, path = clip
    out, rejects = _run(bench, table, path)
    parents = _parents(table)
    edits = out.filter(pc.equal(out.column("caption_source"), "edit")).to_pylist()
    judged = rejects.filter(pc.equal(rejects.column("reason"), "clip_prefers_original"))
    # random weights: some edits pass the check and some do not (both are checked below)
    assert edits and judged.num_rows, (len(edits), judged.num_rows)
    for row in edits:
        original = parents[row["parent_id"]]["image"]["bytes"]
        with_edit = _score(model, row["image"]["bytes"], row["caption"])
        with_original = _score(model, original, row["caption"])
        assert row["clip_score"] == pytest.approx(with_edit, abs=1e-5)
        assert with_edit > with_original
    # An edit the check rejects names both scores; the one with the original is open_clip's.
    for reject in judged.to_pylist():
        with_edit, with_original = (float(x) for x in SCORES.search(reject["detail"]).groups())
        assert with_edit <= with_original
        original = parents[reject["pair_id"]]["image"]["bytes"]
        assert with_original == pytest.approx(_score(model, original, reject["caption"]), abs=5e-6)
    # Every caption planned for an edit ended kept or rejected by the check (no third way).
    finals = {r["pair_id"] for r in judged.to_pylist()}
    assert {r["parent_id"] for r in edits}.isdisjoint(finals)


def test_an_edit_that_cannot_beat_the_original_is_regenerated_then_rejected(shard, clip):
    """A cosine gain is at most 2, so a margin of 2 fails every caption: each is asked again
    once, then rejected, and the rest of the stage still writes the parent rows."""
    bench, table = shard
    model, path = clip
    out, rejects = _run(bench, table, path, clip_margin=2.0)
    assert out.num_rows == table.num_rows
    assert pc.sum(pc.equal(out.column("caption_source"), "edit")).as_py() == 0
    reasons = rejects.column("reason").to_pylist()
    final = [r for r in rejects.to_pylist() if r["reason"] == "clip_prefers_original"]
    assert final and reasons.count("regenerated:clip_prefers_original") == len(final)
    parents = _parents(table)
    for reject in final:
        with_edit, with_original = (float(x) for x in SCORES.search(reject["detail"]).groups())
        assert "margin 2.0" in reject["detail"]
        original = parents[reject["pair_id"]]["image"]["bytes"]
        assert with_original == pytest.approx(_score(model, original, reject["caption"]), abs=5e-6)
        assert -1 <= with_edit <= 1


def test_without_clip_no_score_is_recorded(shard):
    bench, table = shard
    config = EditConfig.model_validate(
        {"share": 1.0, "diffusion": TINY, "masks": {"root": str(bench), "dilate_px": 1}}
    )
    with torch_threads(1):
        out, _ = build_stage(config, seed=0)(table)
    edits = out.filter(pc.equal(out.column("caption_source"), "edit"))
    assert edits.num_rows > 0
    assert edits.column("clip_score").null_count == edits.num_rows
