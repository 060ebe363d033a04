"""The caption stage: an MLLM writes K captions per image (MLLM4Text-ReID's Template-based
Diversity Enhancement).

Each request carries either the static instruction or the template-guided one with a template
from the bank; which one, and which template, is drawn from (seed, image_id, k) alone, so a
rerun asks the same questions. Outputs are checked (:func:`check_generated`): empty, not text,
a leaked template slot, a refusal, too short or too long, repetitive. A failed output is asked
again with a new sampling seed, up to ``max_retries`` times; each discarded draft becomes a
reject row ``regenerated:<reason>`` and an output still failing after the last try a reject
row ``<reason>``, so the counts of passes, regenerations and rejects are all in the data.

Rows: one new row per accepted caption, ``caption_source=mllm``, ``parent_id`` null (the caption
describes the image, not another caption), ``template_id`` (null for the static instruction),
``generator``, ``prompt_hash`` (of the instruction file, plus the template text when there is
one), ``seed`` (the sampling seed of the accepted draft), ``pair_id = stable_id(image_id,
"mllm", k, template_id, caption)``. Input rows pass through unchanged, except an image's
uncaptioned placeholder row (caption null), which is dropped once the image has a caption.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.text import ChatRequest, GenerationResult, derive_seed, get_generator
from pedsynth.prompts import SLOT_LEAK_MARKERS, content_hash, load_prompt, load_templates
from pedsynth.schemas.tables import PAIRS_SCHEMA, pairs_table, rejects_table, stable_id
from pedsynth.schemas.text import CaptionConfig

CHECKS_VERSION = "1"  # bump when check_generated changes what it accepts

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:not|'t)|i am unable|i'm unable|"
    r"unable to (?:describe|determine|see|identify|help)|as an ai|cannot (?:describe|determine|"
    r"identify|help|see)|no person (?:is )?(?:visible|in the image))",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_PREAMBLE = re.compile(r"^(?:rewritten caption|caption|description)\s*:\s*", re.IGNORECASE)
_PLACEHOLDER_SUFFIX = re.compile(r"/caption\d+$")


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def clean_generated(text: str) -> str:
    """NFC, whitespace collapsed, a leading ``Caption:`` and wrapping quotes removed."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    text = _PREAMBLE.sub("", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _repetition(words: Sequence[str]) -> str | None:
    """Why a word sequence is degenerate (a looping generation), or None."""
    lowered = [w.lower() for w in words]
    run = 1
    for prev, cur in zip(lowered, lowered[1:], strict=False):
        run = run + 1 if cur == prev else 1
        if run >= 4:
            return f"the word {cur!r} {run} times in a row"
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(lowered) - 2):
        gram = tuple(lowered[i : i + 3])
        grams[gram] = grams.get(gram, 0) + 1
        if grams[gram] >= 3:
            return f"the phrase {' '.join(gram)!r} 3 times"
    if len(lowered) >= 12 and len(set(lowered)) / len(lowered) < 0.35:
        return f"only {len(set(lowered))} distinct words of {len(lowered)}"
    return None


def check_generated(
    text: str | None,
    *,
    min_words: int,
    max_words: int,
    truncated: bool = False,
) -> str | Rejected:
    """The cleaned text of a generation, or why it cannot be a caption."""
    if text is None or not text.strip():
        return Rejected("empty", "the model returned no text")
    cleaned = clean_generated(text)
    if not any(ch.isalpha() for ch in cleaned):
        return Rejected("not_text", f"no letters: {cleaned[:80]!r}")
    for ch in cleaned:
        if ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cs"):
            return Rejected("not_text", f"control or replacement character U+{ord(ch):04X}")
    leaked = [m for m in SLOT_LEAK_MARKERS if m in cleaned]
    if leaked:
        return Rejected("template_leak", f"contains {leaked[0]!r}")
    refusal = _REFUSAL.search(cleaned)
    if refusal:
        return Rejected("refusal", f"says {refusal.group(0)!r}")
    words = _WORD.findall(cleaned)
    if len(words) < min_words:
        return Rejected("too_short", f"{len(words)} words < min_words {min_words}")
    if len(words) > max_words:
        return Rejected("too_long", f"{len(words)} words > max_words {max_words}")
    if truncated:
        return Rejected("too_long", "stopped at max_tokens before the caption ended")
    repeated = _repetition(words)
    if repeated:
        return Rejected("repetitive", repeated)
    return cleaned


def reject_row(stage: str, reason: str, detail: str, row: dict[str, Any], **extra: Any) -> dict:
    return {
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "source": row["source"],
        "image_id": row.get("image_id"),
        "pair_id": row.get("pair_id"),
        "person_id": row.get("person_id"),
        "split": row.get("split"),
        "caption": row.get("caption"),
    } | extra


def engine_failure(result: GenerationResult) -> Rejected:
    """A request the engine could not answer (after its own retries): not regenerated."""
    return Rejected("generation_failed", result.error or "no text and no error")


@dataclass
class _Job:
    """One caption slot (image, k) through its attempts."""

    image_row: dict[str, Any]
    k: int
    template_id: str | None
    prompt: str
    prompt_hash: str
    attempt: int = 0

    @property
    def image_id(self) -> str:
        return self.image_row["image_id"]


