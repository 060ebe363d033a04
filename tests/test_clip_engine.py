"""The CLIP engine against open_clip itself, on tiny random-weight models (no download)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pedsynth.engines.clip import (
    ClipLoadError,
    ImageDecodeError,
    load_clip,
    save_safetensors,
)
from pedsynth.schemas.vision import ClipModelConfig

TINY = ClipModelConfig(model="pedsynth-tiny-clip", pretrained="random", batch_size=4)
CAPTIONS = [
    "A man in a red jacket and blue jeans, carrying a black backpack.",
    "The woman wears a green dress; she has long brown hair!",
    "short",
]


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine():
    return load_clip(TINY)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [_jpeg(96, 256, seed=s) for s in range(5)] + [_jpeg(200, 120, seed=9)]


def test_pooled_image_embeddings_equal_open_clip_encode_image(engine, images):
    feats = engine.encode_images(images, patches=True)  # batch_size 4: two batches
    with torch.no_grad():
        expected = engine.model.encode_image(torch.from_numpy(engine.pixels(images))).numpy()
    np.testing.assert_allclose(feats.pooled, expected, atol=1e-5, rtol=0)
    assert feats.patches.shape == (len(images), 24 * 8, engine.embed_dim)  # CLS excluded


def test_patch_features_are_block_output_through_ln_post_and_proj(engine, images):
    """The intermediate features equal open_clip's own forward_intermediates at that block."""
    visual = engine.model.visual
    pixels = torch.from_numpy(engine.pixels(images[:2]))
    layer = engine.feature_layers["image"]
    assert layer == 2  # depth 4 → block 2 (ViT-B: block 10 of 12)
    with torch.no_grad():
        out = visual.forward_intermediates(pixels, indices=[layer - 1], output_fmt="NLC")
        expected = visual.ln_post(out["image_intermediates"][0]) @ visual.proj
    got = engine.encode_images(images[:2], patches=True).patches
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_pooled_text_embeddings_equal_open_clip_encode_text(engine):
    import open_clip

    feats = engine.encode_texts(CAPTIONS, token_features=True)
    ids = open_clip.get_tokenizer("pedsynth-tiny-clip")(CAPTIONS)
    assert torch.equal(engine.tokenize(CAPTIONS).ids, ids)
    with torch.no_grad():
        expected = engine.model.encode_text(ids).numpy()
    np.testing.assert_allclose(feats.pooled, expected, atol=1e-5, rtol=0)


def test_token_features_come_from_the_configured_block(engine):
    model = engine.model
    layer = engine.feature_layers["text"]
    ids = engine.tokenize(CAPTIONS[:1]).ids
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        for block in model.transformer.resblocks[:layer]:
            x = block(x, attn_mask=model.attn_mask)
        expected = (model.ln_final(x) @ model.text_projection)[0]
    feats = engine.encode_texts(CAPTIONS[:1], token_features=True).token_features[0]
    n = len(engine.tokenizer.encode(CAPTIONS[0]))
    np.testing.assert_allclose(feats, expected[1 : 1 + n].numpy(), atol=1e-5, rtol=0)


def test_tokens_are_bpe_strings_without_start_end_or_padding(engine):
    tok = engine.tokenize(CAPTIONS)
    assert tok.tokens[2] == ["short"]
    assert tok.tokens[0][:4] == ["a", "man", "in", "a"]
    for text, tokens, eot in zip(CAPTIONS, tok.tokens, tok.eot_positions, strict=True):
        assert len(tokens) == len(engine.tokenizer.encode(text)) == eot - 1
        assert not any("<" in t and "_of_text>" in t for t in tokens)
        assert all("</w>" not in t for t in tokens)
    assert tok.truncated == [False, False, False]


def test_long_caption_is_truncated_not_an_error(engine):
    long = "a person wearing a very long red coat " * 30
    tok = engine.tokenize([long])
    assert tok.truncated == [True]
    assert len(tok.tokens[0]) == engine.context_length - 2
    assert tok.ids[0, -1] == engine.tokenizer.eot_token_id
    feats = engine.encode_texts([long], token_features=True)
    assert feats.token_features[0].shape == (engine.context_length - 2, engine.embed_dim)


