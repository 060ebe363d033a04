"""The edit stage (Diverse Person, AAAI'24): a diffusion model edits a person's clothing or hair
toward a target attribute, and the caption is re-annotated to match the edited person.

Per shard: the images of ``splits`` (default train only: a test image is never edited into
train, and an edited image stays in its parent's split) are chosen with probability ``share``
per (seed, image_id); each gets ``edits_per_image`` edit specs from the attribute bank
(:mod:`pedsynth.tasks.edit_bank`). For each edit, in order (the first failure is the row's
reject reason, the rest of the shard goes on):

1. ``unknown_attribute``: an explicit spec names a value the bank does not know;
2. ``region_missing``: no caption of the image states the edited attribute (a person with no
   bag, a caption that never names the shoes' colour);
3. ``bad_image``: the parent image does not decode;
4. the region mask (:mod:`pedsynth.tasks.edit_masks`): ``empty_mask``, ``no_mask``;
5. re-annotation of each caption of the image through the shared regenerate loop
   (:mod:`pedsynth.tasks.regenerate`), by the ``substitute`` re-annotator or an LLM, with the
   checks of :mod:`pedsynth.tasks.edit_annotate`; a caption that does not state the attribute is
   rejected ``not_in_caption``;
6. the edit itself: every kept edit of the shard through the diffusion engine in batches
   (:mod:`pedsynth.engines.diffusion`), composited outside the dilated mask from the original,
   JPEG-encoded once;
7. with ``clip`` configured, the CLIP check (``clip_prefers_original``): the re-annotated
   caption must score higher with the edited image than with the original, as one more check
   of the regenerate loop; the kept row's ``clip_score`` is its score with the edited image.

Re-annotation runs before the diffusion model, so no GPU time goes to an edit whose caption fails,
except with the CLIP check, which needs the edited image. Rows: ``caption_source=edit``,
``parent_id`` = the parent caption's pair_id, a new ``image_id``, the parent's ``person_id``
(``identity: keep``) or a new one per (person, edit) (``identity: new``, the default), the ``edit``
struct (parent image, attribute, target, the replaced value, method, strength, mask backend,
diffusion model and seed), ``generator`` = the re-annotator. The parent rows pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.text import ChatRequest, derive_seed, get_generator
from pedsynth.lexicon import extract_facts
from pedsynth.prompts import load_prompt
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.edit import EditConfig
from pedsynth.schemas.tables import PAIRS_SCHEMA, pairs_table, reject_row, rejects_table, stable_id
from pedsynth.tasks.edit_annotate import (
    SubstituteGenerator,
    clip_check,
    describe_edit,
    substitute,
    target_check,
)
from pedsynth.tasks.edit_bank import EditSpec, bank, sample_specs, selected
from pedsynth.tasks.edit_masks import Mask, region_mask
from pedsynth.tasks.faithfulness import faithfulness_check
from pedsynth.tasks.regenerate import Draft, Slot, regenerate
from pedsynth.tasks.shards import with_requests

STAGE = "edit"


@dataclass(frozen=True)
class _Edit:
    """The k-th edit of one image: its parent rows (one per caption), spec, mask."""

    image_id: str
    k: int
    parents: tuple[dict[str, Any], ...]
    spec: EditSpec
    seed: int  # diffusion seed
    mask: Mask | None = None
    pixels: np.ndarray | None = None  # the decoded parent image
    reference: str | None = None  # paint-by-example: the reference's path in the bank
    reference_pixels: np.ndarray | None = None

    @property
    def new_image_id(self) -> str:
        digest = stable_id(self.image_id, STAGE, self.k, self.spec.fact, self.spec.to, self.seed)
        return f"{self.image_id}#edit{self.k}-{digest[:10]}"


@dataclass(frozen=True)
class _Job:
    """One re-annotation slot: a parent caption of an edit. ``parent`` is the caption the edit
    should yield (the faithfulness filter reads ``parent["caption"]``)."""

    edit: _Edit
    row: dict[str, Any]
    parent: dict[str, Any]

    @property
    def spec(self) -> EditSpec:
        return self.edit.spec

    @property
    def source(self) -> str:
        return f"{self.row['source']}/edit{self.edit.k}"


def _merged_facts(captions: list[str]) -> dict[str, tuple[str, ...]]:
    merged: dict[str, set[str]] = {}
    for caption in captions:
        for name, values in extract_facts(caption).items():
            merged.setdefault(name, set()).update(values)
    return {name: tuple(sorted(v)) for name, v in merged.items()}


def _decode(data: bytes | None) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


@functools.lru_cache(maxsize=4)
def _reference_index(folder: str) -> dict[tuple[str, str], dict[str, str]]:
    """(region, colour) -> {type: path} of a reference bank's ``references.json``."""
    from pedsynth.procedural.references import INDEX

    data = json.loads((Path(folder) / INDEX).read_text("utf-8"))
    out: dict[tuple[str, str], dict[str, str]] = {}
    for entry in data["references"]:
        out.setdefault((entry["region"], entry["colour"]), {})[entry["type"]] = entry["path"]
    return out


