"""The attribute bank of the edit stage and the edit specs drawn from it.

The bank (``prompts/attributes.yaml``) names lexicon keys only; every word a caption uses for a
value comes from the lexicon (:mod:`pedsynth.lexicon`), so the bank, the substitute
re-annotator and the fact checks speak one vocabulary. :func:`sample_specs` draws the edits of
one image from (seed, image_id) alone: the same build edits the same images the same way on
any machine and in any shard order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import yaml

from pedsynth.engines.text import derive_seed
from pedsynth.lexicon import lexicon


@dataclass(frozen=True)
class Region:
    name: str
    label: str  # the region's name in the procedural label maps
    box: tuple[float, float, float, float]  # top, bottom, left, right (fractions of the crop)
    colour_fact: str
    type_fact: str | None
    colours: tuple[str, ...]
    types: tuple[tuple[str, ...], ...]  # groups of one silhouette
    noun: str | None = None
    parsing: tuple[str, ...] = ()  # the human-parsing model's labels of the region


@dataclass(frozen=True)
class EditSpec:
    """One edit: the ``kind`` (colour | type) of ``region`` from ``original`` to ``to``."""

    region: str
    kind: str
    original: str | None  # the value the parent caption states; None: not stated
    to: str

    @property
    def fact(self) -> str:
        return f"{self.region}_{self.kind}"


class Bank:
    def __init__(self, data: dict[str, Any]):
        lex = lexicon()
        self.regions: dict[str, Region] = {}
        for name, spec in data["regions"].items():
            region = Region(
                name=name,
                label=spec["label"],
                box=tuple(spec["box"]),
                colour_fact=spec["colour_fact"],
                type_fact=spec.get("type_fact"),
                colours=tuple(spec["colours"]),
                types=tuple(tuple(g) for g in spec.get("types") or ()),
                noun=spec.get("noun"),
                parsing=tuple(spec.get("parsing") or ()),
            )
            unknown = [c for c in region.colours if c not in lex.colour_senses]
            types = lex.types.get(name, {})
            unknown += [t for g in region.types for t in g if t not in types]
            if unknown:
                raise ValueError(f"attributes.yaml: {name}: {unknown} are not lexicon keys")
            self.regions[name] = region
        self.patterns = tuple(data["patterns"])
        self.prompt = data["prompt"]

    def known(self, region: str, kind: str, value: str) -> bool:
        r = self.regions.get(region)
        if r is None:
            return False
        if kind == "colour":
            return value in r.colours
        return any(value in g for g in r.types)

    def word(self, region: str, kind: str, value: str) -> str:
        """The caption word of a value: its lexicon key when the lexicon reads the key back as
        that value (``t-shirt``), else the lexicon's first word for it."""
        units = lexicon().units(value)
        if len(units) == 1 and units[0].value == value:
            return value
        return _lexicon_words(region, kind, value)[0]

    def prompt_for(self, spec: EditSpec, garment: str | None = None) -> str:
        """The text-guided prompt of ``spec``; ``garment`` is the edited item's type, if known."""
        target = self.word(spec.region, spec.kind, spec.to)
        noun = self.regions[spec.region].noun
        if noun is None and garment is not None:
            noun = self.word(spec.region, "type", garment)
        text = f"{target} {noun}" if noun and spec.kind == "colour" else target
        return self.prompt.format(target=text, region=spec.region)


@functools.cache
def _lexicon_data() -> dict[str, Any]:
    text = resources.files("pedsynth.prompts").joinpath("lexicon.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def _lexicon_words(region: str, kind: str, value: str) -> list[str]:
    data = _lexicon_data()
    if kind == "colour":
        return list(data["colours"][value]["words"])
    return list(data["garments"][region][value]["words"])


@functools.cache
def bank() -> Bank:
    """The packaged bank, read once per process."""
    text = resources.files("pedsynth.prompts").joinpath("attributes.yaml").read_text("utf-8")
    return Bank(yaml.safe_load(text))


def selected(seed: int, image_id: str, share: float) -> bool:
    """Whether ``image_id`` is edited at all (a share of the images, fixed per seed)."""
    return derive_seed(seed, image_id, "edit-share") / 0x7FFFFFFF < share


def sample_specs(
    seed: int,
    image_id: str,
    facts: Any,
    *,
    count: int,
    regions: list[str],
    kinds: list[str],
    explicit: list[Any] | None = None,
) -> list[EditSpec]:
    """The ``count`` edits of one image. ``facts`` are its caption's (:func:`extract_facts`):
    ``original`` is the value the caption states for the edited fact (None when it states none:
    the row is rejected later), and a target is never compatible with it."""
    lex = lexicon()
    b = bank()
    rng = np.random.default_rng(derive_seed(seed, image_id, "edit-specs"))
    specs: list[EditSpec] = []
    for _ in range(count):
        if explicit:
            chosen = explicit[int(rng.integers(len(explicit)))]
            fact = f"{chosen.region}_{chosen.kind}"
            stated = sorted(facts.get(fact, ())) if facts is not None else []
            original = next((v for v in stated if v not in ("none", "no")), None)
            specs.append(EditSpec(chosen.region, chosen.kind, original, chosen.to))
            continue
        region = b.regions[regions[int(rng.integers(len(regions)))]]
        usable = [k for k in kinds if k == "colour" or region.types]
        kind = usable[int(rng.integers(len(usable)))]
        fact = region.colour_fact if kind == "colour" else region.type_fact
        stated = [v for v in sorted(facts.get(fact, ())) if v not in ("none", "no")]
        original = stated[0] if stated else None
        if kind == "colour":
            pool = list(region.colours)
        else:
            group = next((g for g in region.types if original in g), ())
            pool = list(group)
        if original is not None:
            pool = [v for v in pool if not lex.values_compatible(fact, v, original)]
        if not pool:
            pool = list(region.colours if kind == "colour" else region.types[0])
        to = pool[int(rng.integers(len(pool)))]
        specs.append(EditSpec(region.name, kind, original, to))
    return specs