def test_preprocess_keeps_aspect_ratio_pad_and_crop(engine):
    tall = Image.new("RGB", (64, 384), (250, 10, 10))  # half as wide as 384×128
    padded = engine.preprocess(tall)
    assert padded.shape == (3, 384, 128)
    assert np.allclose(padded[:, :, :32], 0, atol=1e-6)  # padding = mean → 0
    assert np.allclose(padded[:, :, -32:], 0, atol=1e-6)
    assert padded[0, :, 32:96].min() > 1.0  # red content fills the middle
    cropper = load_clip(TINY.model_copy(update={"resize_mode": "crop"}))
    wide = Image.new("RGB", (400, 200), (10, 250, 10))
    cropped = cropper.preprocess(wide)
    assert cropped.shape == (3, 384, 128)
    assert cropped[1].min() > 1.0  # covers the whole frame, no padding


def test_bad_image_bytes_raise_a_clear_error(engine):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        engine.prepare_image(b"not an image")
    with pytest.raises(ImageDecodeError, match="image 1"):
        engine.pixels([_jpeg(32, 64), b"\xff\xd8 broken"])


def test_random_init_is_seeded(engine, images):
    """Two processes (or a rebuilt engine) with the same config embed identically."""
    from pedsynth.engines.clip import ClipEngine, _create_model

    model, _ = _create_model(TINY)
    again = ClipEngine(model, engine.tokenizer, TINY)
    np.testing.assert_array_equal(
        again.encode_images(images[:2]).pooled, engine.encode_images(images[:2]).pooled
    )


def test_safetensors_round_trip_and_rejections(engine, images, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_safetensors(engine.model, path)
    reloaded = load_clip(TINY.model_copy(update={"pretrained": str(path), "seed": 123}))
    np.testing.assert_array_equal(
        reloaded.encode_images(images[:2]).pooled, engine.encode_images(images[:2]).pooled
    )
    pickle_file = tmp_path / "weights.pt"
    torch.save(engine.model.state_dict(), pickle_file)
    with pytest.raises(ClipLoadError, match="must be a .safetensors file"):
        load_clip(TINY.model_copy(update={"pretrained": str(pickle_file)}))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ClipLoadError, match="not a readable safetensors file"):
        load_clip(TINY.model_copy(update={"pretrained": str(junk)}))


def test_square_checkpoint_gets_its_position_grid_interpolated(tmp_path, images):
    """A square model's weights load into the 384×128 person-crop grid (24×8 patches)."""
    import open_clip

    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    torch.manual_seed(1)
    square = open_clip.create_model("pedsynth-tiny-clip", force_image_size=(128, 128))
    path = tmp_path / "square.safetensors"
    save_safetensors(square, path)
    eng = load_clip(TINY.model_copy(update={"pretrained": str(path)}))
    pos = eng.model.visual.positional_embedding.detach()
    assert pos.shape == (1 + 24 * 8, 64)
    old = square.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 8), mode="bicubic", antialias=True)
    np.testing.assert_allclose(
        pos[1:].numpy(), expected.permute(0, 2, 3, 1).reshape(24 * 8, -1).numpy(), atol=1e-5
    )
    assert torch.equal(pos[0], old[0])  # the class token's position is untouched
    assert eng.encode_images(images[:1]).pooled.shape == (1, 64)


def test_config_errors_are_clear():
    with pytest.raises(ClipLoadError, match="not an open_clip architecture"):
        load_clip(ClipModelConfig(model="no-such-clip", pretrained="random"))
    with pytest.raises(ClipLoadError, match="feature_layer 9 is outside the image tower"):
        load_clip(TINY.model_copy(update={"feature_layer": 9}))
    with pytest.raises(ClipLoadError, match="no CUDA device|not a known tag|cannot load CLIP"):
        load_clip(TINY.model_copy(update={"pretrained": "no-such-tag"}))


def test_config_round_trips_through_json():
    cfg = ClipModelConfig.model_validate(json.loads(TINY.model_dump_json()))
    assert cfg == TINY and cfg.image_size == (384, 128)
