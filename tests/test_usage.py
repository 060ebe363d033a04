"""Token usage from the engine to the shard's metadata, the stage counts and the card."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.manifest import StageCounts
from pedsynth.schemas.text import EngineConfig, OpenAIOptions, RewriteConfig
from pedsynth.tasks.card_markdown import STAGE_COLUMNS, stages_section
from pedsynth.tasks.stages import run_shard_stage
from tests.fake_openai_server import FakeOpenAIServer, TinyChatModel
from tests.text_shards import ingest_procedural, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@dataclass(frozen=True)
class _Input:
    """A shard handed to a stage: an ingested procedural table held in memory."""

    key: str
    table: pa.Table

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def content_fingerprint(self) -> str:
        return f"usage-test-{self.key}"

    def read(self) -> pa.Table:
        return self.table


def _rows_after(text: str, heading: str) -> list[list[str]]:
    lines = text.split(heading, 1)[1].strip().splitlines()
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line[:1] == "|"
    ]


def test_a_stage_records_every_drafts_tokens_and_a_reused_shard_reads_them_back(tmp_path):
    shard = _Input("s0", ingest_procedural(tmp_path / "in", identities=3, images_per_identity=1))
    doomed = f"{shard.table['pair_id'][0].as_py()}#0"
    server = FakeOpenAIServer(TinyChatModel(max_new_tokens=6), faults_by_request={doomed: "500"})
    url = server.start()
    try:
        options = OpenAIOptions(base_url=url, api_key_env=None, retries=0, backoff_s=0.01)
        engine = EngineConfig(backend="openai", model="tiny", max_tokens=8, openai=options)
        # min_words above what 6 tokens can say: most drafts are discarded and asked again.
        cfg = RewriteConfig(engine=engine, min_words=4, max_retries=2, alpha=None)
        first = run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
        answered = [rec for rec in server.records if rec.outcome == "ok"]
        sent = len(server.records)
        server.faults_by_request.clear()  # the server is healthy again
        again = run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
    finally:
        server.stop()

    assert not first.reused and first.failed == 1
    rejects = pq.read_table(first.rejects_path, columns=["reason"])["reason"].to_pylist()
    assert any(r.startswith("regenerated:") for r in rejects)  # discarded drafts counted too
    assert len(answered) > first.requests - 1  # more drafts than slots: retries happened
    assert first.prompt_tokens == sum(rec.usage["prompt_tokens"] for rec in answered) > 0
    assert first.completion_tokens == sum(rec.usage["completion_tokens"] for rec in answered) > 0
    # Rerun: a shard with a failure sends its failed slot again (its attempt 2), and records
    # the tokens of that attempt's drafts only.
    assert not again.reused and again.attempt == 2
    retried = [rec for rec in server.records[sent:] if rec.outcome == "ok"]
    assert {rec.request_id for rec in retried} == {doomed}  # only the failed slot, and its retries
    assert again.completion_tokens == sum(rec.usage["completion_tokens"] for rec in retried)
    metadata = pq.read_schema(again.path).metadata
    assert int(metadata[b"pedsynth.completion_tokens"]) == again.completion_tokens

    counts = StageCounts.of([again], rows_in=shard.rows, seconds=2.0)
    assert (counts.prompt_tokens, counts.completion_tokens) == (
        again.prompt_tokens,
        again.completion_tokens,
    )
    dumped = counts.model_dump(mode="json")
    text = stages_section({"rewrite": dumped}, [], "manifest")
    (row,) = _rows_after(text, "## Pipeline stages")
    cells = dict(zip(STAGE_COLUMNS, row, strict=True))
    prompt, completion = (
        int(n.replace(",", "")) for n in cells["tokens (prompt / completion)"].split(" / ")
    )
    assert (prompt, completion) == (again.prompt_tokens, again.completion_tokens)
    assert float(cells["tokens/s"].replace(",", "")) == pytest.approx(
        again.completion_tokens / 2.0, abs=0.05
    )


def test_a_reused_shard_reads_its_token_sums_back(tmp_path):
    shard = _Input("s1", ingest_procedural(tmp_path / "in", identities=2, images_per_identity=1))
    server = FakeOpenAIServer(TinyChatModel(max_new_tokens=6))
    url = server.start()
    try:
        options = OpenAIOptions(base_url=url, api_key_env=None, retries=0)
        engine = EngineConfig(backend="openai", model="tiny", max_tokens=8, openai=options)
        cfg = RewriteConfig(engine=engine, min_words=1, max_retries=0, alpha=None)
        first = run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
        sent = len(server.records)
        again = run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
    finally:
        server.stop()
    assert not first.reused and again.reused and len(server.records) == sent
    assert first.completion_tokens == sum(r.usage["completion_tokens"] for r in server.records)
    assert first.prompt_tokens > 0 and first.completion_tokens > 0
    assert (again.prompt_tokens, again.completion_tokens) == (
        first.prompt_tokens,
        first.completion_tokens,
    )


def test_stage_counts_sum_tokens_and_rate_only_what_was_computed():
    from pedsynth.tasks.shards import ShardResult

    def shard(reused: bool, prompt: int, completion: int) -> ShardResult:
        return ShardResult(
            "rewrite",
            "k",
            "fp",
            "p",
            "r",
            rows=1,
            rejected=0,
            reused=reused,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )

    counts = StageCounts.of([shard(False, 100, 30), shard(True, 50, 20)], rows_in=2, seconds=5.0)
    assert (counts.prompt_tokens, counts.completion_tokens, counts.tokens_per_s) == (150, 50, 10.0)
    assert StageCounts.of([shard(True, 50, 20)], rows_in=1, seconds=1.0).tokens_per_s is None
    assert StageCounts(completion_tokens=0, seconds=3.0).tokens_per_s is None
    assert StageCounts(completion_tokens=9, seconds=0.0).tokens_per_s is None
    loaded = StageCounts.model_validate_json(counts.model_dump_json())
    assert (loaded.completion_tokens, loaded.tokens_per_s) == (50, 10.0)
