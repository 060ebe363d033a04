"""The dataset card: front matter that ``datasets`` loads, counts that match the manifest."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pedsynth.schemas.tables import PAIRS_SCHEMA, pairs_table, rejects_table, stable_id
from pedsynth.tasks.card import write_dataset_card
from pedsynth.tasks.card_figures import THUMBNAIL_SIZE
from pedsynth.tasks.card_markdown import STAGE_COLUMNS, fmt_rate, fmt_seconds, md_escape
from pedsynth.tasks.card_stats import caption_diversity

REPO = Path(__file__).resolve().parents[1]

PIPE_CAPTION = "a man | red coat\nand black shoes"


def _jpeg(w: int, h: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (shade, 255 - shade, 80)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(split: str, person: str, image: str, caption: str, source: str, size=(12, 24)) -> dict:
    w, h = size
    return {
        "pair_id": stable_id(split, image, caption),
        "image_id": image,
        "person_id": person,
        "split": split,
        "image": {"bytes": _jpeg(w, h, len(image) * 17 % 255), "path": f"{image}.jpg"},
        "width": w,
        "height": h,
        "caption": caption,
        "caption_source": source,
        "source": f"test:ann.json#{image}",
        "generator": "test:none@0",
    }


def _write_build(out: Path, shards: dict[str, list[list[dict]]], rejects: list[dict] | None):
    """Write shards (split -> rows per shard) and rejects; return the matching manifest."""
    (out / "data").mkdir(parents=True)
    shard_entries, by_split = [], {}
    for split, per_shard in shards.items():
        n = len(per_shard)
        for i, rows in enumerate(per_shard):
            rel = f"data/{split}-{i:05d}-of-{n:05d}.parquet"
            table = pairs_table(rows) if rows else PAIRS_SCHEMA.empty_table()
            pq.write_table(table, out / rel)
            shard_entries.append({"path": rel, "split": split, "rows": len(rows), "sha256": "x"})
        rows = [r for shard in per_shard for r in shard]
        by_split[split] = {
            "pairs": len(rows),
            "images": len({r["image_id"] for r in rows}),
            "identities": len({r["person_id"] for r in rows}),
        }
    if rejects is not None:
        (out / "rejects").mkdir()
        pq.write_table(rejects_table(rejects), out / "rejects" / "ingest-00000.parquet")
    reasons = Counter(r["reason"] for r in rejects or [])
    pairs = sum(s["pairs"] for s in by_split.values())
    return {
        "name": "tiny-peds",
        "schema_version": "1.0",
        "code_version": "0.1.0+test",
        "created": "2025-01-02T03:04:05+00:00",
        "config": {
            "name": "tiny-peds",
            "sources": [{"format": "folder", "path": "/data/tiny", "name": "tiny"}],
            "write": {"card_examples": 4},
        },
        "shards": shard_entries,
        "stages": {
            "ingest": {
                "rows_in": pairs + len(rejects or []),
                "rows_out": pairs,
                "rejected": len(rejects or []),
                "rejects_by_reason": dict(reasons),
                "reused": 1,
                "shards": 2,
                "seconds": 2.46,
                "rows_per_s": 4.47,
            },
            "write": {
                "rows_in": pairs,
                "rows_out": pairs,
                "rejected": 0,
                "rejects_by_reason": {},
                "reused": 0,
                "shards": len(shard_entries),
                "seconds": 125.0,
                "rows_per_s": 1234.4,
            },
        },
        "totals": {
            "pairs": pairs,
            "images": sum(s["images"] for s in by_split.values()),
            "identities": sum(s["identities"] for s in by_split.values()),
            "rejects": len(rejects or []),
            "by_split": by_split,
        },
    }


def _full_build(out: Path) -> dict:
    train = [
        _row("train", "p1", "i1", PIPE_CAPTION, "original", (20, 40)),
        _row("train", "p1", "i1", "A woman in a blue dress.", "mllm", (20, 40)),
        _row("train", "p1", "i2", "A man with a backpack.", "rewrite"),
        _row("train", "p2", "i3", "The pedestrian wears grey trousers.", "original"),
        _row("train", "p2", "i4", "A person walking, holding an umbrella.", "mllm"),
        _row("train", "p3", "i5", "A tall man in a white shirt and jeans.", "original"),
    ]
    val = [
        _row("val", "p4", "i6", "A child in a yellow raincoat.", "original"),
        _row("val", "p4", "i7", "A child with yellow boots.", "mllm"),
        _row("val", "p5", "i8", "An old man with a cane.", "original"),
    ]
    test = [
        _row("test", "p6", "i9", "A cyclist in a green jacket.", "original"),
        _row("test", "p7", "i10", "A woman carrying a red bag.", "original"),
    ]
    rejects = [
        {"stage": "ingest", "reason": "missing_file", "source": "a#1"},
        {"stage": "ingest", "reason": "missing_file", "source": "a#2"},
        {"stage": "ingest", "reason": "too_small", "source": "a#3"},
    ]
    return _write_build(
        out, {"train": [train[:4], train[4:]], "val": [val], "test": [test]}, rejects
    )


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """Keep ``datasets`` offline and its caches under tmp_path."""
    home = tmp_path / "hf"
    for key, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
    }.items():
        monkeypatch.setenv(key, value)
    datasets = pytest.importorskip("datasets")
    # The env is read at import; patch the module values too in case it was imported earlier.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets", raising=False)
    return datasets, home / "datasets"


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "no front matter"
    return yaml.safe_load(m.group(1))


def _table_after(text: str, heading: str) -> list[list[str]]:
    """Body rows of the first Markdown table after ``heading``, split on unescaped ``|``."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([c.strip() for c in cells])
    return rows