def _find_reference(
    folder: str | None, region: str, types: list[str], colour: str | None
) -> str | None:
    """The bank's reference of ``region`` in ``colour``: of the first of ``types`` it has, else
    of any type (the first by name); None when it has none in that colour."""
    if folder is None or colour is None or not (Path(folder) / "references.json").is_file():
        return None
    by_type = _reference_index(str(Path(folder).absolute())).get((region, colour), {})
    for garment in types:
        if garment in by_type:
            return by_type[garment]
    return by_type[min(by_type)] if by_type else None


class EditStage:
    name = STAGE

    def __init__(self, config: EditConfig, seed: int):
        self.config, self.seed = config, seed
        self.prompt = load_prompt("reannotate")

    def fingerprint_parts(self) -> dict[str, Any]:
        cfg = self.config
        llm = cfg.reannotate.method == "llm"
        parts = {
            "config": shaping_dump(cfg),
            "model": cfg.diffusion.model_id,
            "reannotator": cfg.reannotate.engine.generator_id if llm else "substitute",
            "prompt": self.prompt.hash if llm else None,
            "seed": self.seed,
        }
        if cfg.clip is not None:  # the CLIP check's weights (a local file by its content)
            from pedsynth.engines.clip import weights_identity

            parts["clip"] = weights_identity(cfg.clip)
        return parts

    # ------------------------------------------------------------------ planning
    def _plan(self, table: pa.Table) -> tuple[list[_Edit], list[dict[str, Any]]]:
        cfg = self.config
        wanted = pc.and_(
            pc.and_(
                pc.is_valid(table.column("caption")),
                pc.is_in(table.column("caption_source"), value_set=pa.array(cfg.sources)),
            ),
            pc.is_in(table.column("split"), value_set=pa.array(cfg.splits)),
        )
        rows = table.filter(pc.fill_null(wanted, False)).to_pylist()
        by_image: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(rows, key=lambda r: r["pair_id"]):
            by_image.setdefault(row["image_id"], []).append(row)
        edits: list[_Edit] = []
        rejects: list[dict[str, Any]] = []
        b = bank()
        for image_id in sorted(by_image):
            if not selected(self.seed, image_id, cfg.share):
                continue
            parents = by_image[image_id]
            facts = _merged_facts([p["caption"] for p in parents])
            specs = sample_specs(
                self.seed,
                image_id,
                facts,
                count=cfg.edits_per_image,
                regions=list(cfg.regions),
                kinds=list(cfg.kinds),
                explicit=cfg.specs,
            )
            pixels: np.ndarray | None = None
            decoded = False
            for k, spec in enumerate(specs):
                edit = _Edit(image_id, k, tuple(parents), spec, derive_seed(self.seed, image_id, k))
                problem = self._problem(b, edit)
                if problem is None:
                    if not decoded:
                        pixels, decoded = _decode(parents[0]["image"]["bytes"]), True
                    if pixels is None:
                        problem = ("bad_image", "the parent image does not decode")
                if problem is None:
                    image = parents[0]["image"]
                    h, w = pixels.shape[:2]
                    mask = region_mask(cfg.masks, spec.region, image.get("path"), h, w, pixels)
                    if mask.problem is not None:
                        problem = (mask.problem, mask.detail)
                    else:
                        edit = _Edit(image_id, k, tuple(parents), spec, edit.seed, mask, pixels)
                if problem is None and cfg.diffusion.method == "paint-by-example":
                    edit, problem = self._with_reference(edit, facts)
                if problem is not None:
                    reason, detail = problem
                    for p in parents:
                        note = f"{detail} (edit {k}: {spec.fact} -> {spec.to})"
                        rejects.append(reject_row(self.name, reason, note, p))
                    continue
                edits.append(edit)
        return edits, rejects

    def _with_reference(
        self, edit: _Edit, facts: dict[str, tuple[str, ...]]
    ) -> tuple[_Edit, tuple[str, str] | None]:
        """The edit with its reference garment image from the bank, or the reject reason:
        ``no_reference`` (the bank has none for the target) or ``bad_reference`` (its file
        does not decode)."""
        spec = edit.spec
        stated = lambda fact: [v for v in facts.get(fact, ()) if v not in ("none", "no")]  # noqa: E731
        if spec.kind == "colour":
            types, colour = stated(f"{spec.region}_type"), spec.to
        else:
            types, colour = [spec.to], next(iter(stated(f"{spec.region}_colour")), None)
        path = _find_reference(self.config.references, spec.region, types, colour)
        if path is None:
            detail = f"the reference bank has no {spec.region} {'/'.join(types)} in {colour}"
            return edit, ("no_reference", detail)
        full = Path(self.config.references) / path
        pixels = _decode(full.read_bytes() if full.is_file() else None)
        if pixels is None:
            return edit, ("bad_reference", f"the reference image {path} does not decode")
        return dataclasses.replace(edit, reference=path, reference_pixels=pixels), None

    @staticmethod
    def _problem(b, edit: _Edit) -> tuple[str, str] | None:
        spec = edit.spec
        if not b.known(spec.region, spec.kind, spec.to):
            return ("unknown_attribute", f"the bank has no {spec.region} {spec.kind} {spec.to!r}")
        if spec.original is None:
            return ("region_missing", f"no caption states the {spec.fact}")
        return None

    # ------------------------------------------------------------------ re-annotation
    def _jobs(self, edits: list[_Edit]) -> tuple[list[_Job], list[dict[str, Any]]]:
        jobs, rejects = [], []
        for edit in edits:
            for row in edit.parents:
                expected = substitute(row["caption"], edit.spec)
                if expected is None:
                    detail = f"the caption does not state {edit.spec.fact} {edit.spec.original}"
                    rejects.append(reject_row(self.name, "not_in_caption", detail, row))
                    continue
                jobs.append(_Job(edit, row, {"caption": expected, "pair_id": row["pair_id"]}))
        return jobs, rejects

    def _slot(self, job: _Job) -> Slot[_Job]:
        request_id = f"{job.row['pair_id']}#edit{job.edit.k}"
        prompt = self.prompt.render(edit=describe_edit(job.spec), caption=job.row["caption"])
        return Slot(job, ChatRequest(request_id, prompt), (job.row["pair_id"], job.edit.k))

    def _generator(self, slots: list[Slot[_Job]]):
        cfg = self.config.reannotate
        if cfg.method == "llm":
            return get_generator(cfg.engine, "text")
        return SubstituteGenerator(
            {s.request.request_id: s.payload.parent["caption"] for s in slots}
        )

    # ------------------------------------------------------------------ the stage
    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        cfg = self.config
        edits, rejects = self._plan(table)
        jobs, more = self._jobs(edits)
        rejects += more
        slots = [self._slot(job) for job in jobs]
        generator = self._generator(slots) if slots else None
        embedder = None
        if cfg.reannotate.alpha is not None:
            from pedsynth.engines.embedder import get_embedder

            embedder = get_embedder(cfg.reannotate.embedder)
        # The filter judges each draft against the caption the edit should yield, so the edited
        # fact is expected to change and every other fact must agree.
        checks = [target_check, faithfulness_check(embedder, cfg.reannotate.alpha, True)]
        images: dict[str, tuple[bytes, int, int]] = {}
        clip_scores: dict[tuple[str, str], tuple[float, float]] = {}
        if cfg.clip is not None:
            from pedsynth.engines.clip import load_clip

            # The CLIP check needs the edited image, so every edit with a caption to judge is
            # made first; without it, only edits whose caption passed reach the model.
            self._edit_into(images, list({j.edit.new_image_id: j.edit for j in jobs}.values()))
            checks.append(
                clip_check(load_clip(cfg.clip), _images_of(images), cfg.clip_margin, clip_scores)
            )
        done = regenerate(
            slots,
            generator,
            stage=self.name,
            seed=self.seed,
            max_retries=cfg.reannotate.max_retries,
            checks=checks,
            describe=_describe,
        )
        rejects += done.rejects
        kept_by_edit: dict[str, list[Any]] = {}
        for kept in done.kept:
            kept_by_edit.setdefault(kept.draft.payload.edit.new_image_id, []).append(kept)
        to_edit = [e for e in edits if e.new_image_id in kept_by_edit]
        self._edit_into(images, [e for e in to_edit if e.new_image_id not in images])
        new_rows = []
        for edit in to_edit:
            for kept in kept_by_edit[edit.new_image_id]:
                score = clip_scores.get((edit.new_image_id, kept.text), (None,))[0]
                row = self._row(kept, images[edit.new_image_id], generator.generator_id)
                new_rows.append(row | {"clip_score": score})
        output = pa.concat_tables([table, pairs_table(new_rows)])
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
        requests = len(slots) if cfg.reannotate.method == "llm" else 0
        return with_requests(output, requests, **usage), rejects_table(rejects)

    def _edit_into(self, images: dict[str, tuple[bytes, int, int]], edits: list[_Edit]) -> None:
        """Make ``edits`` (in batches) and store each JPEG under its new image id."""
        for edit, jpeg in zip(edits, self._edit_images(edits), strict=True):
            images[edit.new_image_id] = jpeg

    def _edit_images(self, edits: list[_Edit]) -> list[tuple[bytes, int, int]]:
        if not edits:
            return []
        from PIL import Image

        from pedsynth.engines.diffusion import EditRequest, get_diffusion

        engine = get_diffusion(self.config.diffusion)
        b = bank()
        requests = []
        for e in edits:
            types = _merged_facts([p["caption"] for p in e.parents]).get(f"{e.spec.region}_type")
            garment = next((t for t in types or () if t != "none"), None)
            prompt = b.prompt_for(e.spec, garment)
            requests.append(
                EditRequest(e.pixels, e.mask.pixels, prompt, e.seed, e.reference_pixels)
            )
        out = []
        for edited in engine.edit(requests):
            buffer = io.BytesIO()
            Image.fromarray(edited).save(buffer, format="JPEG", quality=self.config.jpeg_quality)
            out.append((buffer.getvalue(), edited.shape[1], edited.shape[0]))
        return out

    def _row(self, kept: Any, jpeg: tuple[bytes, int, int], generator_id: str) -> dict[str, Any]:
        cfg, job = self.config, kept.draft.payload
        edit, row, spec = job.edit, job.row, job.spec
        data, width, height = jpeg
        image_id = edit.new_image_id
        person = row["person_id"]
        if cfg.identity == "new":
            person = f"{person}~{stable_id(person, STAGE, spec.fact, spec.to)[:10]}"
        llm = cfg.reannotate.method == "llm"
        return {
            "pair_id": stable_id(row["pair_id"], STAGE, edit.k, image_id, kept.text),
            "image_id": image_id,
            "person_id": person,
            "split": row["split"],
            "image": {"bytes": data, "path": f"edit/{stable_id(image_id)}.jpg"},
            "width": width,
            "height": height,
            "caption": kept.text,
            "caption_source": "edit",
            "source": job.source,
            "parent_id": row["pair_id"],
            "template_id": None,
            "generator": generator_id,
            "prompt_hash": self.prompt.hash if llm else None,
            "seed": edit.seed,
            "faithfulness": kept.score,
            "fact_conflicts": [],  # judged against the edited parent caption
            "edit": {
                "parent_image_id": edit.image_id,
                "attribute": spec.fact,
                "target": spec.to,
                "reference_image_id": edit.reference,
                "method": cfg.diffusion.method,
                "strength": cfg.diffusion.strength,
                "original": spec.original,
                "mask": edit.mask.backend,
                "model": cfg.diffusion.model_id,
                "seed": edit.seed,
            },
        }


def _images_of(images: dict[str, tuple[bytes, int, int]]):
    """The CLIP check's view of a draft: (edit key, edited JPEG, the parent's image bytes)."""

    def images_of(draft: Draft[_Job]) -> tuple[str, bytes, bytes]:
        edit = draft.payload.edit
        return edit.new_image_id, images[edit.new_image_id][0], edit.parents[0]["image"]["bytes"]

    return images_of


def _describe(draft: Draft[_Job]) -> tuple[dict[str, Any], str]:
    job, result = draft.payload, draft.result
    row = job.row | {"caption": result.text if result.ok else None, "source": job.source}
    return row, f"parent {job.row['pair_id']}, edit {job.spec.fact} -> {job.spec.to}"


def build_stage(config: EditConfig, seed: int) -> EditStage:
    return EditStage(config, seed)
