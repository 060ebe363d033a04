"""TextReID's BiGRU text stream: a word dictionary built once from frozen CLIP token
embeddings, trained without ever running the CLIP text encoder, evaluated, and restored from a
checkpoint to the same embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pedsynth.train.checkpoint import load_trained_model
from pedsynth.train.evaluate import evaluate
from pedsynth.train.loop import _end_of_epoch, prepare, train, train_epoch
from pedsynth.train.model import create_clip
from pedsynth.train.text_stream import (
    EOT,
    FIRST_WORD,
    SOT,
    UNK,
    BiGRUTextStream,
    WordTokenizer,
    build_vocabulary,
    split_words,
    word_vectors,
)
from tests.test_train_data import write_shards
from tests.test_train_loop import tiny


@pytest.fixture(scope="module")
def data(procedural_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text-stream")
    return write_shards(procedural_small, out, rewrites=True)


def bigru(data: Path, out: Path, **overrides):
    cfg = tiny(data, out, **overrides)
    model = cfg.model.model_copy(update={"text_stream": "bigru", "gru_hidden": 32})
    return cfg.model_copy(update={"model": model})


def test_word_tokenizer_layout():
    assert split_words("A man, in a RED coat's hood.") == [
        "a",
        "man",
        "in",
        "a",
        "red",
        "coat's",
        "hood",
    ]
    vocab = build_vocabulary(["A red coat.", "a blue coat"])
    assert vocab == ["a", "blue", "coat", "red"]
    ids = WordTokenizer(vocab, context_length=8)(["red coat", "a green coat"])
    assert ids.tolist() == [
        [SOT, FIRST_WORD + 3, FIRST_WORD + 2, EOT, 0, 0, 0, 0],
        [SOT, FIRST_WORD + 0, UNK, FIRST_WORD + 2, EOT, 0, 0, 0],
    ]
    # Cut to the context with EOT kept last, as open_clip does.
    assert WordTokenizer(vocab, context_length=4)(["a a a a a"]).tolist() == [
        [SOT, FIRST_WORD, FIRST_WORD, EOT]
    ]


def test_word_vectors_are_rows_of_the_token_embedding_table():
    clip, clip_tokenizer = create_clip(tiny(Path("."), Path(".")).model)
    table = clip.token_embedding.weight.detach()
    vocab = ["red", "backpack", "zzqx"]
    vectors = word_vectors(clip, clip_tokenizer, vocab)
    assert vectors.shape == (FIRST_WORD + 3, table.shape[1])
    assert torch.all(vectors[:FIRST_WORD] == 0)
    for i, word in enumerate(vocab):
        bpe = clip_tokenizer.encode(word)  # open_clip's BPE ids of the word, no SOT/EOT
        expected = table[bpe].mean(0)
        assert torch.allclose(vectors[FIRST_WORD + i], expected), word
    assert len(clip_tokenizer.encode("zzqx")) > 1  # a word of several BPE tokens: their mean


def test_pooling_ignores_padding_and_batch_layout():
    torch.manual_seed(0)
    stream = BiGRUTextStream(torch.randn(FIRST_WORD + 6, 8), embed_dim=5, hidden=4)
    tok = WordTokenizer(["a", "b", "c", "d", "e", "f"], context_length=12)
    one = stream(tok(["a b c"]))
    both = stream(tok(["a b c", "f e d c b a f e"]))
    assert torch.allclose(one[0], both[0], atol=1e-6)  # padding to a longer caption: same
    assert not torch.allclose(both[0], both[1])
    assert stream(tok([""])).isfinite().all()  # an empty caption still embeds


def test_bigru_trains_without_the_clip_text_encoder_and_round_trips(data, tmp_path):
    cfg = bigru(data, tmp_path / "run", epochs=3)
    run = prepare(cfg)
    model = run.model
    assert isinstance(run.tokenizer, WordTokenizer)
    text_calls = []
    for module in (model.clip.transformer, model.clip.ln_final, model.clip.token_embedding):
        module.register_forward_hook(lambda *_: text_calls.append(1))
    image_calls = []
    model.clip.visual.register_forward_hook(lambda *_: image_calls.append(1))
    gru_before = {k: v.clone() for k, v in model.text_stream.gru.state_dict().items()}
    vectors_before = model.text_stream.word_vectors.clone()
    clip_text_before = model.clip.transformer.resblocks[0].attn.in_proj_weight.detach().clone()

    # Gradients reach the GRU and the projection, not the frozen dictionary.
    batch = next(iter(run.loader))
    feats = model.encode_text(batch["masked_text"])
    feats.pow(2).sum().backward()
    assert model.text_stream.gru.weight_ih_l0.grad.abs().sum() > 0
    assert model.text_stream.projection.weight.grad.abs().sum() > 0
    assert not model.text_stream.word_vectors.requires_grad
    run.optimizer.zero_grad(set_to_none=True)

    losses = []
    for epoch in range(cfg.epochs):
        report = train_epoch(run, epoch)
        losses.append(report["loss"])
        _end_of_epoch(run, epoch, report)
    assert losses[-1] < losses[0], losses
    assert image_calls and not text_calls  # the CLIP text encoder never ran
    assert not torch.equal(model.text_stream.gru.weight_ih_l0, gru_before["weight_ih_l0"])
    assert torch.equal(model.text_stream.word_vectors, vectors_before)
    assert torch.equal(model.clip.transformer.resblocks[0].attn.in_proj_weight, clip_text_before)

    metrics = evaluate(model, run.test_index, **run.eval_kwargs)
    assert {"R1", "R5", "R10", "mAP", "mINP", "i2i_R1", "i2i_mAP"} <= set(metrics)
    assert 0 <= metrics["R1"] <= 100
    assert not text_calls

    # The checkpoint restores the stream: the same embeddings for the same captions.
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())
    assert meta["vocabulary"] == run.tokenizer.vocabulary
    restored, tokenizer, _ = load_trained_model(tmp_path / "run", "last")
    captions = [run.test_index.captions[c] for c in run.test_index.query_captions()[:20]]
    assert torch.equal(tokenizer(captions), run.tokenizer(captions))
    model.eval()
    with torch.no_grad():
        assert torch.equal(
            restored.encode_text(tokenizer(captions)), model.encode_text(run.tokenizer(captions))
        )
    again = evaluate(restored, run.test_index, **run.eval_kwargs)
    assert again == metrics


def test_bigru_with_cm_moco_and_nam(data, tmp_path):
    cfg = bigru(data, tmp_path / "run", epochs=1, max_steps=2)
    cfg = cfg.model_copy(
        update={
            "loss": cfg.loss.model_copy(update={"cm_moco": True, "moco_queue": 64}),
            "text": cfg.text.model_copy(update={"nam": True}),
        }
    )
    result = train(cfg)
    assert result["history"][0]["cm_moco"] > 0
    assert "R1" in result["test"]
    # Stored levels are per CLIP BPE token, not per word: NAM falls back to the constant rate.
    assert result["draws"]["nam"]["stored_noise"] == 0