def _load(datasets, out: Path, cache: Path):
    return datasets.load_dataset(str(out), cache_dir=str(cache))


def test_card_loads_with_datasets_and_matches_manifest(tmp_path, offline_hf):
    datasets, cache = offline_hf
    out = tmp_path / "out"
    manifest = _full_build(out)
    readme = write_dataset_card(out, manifest)
    assert readme == out / "README.md"
    text = readme.read_text()

    meta = _front_matter(text)
    assert set(meta["tags"]) >= {"person-retrieval", "text-to-image-retrieval", "pedsynth"}
    assert meta["task_categories"] and meta["size_categories"] == ["n<1K"]
    files = meta["configs"][0]["data_files"]
    assert files == [
        {"split": "train", "path": "data/train-*"},
        {"split": "validation", "path": "data/val-*"},
        {"split": "test", "path": "data/test-*"},
    ]

    dsd = _load(datasets, out, cache)
    assert {k: v.num_rows for k, v in dsd.items()} == {"train": 6, "validation": 3, "test": 2}
    first = dsd["train"][0]
    assert isinstance(first["image"], Image.Image)
    assert first["image"].size == (first["width"], first["height"]) == (20, 40)
    assert first["caption"] == PIPE_CAPTION

    # Counts tables equal the manifest.
    splits = {r[0]: r[1:4] for r in _table_after(text, "## Splits")}
    by_split = manifest["totals"]["by_split"]
    for split, hf in [("train", "train"), ("val", "validation"), ("test", "test")]:
        want = [str(by_split[split][k]) for k in ("pairs", "images", "identities")]
        assert splits[hf] == want
    t = manifest["totals"]
    assert splits["**total**"] == [str(t["pairs"]), str(t["images"]), str(t["identities"])]
    assert "Warning" not in text

    # stage | rows in | rows out | rejected | shards | reused | time | rows/s | tokens | tokens/s
    stages = {r[0]: r[1:] for r in _table_after(text, "## Pipeline stages")}
    assert stages == {
        "ingest": ["14", "11", "3", "2", "1", "2.5 s", "4.5", "—", "—"],
        "write": ["11", "11", "0", "4", "0", "2 min 05 s", "1,234", "—", "—"],
    }
    rejects = _table_after(text, "### Rejects by reason")
    assert rejects == [["ingest", "missing_file", "2"], ["ingest", "too_small", "1"]]

    sources = _table_after(text, "## Sources")
    assert sources[0][:3] == ["tiny", "folder", "`/data/tiny`"]
    assert "0.1.0+test" in text and "2025-01-02T03:04:05+00:00" in text

    # Caption stats per source present in the data.
    stats = {r[0]: r[1:] for r in _table_after(text, "## Captions")}
    # MLLM captions without a template_id are reported as the static-instruction group.
    assert set(stats) == {"original", "mllm (static)", "rewrite", "**all**"}
    assert stats["original"][0] == "7" and stats["mllm (static)"][0] == "3"
    assert stats["**all**"][0] == "11"

    # Plots are real PNGs and linked relatively.
    for name in ("caption_length", "images_per_identity", "captions_per_identity"):
        png = out / "card" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.format == "PNG" and 200 < im.width <= 800
        assert f"](card/{name}.png)" in text

    # Four evenly spaced train examples: rows 0, 1, 3, 4.
    thumbs = sorted((out / "card" / "examples").glob("*.jpg"))
    assert len(thumbs) == 4
    for thumb in thumbs:
        assert f"](card/examples/{thumb.name})" in text
        with Image.open(thumb) as im:
            assert im.format == "JPEG"
            assert im.width <= THUMBNAIL_SIZE[0] and im.height <= THUMBNAIL_SIZE[1]
    examples = _table_after(text, "## Examples")
    assert [r[1] for r in examples] == ["p1", "p1", "p2", "p2"]
    assert examples[0][3] == r"a man \| red coat<br>and black shoes"
    assert PIPE_CAPTION not in text

    # Column reference from the schema; no temp files left behind.
    columns = {r[0]: r[1] for r in _table_after(text, "## Columns")}
    assert list(columns) == [f"`{f.name}`" for f in PAIRS_SCHEMA]
    assert columns["`width`"] == "`int32`"
    assert "load_dataset(" in text and str(out.resolve()) in text
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    pandas_code = next(c for c in snippets if "pd.read_parquet" in c)
    arrow_code = next(c for c in snippets if "pads.dataset" in c)
    scope: dict = {}
    exec(pandas_code, scope)  # the snippets run as printed
    exec(arrow_code, scope)
    assert len(scope["df"]) == 6 and scope["table"].num_rows == 6
    assert not list(out.rglob("*.tmp"))


