"""The caption stage: output checks, template sampling, retries, rows, determinism."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pedsynth.engines.text import GenerationResult
from pedsynth.prompts import PROMPT_NAMES, load_prompt, load_templates
from pedsynth.schemas.tables import PAIRS_SCHEMA
from pedsynth.schemas.text import CaptionConfig, EngineConfig
from pedsynth.tasks import caption as caption_mod
from pedsynth.tasks.caption import CaptionStage
from pedsynth.tasks.regenerate import Rejected
from pedsynth.tasks.shards import run_shard
from pedsynth.tasks.text_checks import check_generated
from tests.text_shards import ingest_procedural, torch_threads, uncaptioned


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


TINY_VLM = EngineConfig(model="tiny-random:llava", max_tokens=24, batch_size=16)
GOOD = "A woman with long black hair wears a red coat, blue jeans and white sneakers."


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> pa.Table:
    return ingest_procedural(
        tmp_path_factory.mktemp("caption"), identities=4, images_per_identity=2
    )


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "empty"),
        ("   ", "empty"),
        ("1234 5678 !!!", "not_text"),
        ("A man in a red \x07 coat walks by.", "not_text"),
        ("A [person/woman/man] with short hair wears a coat.", "template_leak"),
        ("A man wearing [clothing description] and jeans.", "template_leak"),
        ("A man <image> wearing a blue coat and black jeans.", "template_leak"),
        ("I'm sorry, I cannot describe people in images.", "refusal"),
        ("As an AI, I am unable to see the image you sent.", "refusal"),
        ("A man walks.", "too_short"),
        (" ".join(["word"] * 3 + ["more", "words"] * 60), "too_long"),
        ("The man wears a red coat red coat red coat red coat and jeans.", "repetitive"),
        ("A man in a coat coat coat coat walks past a shop.", "repetitive"),
    ],
)
def test_bad_outputs_are_rejected_with_the_reason(text, reason):
    outcome = check_generated(text, min_words=4, max_words=80)
    assert isinstance(outcome, Rejected) and outcome.reason == reason, outcome


def test_good_output_is_cleaned_not_rejected():
    assert check_generated(f'Caption: "{GOOD}"', min_words=4, max_words=80) == GOOD
    cut = check_generated(GOOD, min_words=4, max_words=80, truncated=True)
    assert isinstance(cut, Rejected) and cut.reason == "too_long"


# ---------------------------------------------------------------- prompts


def test_template_bank_and_prompts():
    bank = load_templates()
    assert len(bank) >= 40 and len({t.id for t in bank.templates}) == len(bank)
    slots = ("[clothing description]", "[hair description]", "[footwear description]")
    slots += ("[belongings description]", "[person/woman/man]")
    for slot in slots:
        assert any(slot in t.text for t in bank.templates), slot
    hashes = {load_prompt(n).hash for n in PROMPT_NAMES}
    assert len(hashes) == len(PROMPT_NAMES) and all(len(h) == 16 for h in hashes)
    guided = load_prompt("caption_template")
    assert "[hair description]" in guided.render(template=bank.templates[0].text)
    with pytest.raises(KeyError, match="takes"):
        guided.render(caption="x")


def test_template_choice_is_deterministic_and_follows_the_share():
    cfg = CaptionConfig(engine=TINY_VLM, template_share=0.5)
    row = {"image_id": "img-1"}
    stage = CaptionStage(cfg, seed=5)
    jobs = [stage._job(row | {"image_id": f"img-{i}"}, k) for i in range(200) for k in range(2)]
    again = [
        CaptionStage(cfg, seed=5)._job(row | {"image_id": f"img-{i}"}, k)
        for i in range(200)
        for k in range(2)
    ]
    assert [j.template_id for j in jobs] == [j.template_id for j in again]
    share = sum(j.template_id is not None for j in jobs) / len(jobs)
    assert 0.4 < share < 0.6
    assert len({j.template_id for j in jobs if j.template_id}) >= 30  # the bank is used widely
    other_seed = [
        CaptionStage(cfg, seed=6)._job(row | {"image_id": f"img-{i}"}, 0) for i in range(50)
    ]
    assert [j.template_id for j in other_seed] != [j.template_id for j in jobs[::2][:50]]
    static = CaptionStage(cfg.model_copy(update={"template_share": 0.0}), seed=5)
    assert all(static._job(row, k).template_id is None for k in range(20))


# ---------------------------------------------------------------- the stage, real tiny VLM


def test_stage_with_tiny_vlm_writes_rows_and_rejects(shard):
    cfg = CaptionConfig(engine=TINY_VLM, captions_per_image=2, reject_truncated=False)
    stage = CaptionStage(cfg, seed=0)
    out, rejects = stage(shard)
    assert out.schema == PAIRS_SCHEMA
    original = out.filter(pc.equal(out["caption_source"], "original"))
    assert original.equals(shard.cast(PAIRS_SCHEMA))  # originals pass through unchanged
    mllm = out.filter(pc.equal(out["caption_source"], "mllm")).to_pylist()
    images = set(shard["image_id"].to_pylist())
    finals = [r for r in rejects.to_pylist() if not r["reason"].startswith("regenerated:")]
    # every (image, k) slot ends as exactly one row or one final reject
    assert len(mllm) + len(finals) == 2 * len(images)
    for row in mllm:
        assert row["image_id"] in images and row["parent_id"] is None
        assert row["generator"] == "transformers:tiny-random:llava@default"
        assert row["prompt_hash"] and row["seed"] is not None
        assert check_generated(row["caption"], min_words=4, max_words=90) == row["caption"]
    assert len({r["pair_id"] for r in out.to_pylist()}) == out.num_rows
    retries = [r for r in rejects.to_pylist() if r["reason"].startswith("regenerated:")]
    assert all(r["stage"] == "caption" and r["caption"] for r in retries)
    # same seed, same shard: the same rows
    again, _ = CaptionStage(cfg, seed=0)(shard)
    assert again.equals(out)


def test_only_uncaptioned_images_replace_their_placeholder(shard):
    cfg = CaptionConfig(
        engine=TINY_VLM, captions_per_image=1, only_uncaptioned=True, reject_truncated=False
    )
    out, _ = CaptionStage(cfg, seed=0)(shard)
    assert out.num_rows == shard.num_rows  # every image had captions: nothing to do
    bare = uncaptioned(shard)
    out, rejects = CaptionStage(cfg, seed=0)(bare)
    captioned = set(out.filter(pc.is_valid(out["caption"]))["image_id"].to_pylist())
    placeholders = set(out.filter(pc.is_null(out["caption"]))["image_id"].to_pylist())
    assert not captioned & placeholders  # a captioned image lost its placeholder
    assert captioned | placeholders == set(bare["image_id"].to_pylist())
    failed = {r["image_id"] for r in rejects.to_pylist() if not r["reason"].startswith("regen")}
    assert failed == placeholders


# ---------------------------------------------------------------- retries, scripted engine


class ScriptedVLM:
    """Answers each request id from a list of replies, one per attempt."""

    generator_id = "scripted:vlm@1"

    def __init__(self, script: dict[str, list[str | None]]):
        self.script, self.calls = script, []

    def generate(self, requests):
        self.calls.append([r.request_id for r in requests])
        out = []
        for r in requests:
            reply = self.script[r.request_id].pop(0)
            if reply is None:
                out.append(GenerationResult(r.request_id, None, error="timeout: gone"))
            else:
                out.append(GenerationResult(r.request_id, reply, finish_reason="stop"))
        return out


def test_failed_outputs_are_regenerated_then_rejected(shard, monkeypatch):
    three = shard.filter(pc.is_in(shard["image_id"], pa.array(shard["image_id"].unique()[:3])))
    ids = three["image_id"].unique().to_pylist()
    leak = "A [person/woman/man] in a red coat walks."
    script = {
        f"{ids[0]}#0": [GOOD],  # passes first time
        f"{ids[1]}#0": [leak, "I'm sorry, I can't help with that.", GOOD],  # passes on try 3
        f"{ids[2]}#0": [leak, leak, leak],  # fails all 3 tries
    }
    fake = ScriptedVLM(script)
    monkeypatch.setattr(caption_mod, "get_generator", lambda cfg, kind: fake)
    cfg = CaptionConfig(engine=TINY_VLM, captions_per_image=1, max_retries=2)
    out, rejects = CaptionStage(cfg, seed=0)(three)
    assert [len(c) for c in fake.calls] == [3, 2, 2]  # whole rounds, only the failed again
    reasons = sorted(rejects["reason"].to_pylist())
    assert reasons == [
        "regenerated:refusal",
        "regenerated:template_leak",
        "regenerated:template_leak",
        "regenerated:template_leak",
        "template_leak",
    ]
    mllm = out.filter(pc.equal(out["caption_source"], "mllm"))
    assert sorted(mllm["image_id"].to_pylist()) == sorted(ids[:2])
    seeds = {r["image_id"]: r["seed"] for r in mllm.to_pylist()}
    assert seeds[ids[1]] != seeds[ids[0]]  # the accepted draft's own sampling seed


def test_engine_failures_are_not_regenerated(shard, monkeypatch):
    one = shard.filter(pc.equal(shard["image_id"], shard["image_id"][0]))
    fake = ScriptedVLM({f"{one['image_id'][0].as_py()}#0": [None]})
    monkeypatch.setattr(caption_mod, "get_generator", lambda cfg, kind: fake)
    out, rejects = CaptionStage(CaptionConfig(engine=TINY_VLM, captions_per_image=1), 0)(one)
    assert rejects["reason"].to_pylist() == ["generation_failed"]
    assert "timeout" in rejects["detail"][0].as_py() and len(fake.calls) == 1
    assert out.num_rows == one.num_rows


class RecordingVLM(ScriptedVLM):
    """A scripted engine that also keeps every request it was sent."""

    def __init__(self, script):
        super().__init__(script)
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return super().generate(requests)


def test_common_instruction_sends_one_prompt_and_keeps_the_opening(shard, monkeypatch):
    two = shard.filter(pc.is_in(shard["image_id"], shard["image_id"].unique()[:2]))
    first, second = two["image_id"].unique().to_pylist()
    fake = RecordingVLM(
        {
            f"{first}#0": ["wearing a red coat, blue jeans and white sneakers."],
            f"{second}#0": ["The person in the image is a man with short black hair."],
        }
    )
    monkeypatch.setattr(caption_mod, "get_generator", lambda cfg, kind: fake)
    cfg = CaptionConfig(engine=TINY_VLM, captions_per_image=1, instruction="common")
    out, rejects = CaptionStage(cfg, seed=0)(two)
    assert rejects.num_rows == 0
    prompt = load_prompt("caption_common")
    assert {r.prompt for r in fake.requests} == {prompt.text}  # one prompt for every image
    mllm = {r["image_id"]: r for r in out.to_pylist() if r["caption_source"] == "mllm"}
    assert mllm[first]["caption"] == (
        "The person in the image is wearing a red coat, blue jeans and white sneakers."
    )
    assert mllm[second]["caption"] == "The person in the image is a man with short black hair."
    assert {r["prompt_hash"] for r in mllm.values()} == {prompt.hash}
    assert {r["template_id"] for r in mllm.values()} == {None}


def test_common_instruction_refuses_a_template_share():
    with pytest.raises(ValueError, match="template_share does not apply"):
        CaptionConfig(engine=TINY_VLM, instruction="common", template_share=0.5)


def test_a_retry_captions_only_the_failed_images_and_replaces_their_placeholders(
    shard, monkeypatch, tmp_path
):
    bare = uncaptioned(shard.filter(pc.is_in(shard["image_id"], shard["image_id"].unique()[:2])))
    first, second = bare["image_id"].unique().to_pylist()
    fake = ScriptedVLM({f"{first}#0": [GOOD], f"{second}#0": [None, GOOD]})
    monkeypatch.setattr(caption_mod, "get_generator", lambda cfg, kind: fake)
    stage = CaptionStage(CaptionConfig(engine=TINY_VLM, captions_per_image=1), seed=0)

    def run():
        retry = lambda earlier, failed: stage.retry(bare, earlier, failed)  # noqa: E731
        return run_shard(tmp_path, "caption", "k", "fp", lambda: stage(bare), retry=retry)

    failed_once, retried = run(), run()
    assert (failed_once.failed, retried.failed, retried.attempt) == (1, 0, 2)
    assert fake.calls == [[f"{first}#0", f"{second}#0"], [f"{second}#0"]]
    out = pq.read_table(retried.path)
    assert out.filter(pc.is_null(out["caption"])).num_rows == 0  # no placeholder is left
    assert sorted(out["image_id"].to_pylist()) == sorted([first, second])
    assert pq.read_table(retried.rejects_path)["reason"].to_pylist() == [
        "retried:generation_failed"
    ]


# ---------------------------------------------------------------- the offline config, end to end


def test_offline_tiny_config_runs_the_text_stages(prefect_server, procedural_small, tmp_path):
    """configs/offline-tiny.yaml: caption + rewrite + faithfulness with tiny random models."""
    import json

    import pyarrow.parquet as pq

    from pedsynth.flows.build_dataset import build_dataset

    out = tmp_path / "out"

    def build() -> dict:
        return build_dataset(
            config="configs/offline-tiny.yaml",
            sources=[f"cuhk-pedes:{procedural_small}"],
            out=str(out),
            overrides=["shard_rows=100"],
        )

    manifest = build()
    annotations = json.loads((procedural_small / "reid_raw.json").read_text())
    n_images = len(annotations)
    n_captions = sum(len(r["captions"]) for r in annotations)
    data = pq.read_table(out / "latest" / "data")
    by_source = data.group_by("caption_source").aggregate([("pair_id", "count")]).to_pylist()
    counts = {r["caption_source"]: r["pair_id_count"] for r in by_source}
    assert counts["original"] == n_captions
    assert manifest["totals"]["pairs"] == data.num_rows == sum(counts.values())

    stages = manifest["stages"]
    finals = {
        name: sum(n for r, n in stages[name]["rejects_by_reason"].items() if ":" not in r)
        for name in ("caption", "rewrite")
    }
    # K = 1 per image and per original caption: each slot is one row or one final reject.
    assert counts.get("mllm", 0) + finals["caption"] == n_images
    assert counts.get("rewrite", 0) + finals["rewrite"] == n_captions
    assert counts.get("mllm", 0) > 0  # noise that passes the caption checks
    # Tiny random text is noise: the real MiniLM filter rejects (nearly) all rewrites.
    assert stages["rewrite"]["rejects_by_reason"].get("unfaithful", 0) > 0
    assert counts.get("rewrite", 0) <= 0.1 * n_captions

    mllm = data.filter(pc.equal(data["caption_source"], "mllm")).to_pylist()
    bank = {t.id for t in load_templates().templates}
    for row in mllm:
        assert row["generator"] == "transformers:tiny-random:llava@default"
        assert row["template_id"] is None or row["template_id"] in bank
        assert row["prompt_hash"] and row["seed"] is not None and row["parent_id"] is None
    card = (out / "latest" / "README.md").read_text()
    assert "mllm (static)" in card and "templates used" in card

    work = sorted(p.name for p in (out / "_work").rglob("*.parquet"))
    again = build()  # every stage output is found by its fingerprint: nothing is recomputed
    assert again["reused"] and sorted(p.name for p in (out / "_work").rglob("*.parquet")) == work
    assert pq.read_table(out / "latest" / "data").sort_by("pair_id").equals(data.sort_by("pair_id"))
