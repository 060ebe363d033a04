"""Caption diversity measures on hand-made caption lists, and their place in the dataset card."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pedsynth.diversity import (
    DiversitySample,
    caption_diversity,
    distinct_openings,
    sampled_ttr,
    self_bleu,
)
from pedsynth.schemas.tables import PAIRS_SCHEMA
from pedsynth.tasks.card_markdown import captions_section
from pedsynth.tasks.card_stats import scan_build


def test_self_bleu_bounds():
    assert self_bleu(["a man in a red coat walks"] * 4) == pytest.approx(1.0)
    assert self_bleu(["one two three four", "five six seven eight", "nine ten eleven twelve"]) == 0
    assert self_bleu(["only one caption here"]) == 0.0


def test_self_bleu_worked_by_hand():
    caps = ["the man wears a red coat", "the man wears a blue coat", "she has long hair and a bag"]
    # caption 1 against the others: 1-grams 5/6 (all but "red"), 2-grams 3/5 (the man, man
    # wears, wears a), 3-grams 2/4, 4-grams 1/3 (the man wears a); closest reference length 6,
    # so no brevity penalty: (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25. Caption 2 is the
    # mirror image; caption 3 shares no 4-gram: 0.
    one = (1 / 12) ** 0.25
    assert self_bleu(caps) == pytest.approx((2 * one + 0) / 3)
    # the brevity penalty: "a red coat on" (4 words) is a prefix of the other caption (6
    # words): precisions all 1, closest reference 6 words: exp(1 - 6/4). The longer one:
    # 1-grams 4/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, no penalty: (1/15) ** (1/4).
    assert self_bleu(["a red coat on", "a red coat on him now"]) == pytest.approx(
        (math.exp(1 - 6 / 4) + (1 / 15) ** 0.25) / 2
    )


def test_type_token_ratio_over_fixed_windows():
    # 4 captions x 3 words, windows of 6 words; whatever the seeded order, a window is two
    # captions: {red, coat, and one word of each} = 4 types of 6 tokens
    caps = ["red coat one", "red coat two", "red coat three", "red coat four"]
    ttr, windows = sampled_ttr(caps, window=6, seed=0)
    assert windows == 2 and ttr == pytest.approx(4 / 6)
    # fewer words than a window: the TTR of all words, and 0 windows
    assert sampled_ttr(["red coat", "red hat"], window=1000) == (pytest.approx(3 / 4), 0)
    # a trailing part window is left out: 7 words, window 3 -> two windows of three
    ttr, windows = sampled_ttr(["a a a b b b c"], window=3)
    assert windows == 2 and ttr == pytest.approx(1 / 3)


def test_openings_and_templates():
    caps = ["A man in red.", "a MAN IN blue", "She wears a coat", "She wears a hat"]
    assert distinct_openings(caps) == pytest.approx(2 / 4)
    d = caption_diversity(caps, ["t1", "t1", "t2", None], window=4)
    assert d["templates_used"] == 2 and d["captions"] == 4
    assert d["distinct_openings"] == pytest.approx(0.5)


def test_the_sample_is_bounded_and_independent_of_batching():
    a, b = DiversitySample(size=50, seed=3), DiversitySample(size=50, seed=3)
    caps = [f"caption number {i} of the stream" for i in range(400)]
    for c in caps:
        a.add(c)
    for c in caps[:123]:
        b.add(c)
    for c in caps[123:]:
        b.add(c)
    assert a.captions == b.captions and len(a.captions) == 50 and a.count == 400
    other = DiversitySample(size=50, seed=4)
    for c in caps:
        other.add(c)
    assert other.captions != a.captions  # another seed, another sample


def test_card_shows_diversity_per_caption_source(tmp_path):
    rows = []
    for i in range(6):
        for k, (cap, source, tid) in enumerate(
            [
                (f"a man number {i} in a red coat", "original", None),
                ("a person in a grey coat walks by", "mllm", None),  # identical: Self-BLEU 1
                (f"template {i} says word{i} alone here", "mllm", f"t{i % 3}"),
            ]
        ):
            rows.append(
                {
                    "pair_id": f"p{i}-{k}",
                    "image_id": f"img{i}",
                    "person_id": f"id{i}",
                    "split": "train",
                    "caption": cap,
                    "caption_source": source,
                    "template_id": tid,
                }
            )
    # the columns the card scans, with the pairs schema's types
    schema = pa.schema([PAIRS_SCHEMA.field(name) for name in rows[0]])
    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        tmp_path / "data" / "train-00000-of-00001.parquet",
    )
    text = captions_section(scan_build(tmp_path))
    assert "### Diversity" in text and "Self-BLEU" in text
    lines = text.split("### Diversity")[1].splitlines()
    static = next(line for line in lines if line.startswith("| mllm (static)"))
    cells = [c.strip() for c in static.strip("|").split("|")]
    # captions, distinct openings (one of six), TTR of all 48 words (7 types), Self-BLEU 1
    assert cells[1:5] == ["6", "0.167", f"{7 / 48:.3f} (all words)", "1.000"]
    templated = next(line for line in lines if line.startswith("| mllm (template)"))
    assert templated.rstrip(" |").endswith("3")  # t0, t1, t2