def test_no_val_no_rejects_and_empty_shards(tmp_path, offline_hf):
    datasets, cache = offline_hf
    out = tmp_path / "out"
    train = [
        _row("train", "p1", "i1", "A man in a coat.", "original"),
        _row("train", "p2", "i2", "A woman in a coat.", "original"),
        _row("train", "p2", "i3", "A woman with a hat.", "edit"),
    ]
    # train has an empty second shard; test has only an empty shard.
    manifest = _write_build(out, {"train": [train, []], "test": [[]]}, rejects=None)
    manifest["config"]["write"] = {}  # default number of examples
    for key in ("rejects_by_reason", "reused", "seconds", "rows_per_s"):
        del manifest["stages"]["ingest"][key]
    manifest["stages"]["caption"] = "not counted"  # a stage entry that is not a mapping
    text = write_dataset_card(out, manifest).read_text()

    meta = _front_matter(text)
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": ["data/train-00000-of-00002.parquet"]}
    ]
    dsd = _load(datasets, out, cache)
    assert {k: v.num_rows for k, v in dsd.items()} == {"train": 3}

    splits = {r[0]: r[1:4] for r in _table_after(text, "## Splits")}
    assert splits == {
        "train": ["3", "3", "2"],
        "test": ["0", "0", "0"],
        "**total**": ["3", "3", "2"],
    }
    assert "validation" not in splits
    assert "Empty splits, not listed for `datasets`: test." in text
    stages = {r[0]: r[1:] for r in _table_after(text, "## Pipeline stages")}
    assert stages["ingest"] == ["3", "3", "0", "2", "—", "—", "—", "—", "—"]
    assert stages["caption"] == ["—"] * 9
    assert "No rejected rows." in text
    stats = {r[0]: r[1] for r in _table_after(text, "## Captions")}
    assert stats == {"original": "2", "edit": "1", "**all**": "3"}
    assert len(list((out / "card" / "examples").glob("*.jpg"))) == 3  # all rows, fewer than 4