class CaptionStage:
    name = "caption"

    def __init__(self, config: CaptionConfig, seed: int):
        if config.min_words > config.max_words:
            raise ValueError("caption: min_words must not exceed max_words")
        self.config, self.seed = config, seed
        self.static = load_prompt("caption_static")
        self.guided = load_prompt("caption_template")
        self.bank = load_templates()

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "generator": self.config.engine.generator_id,
            "prompts": {"static": self.static.hash, "template": self.guided.hash},
            "templates": self.bank.hash,
            "checks": CHECKS_VERSION,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ planning

    def _job(self, image_row: dict[str, Any], k: int) -> _Job:
        image_id = image_row["image_id"]
        draw = derive_seed(self.seed, image_id, k, "template?") / 0x7FFFFFFF
        if draw < self.config.template_share and len(self.bank):
            template = self.bank.templates[
                derive_seed(self.seed, image_id, k, "template") % len(self.bank)
            ]
            prompt = self.guided.render(template=template.text)
            return _Job(image_row, k, template.id, prompt, content_hash(self.guided.hash + prompt))
        return _Job(image_row, k, None, self.static.text, self.static.hash)

    def _images(self, table: pa.Table) -> list[dict[str, Any]]:
        """The first row of each image to caption (its bytes, ids and source)."""
        light = table.select(["image_id", "caption"]).to_pylist()
        first: dict[str, int] = {}
        captioned: set[str] = set()
        for i, row in enumerate(light):
            first.setdefault(row["image_id"], i)
            if row["caption"] is not None:
                captioned.add(row["image_id"])
        wanted = [
            i
            for image_id, i in first.items()
            if not (self.config.only_uncaptioned and image_id in captioned)
        ]
        columns = ["image_id", "person_id", "split", "image", "width", "height", "source", "edit"]
        rows = table.select(columns).take(pa.array(wanted, pa.int64())).to_pylist()
        for row in rows:
            row["source"] = _PLACEHOLDER_SUFFIX.sub("", row["source"])
        return rows

    # ------------------------------------------------------------------ running

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        images = self._images(table)
        per_image = range(self.config.captions_per_image)
        pending = [self._job(row, k) for row in images for k in per_image]
        new_rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        generator = get_generator(self.config.engine, "vision") if pending else None
        while pending:
            requests = [
                ChatRequest(
                    request_id=f"{job.image_id}#{job.k}",
                    prompt=job.prompt,
                    image=job.image_row["image"]["bytes"],
                    seed=derive_seed(self.seed, job.image_id, job.k, job.attempt),
                )
                for job in pending
            ]
            results = generator.generate(requests)
            retry: list[_Job] = []
            for job, request, result in zip(pending, requests, results, strict=True):
                outcome: str | Rejected = (
                    check_generated(
                        result.text,
                        min_words=self.config.min_words,
                        max_words=self.config.max_words,
                        truncated=self.config.reject_truncated and result.finish_reason == "length",
                    )
                    if result.ok
                    else engine_failure(result)
                )
                if isinstance(outcome, str):
                    new_rows.append(self._row(job, outcome, generator.generator_id, request.seed))
                    continue
                base = job.image_row | {"caption": result.text, "pair_id": None}
                base["source"] = f"{job.image_row['source']}/mllm{job.k}"
                detail = f"{outcome.detail} (try {job.attempt + 1}, template {job.template_id})"
                can_retry = outcome.reason != "generation_failed"
                if can_retry and job.attempt < self.config.max_retries:
                    reason = f"regenerated:{outcome.reason}"
                    rejects.append(reject_row(self.name, reason, detail, base))
                    job.attempt += 1
                    retry.append(job)
                else:
                    rejects.append(reject_row(self.name, outcome.reason, detail, base))
            pending = retry
        return self._output(table, new_rows), rejects_table(rejects)

    def _row(self, job: _Job, caption: str, generator_id: str, seed: int | None) -> dict[str, Any]:
        row = job.image_row
        return {
            "pair_id": stable_id(row["image_id"], "mllm", job.k, job.template_id, caption),
            "image_id": row["image_id"],
            "person_id": row["person_id"],
            "split": row["split"],
            "image": row["image"],
            "width": row["width"],
            "height": row["height"],
            "caption": caption,
            "caption_source": "mllm",
            "source": f"{row['source']}/mllm{job.k}",
            "parent_id": None,
            "template_id": job.template_id,
            "generator": generator_id,
            "prompt_hash": job.prompt_hash,
            "seed": seed,
            "edit": row.get("edit"),
        }

    def _output(self, table: pa.Table, new_rows: list[dict[str, Any]]) -> pa.Table:
        """Input rows, minus placeholders of images that now have a caption, then new rows."""
        captioned_now = pa.array(sorted({r["image_id"] for r in new_rows}), pa.string())
        placeholder = pc.and_(
            pc.is_null(table.column("caption")),
            pc.is_in(table.column("image_id"), value_set=captioned_now),
        )
        kept = table.filter(pc.invert(placeholder))
        return pa.concat_tables([kept, pairs_table(new_rows)])


def build_stage(config: CaptionConfig, seed: int) -> CaptionStage:
    return CaptionStage(config, seed)
