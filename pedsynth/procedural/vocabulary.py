"""Attribute vocabularies of the procedural benchmark: names, probabilities, colours, words.

Every attribute is drawn independently from its own vocabulary so that identities share
attributes (about 1 in 12 wears a red top) and only the *combination* identifies a person.
Gender tilts hair and garment probabilities a little; it never decides them.

The canonical names here are what ``attributes.json`` stores and what captions use for colours,
so code that corrupts captions by swapping attribute words can rely on them; ``PHRASES`` lists
the other surface forms a caption may use for a type (``"trainers"`` for ``"sneakers"``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

RGB = tuple[int, int, int]

GENDERS: Final = ("man", "woman")

GARMENT_COLOURS: Final[MappingProxyType[str, RGB]] = MappingProxyType(
    {
        "black": (28, 28, 32),
        "white": (236, 236, 232),
        "grey": (128, 129, 133),
        "red": (196, 32, 38),
        "blue": (38, 78, 188),
        "green": (42, 136, 62),
        "yellow": (232, 200, 44),
        "orange": (238, 128, 32),
        "pink": (238, 142, 182),
        "purple": (118, 52, 148),
        "brown": (116, 74, 42),
        "beige": (212, 192, 152),
    }
)
COLOURS: Final = tuple(GARMENT_COLOURS)

HAIR_COLOURS: Final[MappingProxyType[str, RGB]] = MappingProxyType(
    {
        "black": (24, 20, 20),
        "brown": (92, 56, 30),
        "blonde": (214, 178, 108),
        "grey": (156, 154, 150),
        "red": (160, 66, 30),
    }
)
HAIR_COLOUR_WEIGHTS: Final = {"black": 40, "brown": 30, "blonde": 15, "grey": 10, "red": 5}

HAIR_STYLES: Final = ("short", "long", "ponytail", "bun", "bald", "curly")
HAIR_STYLE_WEIGHTS: Final = {
    "man": {"short": 48, "long": 8, "ponytail": 7, "bun": 5, "bald": 14, "curly": 18},
    "woman": {"short": 15, "long": 33, "ponytail": 20, "bun": 13, "bald": 2, "curly": 17},
}

UPPER_TYPES: Final = (
    "t-shirt",
    "shirt",
    "jacket",
    "coat",
    "hoodie",
    "sweater",
    "tank top",
    "dress",
)
UPPER_TYPE_WEIGHTS: Final = {
    "man": {
        "t-shirt": 20,
        "shirt": 17,
        "jacket": 17,
        "coat": 10,
        "hoodie": 14,
        "sweater": 14,
        "tank top": 6,
        "dress": 2,
    },
    "woman": {
        "t-shirt": 15,
        "shirt": 13,
        "jacket": 14,
        "coat": 12,
        "hoodie": 10,
        "sweater": 12,
        "tank top": 8,
        "dress": 16,
    },
}
#: Fraction of the arm a sleeve covers (shoulder = 0, wrist = 1).
SLEEVE_LENGTH: Final = {
    "t-shirt": 0.38,
    "shirt": 1.0,
    "jacket": 1.0,
    "coat": 1.0,
    "hoodie": 1.0,
    "sweater": 1.0,
    "tank top": 0.0,
    "dress": 0.25,
}

LOWER_TYPES: Final = ("trousers", "jeans", "shorts", "skirt", "leggings")
LOWER_TYPE_WEIGHTS: Final = {
    "man": {"trousers": 38, "jeans": 36, "shorts": 20, "skirt": 2, "leggings": 4},
    "woman": {"trousers": 22, "jeans": 28, "shorts": 15, "skirt": 22, "leggings": 13},
}
#: Under a dress the legs are covered by leggings (tights), so ``lower_*`` stays meaningful.
LOWER_UNDER_DRESS: Final = "leggings"
JEANS_COLOURS: Final = ("blue", "black", "grey", "white")

SHOES_TYPES: Final = ("sneakers", "boots", "leather shoes", "sandals", "heels")
SHOES_TYPE_WEIGHTS: Final = {
    "man": {"sneakers": 46, "boots": 20, "leather shoes": 24, "sandals": 9, "heels": 1},
    "woman": {"sneakers": 36, "boots": 20, "leather shoes": 10, "sandals": 13, "heels": 21},
}
SHOES_COLOUR_WEIGHTS: Final = {
    "black": 28,
    "white": 24,
    "brown": 12,
    "grey": 8,
    "blue": 5,
    "red": 5,
    "beige": 5,
    "pink": 3,
    "green": 3,
    "yellow": 2,
    "orange": 2,
    "purple": 3,
}

BAG_TYPES: Final = ("backpack", "handbag", "shoulder bag")
BAG_TYPE_WEIGHTS: Final = {
    "man": {None: 40, "backpack": 34, "handbag": 5, "shoulder bag": 21},
    "woman": {None: 36, "backpack": 22, "handbag": 24, "shoulder bag": 18},
}

HAT_TYPES: Final = ("cap", "beanie", "hat")
HAT_TYPE_WEIGHTS: Final = {None: 78, "cap": 10, "beanie": 6, "hat": 6}

GLASSES_PROBABILITY: Final = 0.22

#: Skin tones from light to dark; not an attribute the captions mention.
SKIN_TONES: Final[tuple[RGB, ...]] = (
    (246, 214, 190),
    (234, 192, 160),
    (214, 166, 128),
    (186, 134, 96),
    (146, 98, 66),
    (104, 68, 46),
)

#: Words a caption may use for each canonical type (the first one is the canonical name).
PHRASES: Final = {
    "upper_type": {
        "t-shirt": ["t-shirt", "tee", "short-sleeved t-shirt"],
        "shirt": ["shirt", "button-up shirt", "long-sleeved shirt"],
        "jacket": ["jacket", "zip-up jacket"],
        "coat": ["coat", "long coat", "overcoat"],
        "hoodie": ["hoodie", "hooded sweatshirt"],
        "sweater": ["sweater", "jumper", "pullover"],
        "tank top": ["tank top", "sleeveless top", "vest top"],
        "dress": ["dress", "knee-length dress"],
    },
    "lower_type": {
        "trousers": ["trousers", "pants", "slacks"],
        "jeans": ["jeans", "denim jeans"],
        "shorts": ["shorts"],
        "skirt": ["skirt", "knee-length skirt"],
        "leggings": ["leggings", "tights"],
    },
    "shoes_type": {
        "sneakers": ["sneakers", "trainers", "running shoes"],
        "boots": ["boots", "ankle boots"],
        "leather shoes": ["leather shoes", "dress shoes", "shoes"],
        "sandals": ["sandals"],
        "heels": ["heels", "high heels"],
    },
    "bag_type": {
        "backpack": ["backpack", "rucksack"],
        "handbag": ["handbag", "purse"],
        "shoulder bag": ["shoulder bag", "messenger bag", "bag"],
    },
    "hat_type": {
        "cap": ["cap", "baseball cap"],
        "beanie": ["beanie", "knit hat"],
        "hat": ["hat", "brimmed hat"],
    },
    "glasses": {"true": ["glasses", "eyeglasses", "spectacles"]},
}

#: Nouns that take no article because they are plural ("blue jeans", "white sneakers").
PLURAL_NOUNS: Final = frozenset(
    word
    for group in ("lower_type", "shoes_type")
    for words in PHRASES[group].values()
    for word in words
    if word not in ("skirt", "knee-length skirt")
)


def vocabulary() -> dict[str, list]:
    """Every attribute's possible values, as written to ``attributes.json``."""
    return {
        "gender": list(GENDERS),
        "hair_style": list(HAIR_STYLES),
        "hair_colour": list(HAIR_COLOURS),
        "upper_type": list(UPPER_TYPES),
        "upper_colour": list(COLOURS),
        "lower_type": list(LOWER_TYPES),
        "lower_colour": list(COLOURS),
        "shoes_type": list(SHOES_TYPES),
        "shoes_colour": list(COLOURS),
        "bag_type": list(BAG_TYPES),
        "bag_colour": list(COLOURS),
        "hat_type": list(HAT_TYPES),
        "hat_colour": list(COLOURS),
        "glasses": [False, True],
    }