def test_rerun_replaces_old_thumbnails_and_empty_output(tmp_path):
    out = tmp_path / "out"
    manifest = _full_build(out)
    write_dataset_card(out, manifest)
    manifest["config"]["write"]["card_examples"] = 1
    write_dataset_card(out, manifest)
    assert len(list((out / "card" / "examples").glob("*.jpg"))) == 1

    # The manifest's counts win, and a disagreement with the data is flagged.
    manifest["totals"]["by_split"]["train"]["pairs"] = 99
    text = write_dataset_card(out, manifest).read_text()
    assert _table_after(text, "## Splits")[0][:2] == ["train", "99"]
    assert (
        "**Warning:** the manifest and the data disagree: train.pairs: manifest 99, data 6" in text
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_dataset_card(empty, {"name": "nothing"}).read_text()
    assert "configs" not in _front_matter(text)
    assert "No examples." in text and (empty / "card" / "caption_length.png").is_file()


def test_caption_diversity_hand_computed():
    captions = [
        "A man in a red coat.",  # 6 words, 20 chars
        "a MAN in a grey hoodie",  # 6 words, 22 chars, same opening as above
        "She wears blue jeans, blue shoes and a cap",  # 9 words, 42 chars
    ]
    d = caption_diversity(captions)
    assert d["count"] == 3
    assert d["mean_words"] == pytest.approx(7.0)
    assert d["median_words"] == pytest.approx(6.0)
    assert d["mean_chars"] == pytest.approx(28.0)
    assert d["distinct_openings"] == pytest.approx(2 / 3)
    # types: a man in red coat grey hoodie she wears blue jeans shoes and cap = 14 of 21
    assert d["type_token_ratio"] == pytest.approx(14 / 21)

    assert caption_diversity([None, "one two"])["count"] == 1
    assert caption_diversity([]) == {
        "count": 0,
        "mean_words": 0.0,
        "median_words": 0.0,
        "mean_chars": 0.0,
        "distinct_openings": 0.0,
        "type_token_ratio": 0.0,
    }


def test_md_escape():
    assert md_escape("a|b\r\nc\nd") == r"a\|b<br>c<br>d"
    assert md_escape("<b>&") == "&lt;b&gt;&amp;"
    assert md_escape(None) == ""


def test_stage_time_and_rate_cells():
    assert [fmt_seconds(v) for v in (None, 0.04, 4.24, 59.94, 125.0, 3599.6, 7380.0)] == [
        "—",
        "0.0 s",
        "4.2 s",
        "59.9 s",
        "2 min 05 s",
        "1 h 00 min",
        "2 h 03 min",
    ]
    assert [fmt_rate(v) for v in (None, 0.25, 99.94, 1234.4, 2_500_000.0)] == [
        "—",
        "0.2",
        "99.9",
        "1,234",
        "2,500,000",
    ]


def _damage_images(shard: Path, damaged: dict[int, bytes]) -> list[str]:
    """Replace the image bytes of some rows of ``shard``; return those rows' image ids."""
    rows = pq.read_table(shard).to_pylist()
    for i, data in damaged.items():
        rows[i]["image"] = {"bytes": data, "path": rows[i]["image"]["path"]}
    pq.write_table(pairs_table(rows), shard)
    return [rows[i]["image_id"] for i in sorted(damaged)]


def test_undecodable_example_images_are_reported_not_fatal(tmp_path):
    out = tmp_path / "out"
    manifest = _full_build(out)
    shard = out / "data" / "train-00000-of-00002.parquet"
    whole = pq.read_table(shard).column("image").to_pylist()[3]["bytes"]
    # The four examples are train rows 0, 1, 3, 4: damage rows 1 (not an image at all) and 3
    # (a JPEG cut in half).
    bad_ids = _damage_images(shard, {1: b"\xff\xd8 not really a JPEG", 3: whole[: len(whole) // 2]})
    assert bad_ids == ["i1", "i3"]

    text = write_dataset_card(out, manifest).read_text()
    examples = _table_after(text, "## Examples")
    assert [r[0] for r in examples][1:3] == ["(not decodable)", "(not decodable)"]
    assert examples[0][0].startswith("![i1](card/examples/00-i1.jpg")
    assert examples[3][0].startswith("![i4](card/examples/03-i4.jpg")
    thumbs = sorted(p.name for p in (out / "card" / "examples").glob("*.jpg"))
    assert thumbs == ["00-i1.jpg", "03-i4.jpg"]
    assert "**Warning:** 2 example image(s) could not be decoded" in text
    assert "damaged image bytes: `i1`, `i3`." in text


_PROBE = """
import json, sys
from pedsynth.tasks.card import write_dataset_card
write_dataset_card(sys.argv[1], json.loads(open(sys.argv[2]).read()))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib")[:1]))
"""


def _card_in_fresh_process(out: Path, manifest: dict, tmp_path: Path) -> list[str]:
    """Write the card in a new interpreter; return the matplotlib modules it imported (<= 1)."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_card_without_plots_does_not_import_matplotlib(tmp_path):
    out = tmp_path / "out"
    manifest = _full_build(out)
    assert _card_in_fresh_process(out, manifest, tmp_path) == ["matplotlib"]  # the probe works
    assert (out / "card" / "caption_length.png").is_file()

    manifest["config"]["write"]["card_plots"] = False
    assert _card_in_fresh_process(out, manifest, tmp_path) == []
    text = (out / "README.md").read_text()
    assert ".png" not in text and "## Identities" not in text
    assert not list((out / "card").glob("*.png"))  # the earlier card's plots are gone
    assert len(list((out / "card" / "examples").glob("*.jpg"))) == 4  # examples stay


def _parquet_rows(folder: Path, *, rejects: bool = False) -> int:
    files = [p for p in folder.glob("*.parquet") if p.name.endswith(".rejects.parquet") == rejects]
    assert files, f"no shards in {folder}"
    return sum(pq.read_metadata(p).num_rows for p in files)


def test_card_of_a_real_write_shows_counts_that_match_the_files(tmp_path):
    """Ingest and write through the real functions; the card's stage rows match the Parquet."""
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import BuildConfig
    from pedsynth.schemas.manifest import StageCounts
    from pedsynth.tasks import sources, write

    bench = tmp_path / "bench"
    generate(bench, identities=6, images_per_identity=2, seed=1, workers=1)
    records = json.loads((bench / "reid_raw.json").read_text())
    (bench / "imgs" / records[0]["file_path"]).unlink()  # one missing_file reject at ingest
    people = tmp_path / "people" / "alice"
    people.mkdir(parents=True)
    for k in range(2):  # captionless images: two uncaptioned rejects at write
        (people / f"{k}.jpg").write_bytes(_jpeg(20, 40, 60 * k))
    out = tmp_path / "out"
    cfg = BuildConfig.model_validate(
        {
            "name": "real-card",
            "out": str(out),
            "shard_rows": 5,
            "sources": [
                {"format": "cuhk-pedes", "path": str(bench)},
                {"format": "folder", "path": str(tmp_path / "people")},
            ],
        }
    )

    started = time.perf_counter()
    catalogs, shards = [], []
    for source in cfg.sources:
        chunks, catalog = sources.plan_chunks(source, out, cfg.shard_rows)
        catalogs.append(catalog)
        shards += [sources.ingest_chunk(chunk, cfg.ingest, out) for chunk in chunks]
    seconds = time.perf_counter() - started
    catalogued = _parquet_rows(out / "_work" / "catalog")
    ingest_counts = StageCounts.of(shards, rows_in=catalogued, seconds=seconds, upstream=catalogs)
    write.write_dataset(
        out,
        shards,
        [r.rejects_path for r in [*catalogs, *shards]],
        shard_rows=cfg.shard_rows,
        config=cfg.model_dump(mode="json"),
        stages={"ingest": ingest_counts},
    )
    recorded = json.loads((out / "manifest.json").read_text())["stages"]
    assert list(recorded) == ["ingest", "write"]

    text = (out / "README.md").read_text()
    cells = {
        row[0]: dict(zip(STAGE_COLUMNS[1:], row[1:], strict=True))
        for row in _table_after(text, "## Pipeline stages")
    }
    assert list(cells) == ["ingest", "write"]
    ingested = _parquet_rows(out / "_work" / "ingest")
    written = _parquet_rows(out / "data")
    # 6 identities x 2 images + 2 folder images; 2 captions per procedural image, the missing
    # image's 2 lost; the 2 folder images arrive uncaptioned and stop at write.
    assert (catalogued, ingested, written) == (14, 24, 22)
    assert (cells["ingest"]["rows in"], cells["ingest"]["rows out"]) == ("14", "24")
    assert (cells["write"]["rows in"], cells["write"]["rows out"]) == ("24", "22")
    rejected = Counter(
        pq.read_table(out / "rejects", columns=["stage"]).column("stage").to_pylist()
    )
    assert rejected == {"ingest": 1, "write": 2}
    assert (cells["ingest"]["rejected"], cells["write"]["rejected"]) == ("1", "2")
    assert cells["ingest"]["shards"] == str(len(shards)) and cells["ingest"]["reused"] == "0"
    assert cells["ingest"]["time"] == f"{round(seconds, 3):.1f} s"
    rate = float(cells["ingest"]["rows/s"].replace(",", ""))
    assert rate == pytest.approx(recorded["ingest"]["rows_per_s"], abs=0.5)
    assert recorded["write"]["seconds"] is not None
    assert re.fullmatch(r"\d+\.\d s", cells["write"]["time"])  # a time, not a dash
    assert _table_after(text, "### Rejects by reason") == [
        ["ingest", "missing_file", "1"],
        ["write", "uncaptioned", "2"],
    ]


def test_stage_table_shows_tokens_and_a_dash_for_stages_without_a_model():
    from pedsynth.schemas.manifest import StageCounts
    from pedsynth.tasks.card_markdown import stages_section

    stages = {
        "ingest": StageCounts(shards=1, rows_in=4, rows_out=8, seconds=1.0),
        "rewrite": StageCounts(
            shards=2,
            rows_in=8,
            rows_out=20,
            seconds=4.0,
            prompt_tokens=12345,
            completion_tokens=600,
        ),
    }
    dumped = {name: c.model_dump(mode="json") for name, c in stages.items()}
    text = stages_section(dumped, [], "manifest")
    cells = {
        row[0]: dict(zip(STAGE_COLUMNS[1:], row[1:], strict=True))
        for row in _table_after(text, "## Pipeline stages")
    }
    assert cells["rewrite"]["tokens (prompt / completion)"] == "12,345 / 600"
    assert cells["rewrite"]["tokens/s"] == "150"
    assert cells["ingest"]["tokens (prompt / completion)"] == "—"
    assert cells["ingest"]["tokens/s"] == "—"
