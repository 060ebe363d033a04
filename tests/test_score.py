"""The score stage on ingested procedural shards with a tiny random-weight CLIP."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pedsynth.engines.clip import clip_token_strings
from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.tables import PAIRS_SCHEMA
from pedsynth.schemas.vision import ClipModelConfig, ScoreConfig
from pedsynth.tasks import sources
from pedsynth.tasks.score import build_stage
from pedsynth.tasks.shards import read_shard

TINY = ClipModelConfig(model="pedsynth-tiny-clip", pretrained="random", batch_size=8)


@pytest.fixture(scope="module")
def shard(procedural_small, tmp_path_factory) -> pa.Table:
    """The first ~60 pairs of the procedural benchmark, ingested for real."""
    out = tmp_path_factory.mktemp("score-ingest")
    chunks, _ = sources.plan_chunks(
        SourceConfig(format="cuhk-pedes", path=str(procedural_small)), out, 60
    )
    return read_shard(sources.ingest_chunk(chunks[0], IngestConfig(), out))


@pytest.fixture(scope="module")
def scored(shard):
    stage = build_stage(ScoreConfig(clip=TINY), 0)
    table, rejects = stage(shard)
    return stage, table, rejects


def _loop_noise(text_feats: np.ndarray, patch_feats: np.ndarray) -> list[float]:
    """r_i = 1 − max_j cos(t_i, v_j), written out token by token and patch by patch."""
    noise = []
    for t in text_feats:
        t_norm = math.sqrt(sum(float(x) * float(x) for x in t))
        best = -math.inf
        for v in patch_feats:
            cos = float(np.dot(t.astype(np.float64), v.astype(np.float64)))
            cos /= t_norm * math.sqrt(float(np.dot(v.astype(np.float64), v.astype(np.float64))))
            best = max(best, cos)
        noise.append(1.0 - best)
    return noise


def test_token_noise_matches_an_explicit_loop(scored, shard):
    stage, table, _ = scored
    engine = stage.engine
    rows = table.slice(0, 3).to_pylist()
    for row in rows:
        patches = engine.encode_images([row["image"]["bytes"]], patches=True).patches[0]
        text = engine.encode_texts([row["caption"]], token_features=True)
        expected = _loop_noise(text.token_features[0], patches)
        assert row["tokens"] == text.tokens[0]
        assert len(row["token_noise"]) == len(row["tokens"]) == len(expected)
        np.testing.assert_allclose(row["token_noise"], expected, atol=1e-5, rtol=0)


def test_start_end_and_padding_are_excluded(scored):
    stage, table, _ = scored
    engine = stage.engine
    row = table.slice(0, 1).to_pylist()[0]
    body = engine.tokenizer.encode(row["caption"])
    assert len(row["tokens"]) == len(body) < engine.context_length - 2  # not padded to 77
    assert row["tokens"] == clip_token_strings(engine.tokenizer, body)
    assert "".join(row["tokens"]) == "".join(row["caption"].lower().split())  # ASCII captions
    # The excluded positions would have noise values of their own: SOT/EOT/padding.
    patches = engine.encode_images([row["image"]["bytes"]], patches=True).patches[0]
    ids = engine.tokenize([row["caption"]]).ids
    _, all_positions = engine.text_forward(ids, True)
    full = _loop_noise(all_positions[0].numpy(), patches)
    eot = len(body) + 1
    np.testing.assert_allclose(row["token_noise"], full[1:eot], atol=1e-5)
    assert len(full) == engine.context_length > len(row["token_noise"]) + 2


def test_clip_score_is_the_cosine_of_pooled_embeddings(scored):
    stage, table, _ = scored
    engine = stage.engine
    rows = table.slice(0, 4).to_pylist()
    img = engine.encode_images([r["image"]["bytes"] for r in rows]).pooled
    txt = engine.encode_texts([r["caption"] for r in rows]).pooled
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose([r["clip_score"] for r in rows], cos, atol=1e-5)


def test_other_columns_are_kept_and_schema_holds(scored, shard):
    _, table, rejects = scored
    assert table.schema.remove_metadata() == PAIRS_SCHEMA.remove_metadata()
    assert rejects.num_rows == 0 and table.num_rows == shard.num_rows
    untouched = [c for c in PAIRS_SCHEMA.names if c not in ("clip_score", "tokens", "token_noise")]
    assert table.select(untouched).equals(shard.select(untouched))
    assert table.column("clip_score").null_count == 0


def test_each_distinct_image_is_decoded_once(shard, monkeypatch):
    stage = build_stage(ScoreConfig(clip=TINY), 0)
    engine = stage.engine
    calls = []
    original = engine.prepare_image
    monkeypatch.setattr(engine, "prepare_image", lambda data: calls.append(1) or original(data))
    part = shard.slice(0, 20)
    stage(part)
    distinct = len(set(part.column("image_id").to_pylist()))
    assert len(calls) == distinct < part.num_rows


def test_min_clip_score_sends_low_pairs_to_rejects(scored, shard):
    _, table, _ = scored
    part, table = shard.slice(0, 30), table.slice(0, 30)
    threshold = float(np.median(table.column("clip_score").to_numpy()))
    kept, rejects = build_stage(ScoreConfig(clip=TINY, min_clip_score=threshold), 0)(part)
    low = [s < threshold for s in table.column("clip_score").to_pylist()]
    assert rejects.num_rows == sum(low) > 0
    assert kept.num_rows + rejects.num_rows == part.num_rows
    assert min(kept.column("clip_score").to_pylist()) >= threshold
    assert set(rejects.column("reason").to_pylist()) == {"low_clip_score"}
    detail = rejects.column("detail")[0].as_py()
    assert detail.startswith("clip_score=") and f"< min_clip_score={threshold}" in detail
    assert set(rejects.column("pair_id").to_pylist()).isdisjoint(kept.column("pair_id").to_pylist())


def test_bad_image_long_caption_and_uncaptioned_rows(shard):
    rows = shard.slice(0, 3).to_pylist()
    rows[0]["image"] = {"bytes": b"garbage", "path": rows[0]["image"]["path"]}
    rows[0]["image_id"] = "broken-image"
    rows[1]["caption"] = "a woman in a long grey coat with a red scarf " * 20
    rows[2]["caption"] = None
    table = pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)
    out, rejects = build_stage(ScoreConfig(clip=TINY), 0)(table)
    assert rejects.column("reason").to_pylist() == ["image_decode_error"]
    assert "cannot decode image" in rejects.column("detail")[0].as_py()
    assert rejects.column("image_id").to_pylist() == ["broken-image"]
    by_pair = {r["pair_id"]: r for r in out.to_pylist()}
    long_row, uncaptioned = by_pair[rows[1]["pair_id"]], by_pair[rows[2]["pair_id"]]
    assert len(long_row["tokens"]) == len(long_row["token_noise"]) == 75  # cut to the context
    assert uncaptioned["clip_score"] is None and uncaptioned["tokens"] is None


def test_empty_shard_and_fingerprint(shard):
    stage = build_stage(ScoreConfig(clip=TINY), 0)
    out, rejects = stage(shard.slice(0, 0))
    assert out.num_rows == 0 and rejects.num_rows == 0
    other = build_stage(ScoreConfig(clip=TINY, min_clip_score=0.2), 0)
    assert stage.fingerprint_parts() != other.fingerprint_parts()
    assert stage.fingerprint_parts()["weights"]["pretrained"] == "random"


@pytest.fixture(scope="module")
def trained_run(procedural_small, tmp_path_factory):
    """One short train-retriever run (configs/train-tiny.yaml, one epoch) on the benchmark."""
    from pathlib import Path

    from pedsynth.schemas.train import load_train_config
    from pedsynth.train.loop import train

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("score-trained") / "run"
    cfg = load_train_config(
        repo / "configs" / "train-tiny.yaml",
        data=f"cuhk-pedes:{procedural_small}",
        out=str(out),
        overrides=[
            "epochs=1",
            "batch_size=16",
            "num_workers=0",
            "threads=2",
            "model.image_size=[128, 64]",  # the size the score stage below runs at
        ],
    )
    train(cfg)
    return out


def test_a_trained_checkpoint_scores_as_the_trained_model(trained_run, shard):
    """``pretrained: RUN_DIR/checkpoints/best.safetensors`` gives the scores of the trained
    CLIP's own encoders (loaded here by hand from the checkpoint's ``model.clip.`` tensors)."""
    import open_clip
    import torch
    from safetensors.torch import load_file

    best = trained_run / "checkpoints" / "best.safetensors"
    small = ClipModelConfig(
        model="pedsynth-tiny-clip-small", image_size=(128, 64), batch_size=8, device="cpu"
    )
    stage = build_stage(ScoreConfig(clip=small.model_copy(update={"pretrained": str(best)})), 0)
    part = shard.slice(0, 12)
    table, rejects = stage(part)
    assert rejects.num_rows == 0

    tensors = load_file(str(best))
    clip = open_clip.create_model("pedsynth-tiny-clip-small")
    clip.load_state_dict(
        {
            k.removeprefix("model.clip."): v
            for k, v in tensors.items()
            if k.startswith("model.clip.")
        }
    )
    clip.eval()
    rows = table.to_pylist()
    pixels = torch.from_numpy(stage.engine.pixels([r["image"]["bytes"] for r in rows]))
    ids = open_clip.get_tokenizer("pedsynth-tiny-clip-small")([r["caption"] for r in rows])
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(ids), dim=-1)
    expected = (img * txt).sum(-1).numpy()
    np.testing.assert_allclose([r["clip_score"] for r in rows], expected, atol=1e-5, rtol=0)

    untrained, _ = build_stage(
        ScoreConfig(clip=small.model_copy(update={"pretrained": "random"})), 0
    )(part)
    gap = np.abs(np.asarray(untrained.column("clip_score").to_pylist()) - expected)
    assert gap.max() > 1e-2  # the checkpoint's weights were used, not a random init
    assert stage.fingerprint_parts()["weights"]["pretrained"].startswith("sha256:")
