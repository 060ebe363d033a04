"""The ingest stage: a slice of a source's catalogue (or an existing shard) → pairs + rejects.

The flow plans a source into chunks (:func:`pedsynth.tasks.sources.plan_chunks`); this stage
loads, decodes and verifies each chunk's images (:func:`pedsynth.tasks.ingest.load_images`),
or re-verifies rows read from earlier pedsynth shards
(:func:`pedsynth.tasks.ingest.verify_pairs`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pedsynth.schemas.config import IngestConfig
from pedsynth.schemas.tables import CATALOG_SCHEMA
from pedsynth.tasks import ingest
from pedsynth.tasks.sources import SOURCE_LABEL_KEY


class IngestStage:
    name = "ingest"

    def __init__(self, config: IngestConfig, seed: int = 0):
        self.config = config

    def fingerprint_parts(self) -> dict[str, Any]:
        return {"ingest": self.config.model_dump(mode="json")}

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        if table.schema.names == CATALOG_SCHEMA.names:
            return ingest.load_images(table, self.config)
        label = (table.schema.metadata or {}).get(SOURCE_LABEL_KEY, b"shards").decode()
        return ingest.verify_pairs(table, self.config, label)


def build_stage(config: IngestConfig, seed: int = 0) -> IngestStage:
    return IngestStage(config, seed)
