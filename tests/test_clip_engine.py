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
    build_engine,
    clip_token_strings,
    load_clip,
    save_safetensors,
)
from pedsynth.engines.clip_preprocess import CLIP_MEAN, CLIP_STD, mean_std_of, person_transform
from pedsynth.engines.device import DeviceError
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


def _vision_blocks_by_hand(visual: torch.nn.Module, pixels: torch.Tensor, layer: int):
    """A ViT forward written out: patches, class token, positions, ln_pre, ``layer`` blocks."""
    x = visual.conv1(pixels)  # (B, width, rows, cols)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks[:layer]:
        x = block(x)
    return x


def test_patch_features_are_block_output_through_ln_post_and_proj(engine, images):
    """The engine's patch features equal the ViT run block by block, then ln_post and proj."""
    visual = engine.model.visual
    pixels = torch.from_numpy(engine.pixels(images[:2]))
    layer = engine.feature_layers["image"]
    assert layer == 2  # depth 4 → block 2 (ViT-B: block 10 of 12)
    with torch.no_grad():
        middle = _vision_blocks_by_hand(visual, pixels, layer)
        expected = visual.ln_post(middle[:, 1:]) @ visual.proj  # class token dropped
        full = _vision_blocks_by_hand(visual, pixels, len(visual.transformer.resblocks))
        pooled = visual.ln_post(full[:, 0]) @ visual.proj
    got = engine.encode_images(images[:2], patches=True)
    np.testing.assert_allclose(got.patches, expected.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.pooled, pooled.numpy(), atol=1e-5, rtol=0)


def test_first_and_last_feature_layers_are_those_blocks(images):
    """feature_layer 1 and depth pick the first and last block, not a neighbour."""
    for layer in (1, 4):
        eng = load_clip(TINY.model_copy(update={"feature_layer": layer}))
        pixels = torch.from_numpy(eng.pixels(images[:1]))
        visual = eng.model.visual
        with torch.no_grad():
            middle = _vision_blocks_by_hand(visual, pixels, layer)
            expected = visual.ln_post(middle[:, 1:]) @ visual.proj
        got = eng.encode_images(images[:1], patches=True).patches
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
    ids = engine.tokenize(CAPTIONS[:2]).ids
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        for block in model.transformer.resblocks[:layer]:
            x = block(x, attn_mask=model.attn_mask)
        expected = model.ln_final(x) @ model.text_projection
    feats = engine.encode_texts(CAPTIONS[:2], token_features=True).token_features
    for i, caption in enumerate(CAPTIONS[:2]):
        n = len(engine.tokenizer.encode(caption))
        assert feats[i].shape == (n, engine.embed_dim)
        np.testing.assert_allclose(feats[i], expected[i, 1 : 1 + n].numpy(), atol=1e-5, rtol=0)


def test_tokens_are_bpe_strings_without_start_end_or_padding(engine):
    tok = engine.tokenize(CAPTIONS)
    assert tok.tokens[2] == ["short"]
    assert tok.tokens[0][:4] == ["a", "man", "in", "a"]
    for text, tokens, eot in zip(CAPTIONS, tok.tokens, tok.eot_positions, strict=True):
        assert len(tokens) == len(engine.tokenizer.encode(text)) == eot - 1
        assert not any("<" in t and "_of_text>" in t for t in tokens)
        assert all("</w>" not in t for t in tokens)
    assert tok.truncated == [False, False, False]


