"""Failures are not rejects: they are sent again by the next run, they count against a failure
budget, and transport settings do not decide what is reused."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.text import EngineConfig, OpenAIOptions, RewriteConfig, VLLMOptions
from pedsynth.tasks import sources, stages
from pedsynth.tasks.shards import MAX_ATTEMPTS
from tests.fake_openai_server import FakeOpenAIServer, TinyChatModel


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig

    root = tmp_path_factory.mktemp("failures")
    generate(root / "bench", identities=3, images_per_identity=1, seed=5)
    source = SourceConfig(format="cuhk-pedes", path=str(root / "bench"))
    chunks, _ = sources.plan_chunks(source, root / "out", 100_000)
    return sources.ingest_chunk(chunks[0], IngestConfig(), root / "out")


@pytest.fixture(scope="module")
def model():
    return TinyChatModel(max_new_tokens=6)


def _rewrite(url: str, **openai: object) -> RewriteConfig:
    settings = {"retries": 0, "backoff_s": 0.0, **openai}
    options = OpenAIOptions(base_url=url, api_key_env=None, **settings)
    engine = EngineConfig(backend="openai", model="tiny", max_tokens=8, openai=options)
    return RewriteConfig(engine=engine, min_words=1, max_retries=0, alpha=None, attributes=False)


def _failing_everything(model, shard) -> FakeOpenAIServer:
    doomed = {f"{pid}#0": "500" for pid in shard.read(["pair_id"])["pair_id"].to_pylist()}
    return FakeOpenAIServer(model, faults_by_request=doomed)


def test_failed_requests_are_sent_again_by_the_next_run(ingested, model, tmp_path):
    server = _failing_everything(model, ingested)
    url = server.start()
    try:
        first = stages.run_shard_stage("rewrite", _rewrite(url), 0, ingested, tmp_path)
        parents = ingested.rows
        assert (first.requests, first.failed, first.attempt) == (parents, parents, 1)
        assert first.rejects_by_reason == {"generation_failed": parents}

        server.faults_by_request.clear()  # the server is healthy again
        # Other transport settings: the same output name, so the same shard is retried.
        tuned = _rewrite(url, max_concurrency=3, timeout_s=30.0)
        second = stages.run_shard_stage("rewrite", tuned, 0, ingested, tmp_path)
        assert second.path == first.path and not second.reused
        assert (second.failed, second.attempt) == (0, 2)
        sources_out = pq.read_table(second.path, columns=["caption_source"])["caption_source"]
        rewritten = sources_out.to_pylist().count("rewrite")
        final = {k: v for k, v in second.rejects_by_reason.items() if not k.startswith("retried:")}
        assert rewritten + sum(final.values()) == parents  # every slot answered and judged
        assert second.rejects_by_reason["retried:generation_failed"] == parents
        assert second.content_fingerprint() != first.content_fingerprint()  # downstream redoes
        sent = len(server.records)

        third = stages.run_shard_stage("rewrite", tuned, 0, ingested, tmp_path)
        assert third.reused and len(server.records) == sent  # nothing failed: nothing resent
    finally:
        server.stop()


def _rows(path) -> list[tuple]:
    table = pq.read_table(path, columns=["pair_id", "caption", "source", "seed"])
    return sorted(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


def test_a_retry_sends_only_the_failed_slots_and_ends_as_if_nothing_had_failed(
    ingested, model, tmp_path
):
    parents = ingested.read(["pair_id"])["pair_id"].to_pylist()
    doomed = {f"{pid}#0": "500" for pid in parents[:2]}  # two of the shard's slots fail
    server = FakeOpenAIServer(model, faults_by_request=doomed)
    url = server.start()
    try:
        first = stages.run_shard_stage("rewrite", _rewrite(url), 0, ingested, tmp_path / "a")
        assert (first.requests, first.failed) == (len(parents), 2)
        server.faults_by_request.clear()
        sent_before = len(server.records)
        second = stages.run_shard_stage("rewrite", _rewrite(url), 0, ingested, tmp_path / "a")
        resent = [r.request_id for r in server.records[sent_before:]]
        clean = stages.run_shard_stage("rewrite", _rewrite(url), 0, ingested, tmp_path / "b")
    finally:
        server.stop()
    assert sorted(resent) == sorted(doomed)  # only the failed slots, each once
    assert (second.requests, second.failed, second.attempt) == (len(parents), 0, 2)
    assert _rows(second.path) == _rows(clean.path)  # the same rows as a run without failures
    rejects = pq.read_table(second.rejects_path).to_pylist()
    history = [r for r in rejects if r["reason"].startswith("retried:")]
    assert [r["reason"] for r in history] == ["retried:generation_failed"] * 2
    clean_rejects = pq.read_table(clean.rejects_path).to_pylist()
    final = [(r["source"], r["reason"]) for r in rejects if r not in history]
    assert sorted(final) == sorted((r["source"], r["reason"]) for r in clean_rejects)
    parent_sources = ingested.read(["source"])["source"].to_pylist()[:2]
    assert sorted(r["source"] for r in history) == sorted(f"{s}/rewrite0" for s in parent_sources)


def test_failures_become_final_after_the_last_attempt(ingested, model, tmp_path):
    server = _failing_everything(model, ingested)
    url = server.start()
    try:
        runs = [
            stages.run_shard_stage("rewrite", _rewrite(url), 0, ingested, tmp_path)
            for _ in range(MAX_ATTEMPTS + 1)
        ]
    finally:
        server.stop()
    assert [r.attempt for r in runs] == [*range(1, MAX_ATTEMPTS + 1), MAX_ATTEMPTS]
    assert [r.reused for r in runs] == [False] * MAX_ATTEMPTS + [True]
    assert runs[-1].failed == ingested.rows
    assert len(server.records) == MAX_ATTEMPTS * ingested.rows
    # Each slot ends with one final failure and the earlier ones as its history.
    reasons = pq.read_table(runs[-1].rejects_path, columns=["reason"])["reason"].to_pylist()
    assert reasons.count("generation_failed") == ingested.rows
    assert reasons.count("retried:generation_failed") == (MAX_ATTEMPTS - 1) * ingested.rows


def test_transport_settings_leave_the_fingerprint_and_sampling_settings_do_not():
    def fp(cfg: RewriteConfig) -> str:
        stage = stages.get_stage("rewrite", cfg, 0)
        return stages.stage_fingerprint("rewrite", stage, "input")

    base = fp(_rewrite("http://127.0.0.1:1/v1"))
    moved = _rewrite("http://127.0.0.2:8000/v1", max_concurrency=64, timeout_s=5.0, retries=7)
    assert fp(moved) == base
    hotter = _rewrite("http://127.0.0.1:1/v1")
    hotter = hotter.model_copy(
        update={"engine": hotter.engine.model_copy(update={"temperature": 0.2})}
    )
    assert fp(hotter) != base


def test_vllm_scheduling_arguments_leave_the_fingerprint_and_model_arguments_do_not():
    def fp(engine_args: dict) -> str:
        vllm = VLLMOptions(engine_args=engine_args)
        engine = EngineConfig(backend="vllm", model="/models/tiny", vllm=vllm)
        cfg = RewriteConfig(engine=engine, alpha=None, attributes=False)
        return stages.stage_fingerprint("rewrite", stages.get_stage("rewrite", cfg, 0), "input")

    base = fp({})
    scheduling = {"max_num_batched_tokens": 16384, "max_num_seqs": 8, "enable_prefix_caching": True}
    assert fp(scheduling) == base
    assert fp({"quantization": "fp8"}) != base  # changes what the model computes


def _cli_build(procedural_small, out, api_url, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pedsynth.cli", "build"]
    cmd += ["--source", f"cuhk-pedes:{procedural_small}", "--out", str(out)]
    engine = "{backend: openai, model: tiny, openai: {base_url: 'http://127.0.0.1:9/v1', "
    engine += "api_key_env: null, retries: 0}}"
    cmd += ["--set", f"rewrite={{engine: {engine}, alpha: null}}", *extra]
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_stage_over_its_failure_budget_fails_the_build(
    prefect_server, procedural_small, tmp_path
):
    """Every request to a dead endpoint fails: exit 3 and one line naming stage, share, cause;
    with the budget raised to 100% the same build completes with a warning."""
    out = tmp_path / "out"
    over = _cli_build(procedural_small, out, prefect_server)
    assert over.returncode == 3, over.stderr[-3000:]
    errors = [line for line in over.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, over.stderr[-3000:]
    assert (
        "rewrite:" in errors[0] and "requests failed (100.0%; max_failure_rate 5.0%)" in errors[0]
    )
    assert "connection_error" in errors[0]
    assert not (out / "latest" / "manifest.json").exists()

    tolerated = _cli_build(procedural_small, out, prefect_server, "--set", "max_failure_rate=1")
    assert tolerated.returncode == 0, tolerated.stderr[-3000:]
    assert "warning: rewrite:" in tolerated.stdout
    manifest = pq.read_table(out / "latest" / "rejects").to_pylist()
    # The second build sent the failed requests again: their first failure is history.
    reasons = {r["reason"] for r in manifest if r["stage"] == "rewrite"}
    assert reasons == {"generation_failed", "retried:generation_failed"}
