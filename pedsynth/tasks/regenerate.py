"""The one regenerate loop of the text stages: draft, check, retry with a fresh seed, reject.

A stage hands in its slots (one output each: a caption of an image, a rewrite of a caption, an
edit's re-annotation), each with its request. Per round the loop sets every pending request's
sampling seed from (stage seed, the slot's seed parts, attempt), calls the generator once for
the whole round, and runs the stage's checks in order. A check sees one draft
(:data:`Check`) or, wrapped in :class:`BatchCheck`, every draft still passing at once (a
sentence embedder scores a batch in one call). A draft that fails a check is asked again, up
to ``max_retries`` times; each discarded draft becomes a reject row ``regenerated:<reason>``
and a slot still failing after its last try a reject row ``<reason>``. A request the engine
could not answer (``generation_failed``) is an accident, not a quality decision, so it is
final at once: asking the same engine again at once would fail the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pyarrow as pa

from pedsynth.engines.text import ChatRequest, GenerationResult, Generator, derive_seed
from pedsynth.schemas.tables import PAIRS_SCHEMA, reject_row

P = TypeVar("P")

GENERATION_FAILED = "generation_failed"
# Engine answers that say the request itself cannot be served (asking again cannot help): the
# slot is rejected with that reason, a data decision, not a failure to send again.
REQUEST_PROBLEMS = frozenset({"prompt_too_long", "bad_image", "bad_request", "unsupported"})


def engine_verdict(error: str | None) -> Rejected:
    """The reject of a request the engine did not answer (``error`` is "reason: detail")."""
    detail = error or "no text and no error"
    cause = detail.split(":", 1)[0].strip()
    return Rejected(cause if cause in REQUEST_PROBLEMS else GENERATION_FAILED, detail)


REGENERATED = "regenerated:"


@dataclass(frozen=True)
class Rejected:
    """Why a draft cannot be kept: a short reason (a rejects-table value) and a detail."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Scored:
    """A passing text with the score its check gave it (the row's ``faithfulness``)."""

    text: str
    score: float


Verdict = str | Scored | Rejected


@dataclass(frozen=True)
class Slot(Generic[P]):
    """One output to produce: the stage's own data, its request (the seed is set per attempt)
    and the parts its sampling seed is derived from."""

    payload: P
    request: ChatRequest
    seed_parts: tuple[object, ...]


@dataclass(frozen=True)
class Draft(Generic[P]):
    """One attempt at a slot: the request as sent (with its seed) and what came back."""

    slot: Slot[P]
    attempt: int  # 0 for the first try
    request: ChatRequest
    result: GenerationResult

    @property
    def payload(self) -> P:
        return self.slot.payload

    @property
    def seed(self) -> int | None:
        return self.request.seed


Check = Callable[[Draft[Any], str], Verdict]
"""A check of one draft, given the text so far (cleaned by earlier checks)."""


@dataclass(frozen=True)
class BatchCheck:
    """A check of every draft of a round still passing, in one call, verdicts in order."""

    check: Callable[[Sequence[Draft[Any]], Sequence[str]], Sequence[Verdict]]


@dataclass(frozen=True)
class Kept(Generic[P]):
    draft: Draft[P]
    text: str
    score: float | None


@dataclass
class Regenerated(Generic[P]):
    """The kept drafts and the reject rows, each in the order the rounds produced them, and
    the tokens of every draft of every round, kept or not (where the engine reported them)."""

    kept: list[Kept[P]]
    rejects: list[dict[str, Any]]
    prompt_tokens: int = 0
    completion_tokens: int = 0


Describe = Callable[[Draft[Any]], tuple[dict[str, Any], str]]
"""The row a reject of this draft describes, and a note for its detail (``parent X``)."""


def regenerate(
    slots: Sequence[Slot[P]],
    generator: Generator | None,
    *,
    stage: str,
    seed: int,
    max_retries: int,
    checks: Sequence[Check | BatchCheck],
    describe: Describe,
) -> Regenerated[P]:
    """Run ``slots`` through rounds of generation and ``checks`` until each is kept or final."""
    out: Regenerated[P] = Regenerated([], [])
    pending = [(slot, 0) for slot in slots]
    if pending and generator is None:
        raise ValueError("slots to generate need a generator")
    while pending:
        requests = [
            dataclasses.replace(slot.request, seed=derive_seed(seed, *slot.seed_parts, attempt))
            for slot, attempt in pending
        ]
        results = generator.generate(requests)
        out.prompt_tokens += sum(r.prompt_tokens or 0 for r in results)
        out.completion_tokens += sum(r.completion_tokens or 0 for r in results)
        drafts = [
            Draft(slot, attempt, request, result)
            for (slot, attempt), request, result in zip(pending, requests, results, strict=True)
        ]
        verdicts = _judge(drafts, checks)
        retry: list[tuple[Slot[P], int]] = []
        for draft, verdict in zip(drafts, verdicts, strict=True):
            if not isinstance(verdict, Rejected):
                out.kept.append(Kept(draft, *verdict))
                continue
            row, note = describe(draft)
            detail = f"{verdict.detail} (try {draft.attempt + 1}, {note})"
            engine_said_no = verdict.reason == GENERATION_FAILED or not draft.result.ok
            if not engine_said_no and draft.attempt < max_retries:
                reason = REGENERATED + verdict.reason
                retry.append((draft.slot, draft.attempt + 1))
            else:
                reason = verdict.reason
            out.rejects.append(reject_row(stage, reason, detail, row))
        pending = retry
    return out


def _judge(
    drafts: Sequence[Draft[P]], checks: Sequence[Check | BatchCheck]
) -> list[Rejected | tuple[str, float | None]]:
    """Each draft's verdict: an engine failure, the first failed check, or the passing text
    with the last score a check gave it."""
    verdicts: list[Verdict] = [
        d.result.text if d.result.ok else engine_verdict(d.result.error) for d in drafts
    ]
    scores: list[float | None] = [None] * len(drafts)
    for check in checks:
        live = [i for i, v in enumerate(verdicts) if isinstance(v, str)]
        if not live:
            break
        if isinstance(check, BatchCheck):
            found = list(check.check([drafts[i] for i in live], [verdicts[i] for i in live]))
            if len(found) != len(live):
                raise ValueError(f"a batch check gave {len(found)} verdicts for {len(live)}")
        else:
            found = [check(drafts[i], verdicts[i]) for i in live]
        for i, verdict in zip(live, found, strict=True):
            if isinstance(verdict, Scored):
                verdicts[i], scores[i] = verdict.text, verdict.score
            else:
                verdicts[i] = verdict
    return [v if isinstance(v, Rejected) else (v, scores[i]) for i, v in enumerate(verdicts)]


class SlotStage:
    """The call and the retry of a stage whose output is its input plus one row per kept slot:
    a subclass implements ``_run(table, base=, only=)`` (``only``: the slot sources to send,
    None for all) and gets both entry points of the stage contract."""

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        return self._run(table, base=table, only=None)

    def retry(
        self, table: pa.Table, earlier: pa.Table, failed: frozenset[str]
    ) -> tuple[pa.Table, pa.Table]:
        """Send again only the slots in ``failed``; keep ``earlier``'s rows."""
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        return self._run(table, base=earlier.cast(PAIRS_SCHEMA), only=failed)

    def _run(
        self, table: pa.Table, *, base: pa.Table, only: frozenset[str] | None
    ) -> tuple[pa.Table, pa.Table]:
        raise NotImplementedError
