"""The manifest of a build (``OUT/versions/<id>/manifest.json``) and the counts inside it.

One typed model, written by the write stage and read by the card, ``pedsynth inspect`` and the
Prefect artifacts alike, so a count means the same thing everywhere. Unknown keys in a file
are ignored on reading, so a manifest written by a newer pedsynth still loads.

Every build is a version, ``OUT/versions/<id>/`` (``data/``, ``rejects/``, card, manifest), and
``OUT/latest`` is a relative symlink naming the version readers get. :func:`resolve_build` is the
one way a reader turns the folder it was given into the build it reads: ``OUT`` resolves to the
version ``latest`` names; a version folder, or a folder written before versions existed (a
top-level ``manifest.json``), is read as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
LATEST = "latest"  # OUT/latest -> versions/<id> (a relative symlink)


def latest_version(out_dir: str | Path) -> str | None:
    """The id of the version ``OUT/latest`` names, or None when there is no pointer (on a
    store, ``latest`` is a small object holding ``versions/<id>``)."""
    from pedsynth import storage

    if storage.is_url(out_dir):
        fs, root = storage.url_fs(str(out_dir))
        try:
            return fs.cat_file(f"{root.rstrip('/')}/{LATEST}").decode().strip().rpartition("/")[2]
        except FileNotFoundError:
            return None
    link = Path(out_dir) / LATEST
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def resolve_build(out_dir: str | Path) -> Path:  # a str for a URL
    """The folder of the build a reader of ``out_dir`` reads.

    ``OUT`` with a ``latest`` pointer: the version it names (``OUT/versions/<id>``), fixed at
    the call, so a reader keeps reading one version while a new one is published. Any other
    folder (a version folder, a build made before versions, an unfinished output): itself.
    """
    from pedsynth import storage

    version = latest_version(out_dir)
    if storage.is_url(out_dir):
        url = str(out_dir).rstrip("/")
        return url if version is None else f"{url}/{VERSIONS_DIR}/{version}"  # type: ignore[return-value]
    out = Path(out_dir)
    return out if version is None else out / VERSIONS_DIR / version


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StageCounts(_Record):
    """What one stage did in one build.

    ``rows_in``: rows handed to the stage (for ingest, the image records of the annotations
    or the rows of input shards); ``rows_out``: rows it passed on; ``rejected``: reject rows it
    wrote (regenerated drafts included, by reason in ``rejects_by_reason``); ``reused``: shards
    whose output a previous run had already committed; ``seconds``: wall time of the stage.
    """

    shards: int = 0
    reused: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    requests: int = 0  # model requests (slots) of the stage's shards
    failed: int = 0  # of those, failures (the engine could not answer), not quality rejects
    prompt_tokens: int = 0  # tokens of the prompts sent (where the engine reports them)
    completion_tokens: int = 0  # tokens generated, every draft (kept or not)
    # Model cache loads during the stage: worker (host:pid) -> engine -> loads (runners.py)
    engine_loads: dict[str, dict[str, int]] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def failure_rate(self) -> float | None:
        """Failed requests over requests; None for a stage that asked no model."""
        if not self.requests and not self.failed:
            return None
        return round(self.failed / max(self.requests, self.failed), 4)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rows_per_s(self) -> float | None:
        """Input rows per second of wall time; None when nothing was computed."""
        if self.seconds <= 0 or self.reused == self.shards:
            return None
        return round(self.rows_in / self.seconds, 1)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second of wall time; None without tokens, time or any shard
        computed in this run (reused shards bring their tokens but took no time)."""
        if self.completion_tokens <= 0 or self.seconds <= 0:
            return None
        if self.shards and self.reused == self.shards:
            return None
        return round(self.completion_tokens / self.seconds, 1)

    @classmethod
    def of(
        cls,
        results: Iterable[Any],
        *,
        rows_in: int,
        seconds: float,
        upstream: Iterable[Any] = (),
    ) -> StageCounts:
        """Counts from a stage's ``ShardResult``s; ``upstream`` adds rejects found before its
        shards existed (a source's catalogue)."""
        results, upstream = list(results), list(upstream)
        reasons: dict[str, int] = {}
        for r in [*results, *upstream]:
            for reason, n in r.rejects_by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        return cls(
            shards=len(results),
            reused=sum(r.reused for r in results),
            rows_in=rows_in,
            rows_out=sum(r.rows for r in results),
            rejected=sum(r.rejected for r in [*results, *upstream]),
            rejects_by_reason=dict(sorted(reasons.items())),
            seconds=round(seconds, 3),
            requests=sum(getattr(r, "requests", 0) for r in results),
            failed=sum(getattr(r, "failed", 0) for r in results),
            prompt_tokens=sum(getattr(r, "prompt_tokens", 0) for r in results),
            completion_tokens=sum(getattr(r, "completion_tokens", 0) for r in results),
        )


class ShardEntry(_Record):
    """One final Parquet file, relative to the output folder."""

    path: str
    split: str
    rows: int
    sha256: str


class SplitTotals(_Record):
    pairs: int
    images: int
    identities: int


class Totals(_Record):
    pairs: int
    images: int
    identities: int
    rejects: int
    by_split: dict[str, SplitTotals]
    identities_in_several_splits: int = 0


class SplitChanges(_Record):
    """Pairs of one split compared with the previous version, by ``pair_id``."""

    added: int = 0
    removed: int = 0
    kept: int = 0
    changed: int = 0  # of the kept, pairs whose caption differs


class StageReuse(_Record):
    reused: int = 0  # shards a previous run had committed (the shared ``_work`` cache)
    recomputed: int = 0


class Changes(_Record):
    """What a version changed since the one ``latest`` named when it was built."""

    previous: str | None = None  # version id; None for the first version
    splits: dict[str, SplitChanges] = Field(default_factory=dict)
    stages: dict[str, StageReuse] = Field(default_factory=dict)


class Manifest(_Record):
    name: str
    schema_version: str
    code_version: str
    code_hashes: dict[str, str] = Field(default_factory=dict)  # stage -> hash of its code
    created: str
    build_fingerprint: str
    config: dict[str, Any]
    shards: list[ShardEntry]
    rejects: list[str]
    stages: dict[str, StageCounts]
    totals: Totals
    version: str = ""  # its folder's name under OUT/versions/ ("" for a build written in place)
    changes: Changes | None = None

    def save(self, out_dir: str | Path) -> None:
        from pedsynth.atomic import atomic_write_bytes

        data = json.dumps(self.model_dump(mode="json"), indent=2).encode("utf-8")
        atomic_write_bytes(data, Path(out_dir) / MANIFEST_FILE)

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest | None:
        """The manifest of the finished build ``out_dir`` resolves to (:func:`resolve_build`),
        or None when there is none."""
        from pedsynth import storage

        folder = resolve_build(out_dir)
        if storage.is_url(folder):
            fs, root = storage.url_fs(str(folder))
            try:
                return cls.model_validate_json(fs.cat_file(f"{root}/{MANIFEST_FILE}"))
            except FileNotFoundError:
                return None
        path = folder / MANIFEST_FILE
        if not path.exists():
            return None
        return cls.model_validate_json(path.read_bytes())
