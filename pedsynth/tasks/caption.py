"""The caption stage: an MLLM writes K captions per image (MLLM4Text-ReID's Template-based
Diversity Enhancement).

Each request carries either the static instruction or the template-guided one with a template
from the bank; which one, and which template, is drawn from (seed, image_id, k) alone, so a
rerun asks the same questions. With ``instruction: common`` every request carries MLLMReID's
Common Instruction instead: one prompt for every image that ends in the opening of a caption
(``caption_common.txt``'s last line), which the model continues; the caption is that opening
plus the continuation (unless the model repeated the opening itself).

Outputs go through the shared regenerate loop (:mod:`pedsynth.tasks.regenerate`) with the
generic caption checks
(:func:`pedsynth.tasks.text_checks.check_generated`): a failed output is asked again with a new
sampling seed, up to ``max_retries`` times; each discarded draft becomes a reject row
``regenerated:<reason>`` and an output still failing after the last try a reject row
``<reason>``, so the counts of passes, regenerations and rejects are all in the data.

Rows: one new row per accepted caption, ``caption_source=mllm``, ``parent_id`` null (the caption
describes the image, not another caption), ``template_id`` (null for the static instruction),
``generator``, ``prompt_hash`` (of the instruction file, plus the template text when there is
one), ``seed`` (the sampling seed of the accepted draft), ``pair_id = stable_id(image_id,
"mllm", k, template_id, caption)``. Input rows pass through unchanged, except an image's
uncaptioned placeholder row (caption null), which is dropped once the image has a caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.text import ChatRequest, derive_seed, get_generator
from pedsynth.prompts import content_hash, load_prompt, load_templates
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import pairs_table, rejects_table, stable_id
from pedsynth.schemas.text import CaptionConfig
from pedsynth.tasks.regenerate import Check, Draft, Slot, SlotStage, regenerate
from pedsynth.tasks.shards import with_requests
from pedsynth.tasks.text_checks import generated_text_check

_PLACEHOLDER_SUFFIX = re.compile(r"/caption\d+$")


@dataclass(frozen=True)
class _Job:
    """One caption slot (image, k): the image and the question asked about it."""

    image_row: dict[str, Any]
    k: int
    template_id: str | None
    prompt: str
    prompt_hash: str

    @property
    def image_id(self) -> str:
        return self.image_row["image_id"]

    @property
    def source(self) -> str:
        return f"{self.image_row['source']}/mllm{self.k}"


class CaptionStage(SlotStage):
    name = "caption"

    def __init__(self, config: CaptionConfig, seed: int):
        self.config, self.seed = config, seed
        self.static = load_prompt("caption_static")
        self.guided = load_prompt("caption_template")
        self.common = load_prompt("caption_common")
        self.bank = load_templates(config.templates)  # None: the packaged bank

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "config": shaping_dump(self.config),
            "generator": self.config.engine.generator_id,
            "prompts": {
                "static": self.static.hash,
                "template": self.guided.hash,
                "common": self.common.hash,
            },
            "templates": self.bank.hash,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ planning

    def _job(self, image_row: dict[str, Any], k: int) -> _Job:
        if self.config.instruction == "common":
            return _Job(image_row, k, None, self.common.text, self.common.hash)
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

    def _run(
        self, table: pa.Table, *, base: pa.Table, only: frozenset[str] | None
    ) -> tuple[pa.Table, pa.Table]:
        cfg = self.config
        per_image = range(cfg.captions_per_image)
        jobs = [self._job(row, k) for row in self._images(table) for k in per_image]
        slots = [self._slot(job) for job in jobs if only is None or job.source in only]
        generator = get_generator(cfg.engine, "vision") if slots else None
        done = regenerate(
            slots,
            generator,
            stage=self.name,
            seed=self.seed,
            max_retries=cfg.max_retries,
            checks=self._checks(),
            describe=_describe,
        )
        new_rows = [
            self._row(kept.draft.payload, kept.text, generator.generator_id, kept.draft.seed)
            for kept in done.kept
        ]
        output = with_requests(
            self._output(base, new_rows),
            len(slots),
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )
        return output, rejects_table(done.rejects)

    def _checks(self) -> list[Check]:
        checks = [generated_text_check(self.config)]
        if self.config.instruction == "common":
            checks.insert(0, continuation_of(self.common.text.rsplit("\n", 1)[-1]))
        return checks

    @staticmethod
    def _slot(job: _Job) -> Slot[_Job]:
        request = ChatRequest(
            request_id=f"{job.image_id}#{job.k}",
            prompt=job.prompt,
            image=job.image_row["image"]["bytes"],
        )
        return Slot(job, request, seed_parts=(job.image_id, job.k))

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
            "source": job.source,
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


def continuation_of(opening: str) -> Check:
    """The caption a continuation of ``opening`` makes: the opening, then the model's text
    (as it is when the model started with the opening itself)."""
    opening = opening.strip()

    def check(draft: Draft[Any], text: str) -> str:
        text = text.strip()
        if text.lower().startswith(opening.lower()):
            return text
        return f"{opening} {text}" if text else text

    return check


def _describe(draft: Draft[_Job]) -> tuple[dict[str, Any], str]:
    """A reject row of a caption draft: the image's ids, with the draft as its caption."""
    job = draft.payload
    row = job.image_row | {"caption": draft.result.text, "pair_id": None, "source": job.source}
    return row, f"template {job.template_id}"


def build_stage(config: CaptionConfig, seed: int) -> CaptionStage:
    return CaptionStage(config, seed)
