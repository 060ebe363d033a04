"""Who a synthetic pedestrian is: ground-truth attributes and the render-only traits.

``Identity`` holds what captions may say and ``attributes.json`` records. ``Look`` holds what
only the renderer needs (skin tone, build, exact garment shades); it is derived from the same
seed, so a worker process can rebuild it without it being stored or sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from pedsynth.procedural import vocabulary as vocab

T = TypeVar("T")

# Stream tags keep the random streams of one identity independent of each other.
ATTRIBUTE_STREAM = 1
LOOK_STREAM = 2


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, *keys)``, so workers agree with a serial run.

    The keys go into ``spawn_key`` rather than the entropy list: there, ``(s, 1, 3)`` and
    ``(s, 1, 3, 0)`` would collide, and a seed above 2**32 would shift the keys.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=keys))


def pick(
    rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None
) -> T:
    """One element of ``options``; ``weights`` need not sum to one."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    probabilities = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=probabilities / probabilities.sum()))]


def pick_weighted(rng: np.random.Generator, weighted: Mapping[T, float]) -> T:
    """One key of ``weighted`` with probability proportional to its value."""
    return pick(rng, list(weighted), list(weighted.values()))


@dataclass(frozen=True)
class Accessory:
    """A bag or a hat: a type and a colour."""

    type: str
    colour: str


@dataclass(frozen=True)
class Identity:
    """The ground truth of one person; the same for every image of that person."""

    id: int
    gender: str
    hair_style: str
    hair_colour: str
    upper_type: str
    upper_colour: str
    lower_type: str
    lower_colour: str
    shoes_type: str
    shoes_colour: str
    bag: Accessory | None
    hat: Accessory | None
    glasses: bool

    def to_json(self, split: str) -> dict[str, Any]:
        """The ``attributes.json`` entry (without the id, which is the key)."""
        record = asdict(self)
        del record["id"]
        record["split"] = split
        return record


def sample_identity(seed: int, identity_id: int) -> Identity:
    """Draw each attribute independently (gender only tilts the odds)."""
    rng = rng_for(seed, identity_id, ATTRIBUTE_STREAM)
    gender = pick(rng, vocab.GENDERS)
    upper_type = pick_weighted(rng, vocab.UPPER_TYPE_WEIGHTS[gender])
    if upper_type == "dress":
        lower_type = vocab.LOWER_UNDER_DRESS
    else:
        lower_type = pick_weighted(rng, vocab.LOWER_TYPE_WEIGHTS[gender])
    colours = vocab.JEANS_COLOURS if lower_type == "jeans" else vocab.COLOURS
    bag_type = pick_weighted(rng, vocab.BAG_TYPE_WEIGHTS[gender])
    hat_type = pick_weighted(rng, vocab.HAT_TYPE_WEIGHTS)
    return Identity(
        id=identity_id,
        gender=gender,
        hair_style=pick_weighted(rng, vocab.HAIR_STYLE_WEIGHTS[gender]),
        hair_colour=pick_weighted(rng, vocab.HAIR_COLOUR_WEIGHTS),
        upper_type=upper_type,
        upper_colour=pick(rng, vocab.COLOURS),
        lower_type=lower_type,
        lower_colour=pick(rng, colours),
        shoes_type=pick_weighted(rng, vocab.SHOES_TYPE_WEIGHTS[gender]),
        shoes_colour=pick_weighted(rng, vocab.SHOES_COLOUR_WEIGHTS),
        bag=None if bag_type is None else Accessory(bag_type, pick(rng, vocab.COLOURS)),
        hat=None if hat_type is None else Accessory(hat_type, pick(rng, vocab.COLOURS)),
        glasses=bool(rng.random() < vocab.GLASSES_PROBABILITY),
    )


@dataclass(frozen=True)
class Look:
    """Render-only traits of an identity: fixed across its images, never captioned."""

    skin: vocab.RGB
    hair: vocab.RGB
    upper: vocab.RGB
    lower: vocab.RGB
    shoes: vocab.RGB
    bag: vocab.RGB
    hat: vocab.RGB
    inner: vocab.RGB  # the shirt under an open jacket or coat
    build: float  # shoulder and hip width factor
    stature: float  # figure height factor
    handbag_side: int  # -1 or 1: which hand holds a handbag, which shoulder a bag hangs from


def _shade(rng: np.random.Generator, rgb: vocab.RGB, spread: float = 9.0) -> vocab.RGB:
    """A personal shade of a named colour: close enough that the name still fits."""
    scale = rng.uniform(0.9, 1.08)
    jitter = rng.normal(0.0, spread, size=3)
    values = np.clip(np.asarray(rgb, dtype=float) * scale + jitter, 0, 255)
    return tuple(int(round(v)) for v in values)  # type: ignore[return-value]


def sample_look(seed: int, identity: Identity) -> Look:
    """The identity's render traits, from its own random stream."""
    rng = rng_for(seed, identity.id, LOOK_STREAM)
    colours = vocab.GARMENT_COLOURS
    inner = pick(rng, ("white", "grey", "black", "beige"))
    woman = identity.gender == "woman"
    return Look(
        skin=_shade(rng, pick(rng, vocab.SKIN_TONES), spread=5.0),
        hair=_shade(rng, vocab.HAIR_COLOURS[identity.hair_colour], spread=6.0),
        upper=_shade(rng, colours[identity.upper_colour]),
        lower=_shade(rng, colours[identity.lower_colour]),
        shoes=_shade(rng, colours[identity.shoes_colour]),
        bag=_shade(rng, colours[identity.bag.colour if identity.bag else "black"]),
        hat=_shade(rng, colours[identity.hat.colour if identity.hat else "black"]),
        inner=_shade(rng, colours[inner]),
        build=float(rng.uniform(0.86, 1.0) if woman else rng.uniform(0.96, 1.14)),
        stature=float(rng.uniform(0.94, 1.04) if woman else rng.uniform(0.97, 1.06)),
        handbag_side=int(pick(rng, (-1, 1))),
    )