def test_token_strings_are_utf8_text_of_each_bpe_token(engine):
    """The stored form: decoded bytes, no end-of-word marker; a split character gives U+FFFD."""
    tokenizer = engine.tokenizer
    assert clip_token_strings(tokenizer, tokenizer.encode("A man, carrying")) == [
        "a",
        "man",
        ",",
        "carrying",
    ]
    assert clip_token_strings(tokenizer, tokenizer.encode("café naïve")) == [
        "café",
        "na",
        "ï",
        "ve",
    ]
    assert engine.token_strings([320, 786]) == ["a", "man"]
    # A rare character is split over byte-level tokens, none of which is valid UTF-8 alone.
    assert clip_token_strings(tokenizer, tokenizer.encode("龘")) == ["\ufffd"] * 3


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
    padded = engine.prepare_image(_png(tall))
    assert padded.shape == (3, 384, 128) and padded.dtype == np.float32
    assert np.allclose(padded[:, :, :32], 0, atol=1e-6)  # padding = mean → 0
    assert np.allclose(padded[:, :, -32:], 0, atol=1e-6)
    assert padded[0, :, 32:96].min() > 1.0  # red content fills the middle
    cropper = load_clip(TINY.model_copy(update={"resize_mode": "crop"}))
    wide = Image.new("RGB", (400, 200), (10, 250, 10))
    cropped = cropper.prepare_image(_png(wide))
    assert cropped.shape == (3, 384, 128)
    assert cropped[1].min() > 1.0  # covers the whole frame, no padding


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _numpy_person_preprocess(img: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """The preprocessing written out in numpy: fit/cover, bicubic, place centred, normalise."""
    height, width = size
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    w, h = img.size
    scale = (min if mode == "pad" else max)(height / h, width / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    pixels = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC), np.float32) / 255
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = mean
    top, left = (height - new_h) // 2, (width - new_w) // 2
    src = pixels[max(0, -top) :, max(0, -left) :][:height, :width]
    canvas[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = (
        src
    )
    return ((canvas - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("size", [(384, 128), (128, 64), (224, 224)])
def test_person_transform_equals_a_numpy_reference(mode, size):
    """Odd margins included: the extra pixel goes where the numpy reference puts it."""
    rng = np.random.default_rng(3)
    for w, h in [(96, 256), (200, 120), (33, 101), (127, 381), (129, 383), (7, 400), (1, 1)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = person_transform(size, mode)(img)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert tuple(got.shape) == (3, *size)
        expected = _numpy_person_preprocess(img, size, mode)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_person_transform_rejects_an_unknown_mode_and_reads_model_norms(engine):
    with pytest.raises(ValueError, match="resize_mode 'stretch'"):
        person_transform((384, 128), "stretch")
    mean, std = mean_std_of(engine.model)
    np.testing.assert_allclose(mean, CLIP_MEAN)
    np.testing.assert_allclose(std, CLIP_STD)
    grey = Image.new("RGB", (64, 64), tuple(round(m * 255) for m in CLIP_MEAN))
    other = person_transform((64, 64), "pad", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(grey)
    assert abs(float(other[0].mean()) - round(CLIP_MEAN[0] * 255) / 255) < 1e-6


def test_bad_image_bytes_raise_a_clear_error(engine):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        engine.prepare_image(b"not an image")
    with pytest.raises(ImageDecodeError, match="image 1"):
        engine.pixels([_jpeg(32, 64), b"\xff\xd8 broken"])


def test_random_init_depends_only_on_the_seed(engine, images):
    """A rebuilt engine with the same seed embeds identically; another seed differs."""
    torch.manual_seed(999)  # the global RNG must not matter
    again = build_engine(TINY)
    np.testing.assert_array_equal(
        again.encode_images(images[:2]).pooled, engine.encode_images(images[:2]).pooled
    )
    other = build_engine(TINY.model_copy(update={"seed": 1}))
    assert not np.allclose(
        other.encode_images(images[:1]).pooled, engine.encode_images(images[:1]).pooled
    )


def test_engines_are_cached_per_config():
    from pedsynth.engines.cache import load_counts

    first = load_clip(TINY)
    assert load_clip(TINY.model_copy()) is first
    assert load_clip(TINY.model_copy(update={"seed": 2})) is not first
    assert sum(n for key, n in load_counts().items() if key.startswith('["clip"')) >= 2


def test_cuda_without_a_cuda_device_is_a_device_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="no CUDA device"):
        build_engine(TINY.model_copy(update={"device": "cuda"}))


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


def _tiny_small(seed: int) -> torch.nn.Module:
    import open_clip

    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    torch.manual_seed(seed)
    return open_clip.create_model("pedsynth-tiny-clip-small")


def _write_checkpoint_like_the_trainer(path, clip: torch.nn.Module) -> None:
    """The key layout of ``train-retriever``'s ``best``/``last``: the DualEncoder under
    ``model.`` (CLIP at ``model.clip.``, the identity head at ``model.classifier.``), then
    optimiser moments and a momentum copy, which a CLIP load must ignore."""
    from safetensors.torch import save_file

    tensors = {f"model.clip.{k}": v.contiguous() for k, v in clip.state_dict().items()}
    tensors["model.classifier.weight"] = torch.zeros(7, 64)
    tensors["model.classifier.bias"] = torch.zeros(7)
    tensors["optim.0.exp_avg"] = torch.ones(3)
    tensors |= {f"momentum.clip.{k}": torch.zeros_like(v) for k, v in clip.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "1"})


def test_a_train_retriever_checkpoint_loads_its_clip_strictly(tmp_path):
    trained = _tiny_small(seed=11)
    path = tmp_path / "best.safetensors"
    _write_checkpoint_like_the_trainer(path, trained)
    cfg = ClipModelConfig(
        model="pedsynth-tiny-clip-small", pretrained=str(path), image_size=(128, 64)
    )
    loaded = build_engine(cfg).model.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded[key], value), key

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors["model.clip.visual.proj"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    with pytest.raises(ClipLoadError, match="does not fit the architecture.*visual.proj"):
        build_engine(cfg.model_copy(update={"pretrained": str(broken)}))


def test_trainer_and_engine_share_the_weights_rule(tmp_path):
    from pedsynth.schemas.train import ModelConfig
    from pedsynth.train.model import create_clip

    trained = _tiny_small(seed=12)
    path = tmp_path / "best.safetensors"
    _write_checkpoint_like_the_trainer(path, trained)
    clip, tokenizer = create_clip(
        ModelConfig(name="pedsynth-tiny-clip-small", pretrained=str(path))
    )
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert tokenizer("a man").shape == (1, 77)

    pickle_file = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), pickle_file)
    with pytest.raises(ClipLoadError, match="must be a .safetensors file"):
        create_clip(ModelConfig(name="pedsynth-tiny-clip-small", pretrained=str(pickle_file)))
    folder = tmp_path / "pickled-dir"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle_file.read_bytes())
    with pytest.raises(ClipLoadError, match="only pickled weights"):
        create_clip(ModelConfig(name=f"local-dir:{folder}"))


def test_a_non_square_checkpoint_at_another_size_is_refused(tmp_path):
    path = tmp_path / "small.safetensors"
    save_safetensors(_tiny_small(seed=13), path)  # 128×64: an 8×4 grid
    with pytest.raises(ClipLoadError, match="non-square grid of 32 patches.*set image_size"):
        build_engine(ClipModelConfig(model="pedsynth-tiny-clip-small", pretrained=str(path)))


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
    with pytest.raises(ClipLoadError, match="cannot load CLIP.*not a known tag"):
        load_clip(TINY.model_copy(update={"pretrained": "no-such-tag"}))


def test_config_round_trips_through_json():
    cfg = ClipModelConfig.model_validate(json.loads(TINY.model_dump_json()))
    assert cfg == TINY and cfg.image_size == (384, 128)
