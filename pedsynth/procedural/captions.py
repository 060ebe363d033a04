"""Captions written from an identity's ground truth and one image's viewpoint, CUHK-PEDES style.

Real annotators mention most attributes but not all, in varying order and words; so each
caption draws which attributes to mention, a sentence pattern (twelve structures), synonyms
and phrase order. Colours always use the canonical vocabulary words, so a later stage can find
and swap them. What the view hides is never mentioned (no glasses from behind).

It stays one module: most of its length is the twelve sentence patterns, deliberate variants
of one another that read best side by side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pedsynth.procedural.identity import Identity, pick
from pedsynth.procedural.pose import Shot
from pedsynth.procedural.vocabulary import PHRASES, PLURAL_NOUNS

# How often an attribute the image shows is mentioned.
MENTION_RATE = {
    "upper": 0.96,
    "lower": 0.88,
    "hair": 0.8,
    "shoes": 0.62,
    "bag": 0.88,
    "hat": 0.8,
    "glasses": 0.6,
    "view": 0.3,
}
MIN_WORDS = 12  # real annotations rarely say less; shorter drafts are drawn again
MAX_REDRAFTS = 8
TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens without punctuation, as in CUHK-PEDES ``processed_tokens``."""
    return TOKEN_PATTERN.findall(caption.lower())


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    """``a, b and c`` (sometimes with the Oxford comma)."""
    if len(items) <= 2:
        return " and ".join(items)
    comma = "," if rng.random() < 0.3 else ""
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


@dataclass(frozen=True)
class Extra:
    """An accessory in the three grammatical forms patterns need."""

    kind: str  # "bag", "hat" or "glasses"
    participle: str  # "carrying a black backpack"
    simple: str  # "carries a black backpack"
    noun: str  # "a black backpack", used after "with"


@dataclass
class Draft:
    """The words chosen for one caption, before a pattern arranges them."""

    noun: str  # "woman", "young man", ...
    pron: str  # "she"
    poss: str  # "her"
    hair: str | None  # "long brown hair"
    hair_sentence: str | None  # "Her hair is long and brown."
    upper: str | None  # "a red jacket"
    lower: str | None  # "blue jeans"
    shoes: str | None  # "white sneakers"
    extras: list[Extra]
    action: str | None  # "walking away from the camera"
    opener: str | None  # "Seen from behind"
    rng: np.random.Generator

    def clothes(self) -> str:
        items = [x for x in (self.upper, self.lower, self.shoes) if x]
        if len(items) > 1 and self.rng.random() < 0.12:
            items[0], items[1] = items[1], items[0]
        return _join(items, self.rng)

    def extras_simple(self) -> str:
        return _join([e.simple for e in self.extras], self.rng)

    def extras_progressive(self) -> str:
        return "is " + _join([e.participle for e in self.extras], self.rng)

    def extras_with(self) -> str:
        return "with " + _join([e.noun for e in self.extras], self.rng)

    def extras_sentence(self) -> str:
        """``She carries a black backpack.`` or ``""`` when nothing is left to mention."""
        if not self.extras:
            return ""
        verb = self.extras_simple() if self.rng.random() < 0.5 else self.extras_progressive()
        return _sentence(f"{self.pron} {verb}")

    def with_hair(self) -> str:
        return f" with {self.hair}" if self.hair else ""

    def verb_wearing(self) -> str:
        return pick(self.rng, ("is wearing", "wears", "is dressed in", "has on"), (4, 3, 2, 1))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------- sentence patterns
def _with_hair_wearing(d: Draft) -> str:
    """A woman with long brown hair is wearing ... She carries a black backpack."""
    first = f"a {d.noun}{d.with_hair()} {d.verb_wearing()} {d.clothes()}"
    return f"{_sentence(first)} {d.extras_sentence()}"


def _has_hair_then_wears(d: Draft) -> str:
    """The man has short black hair. He wears ..."""
    first = _sentence(f"the {d.noun} has {d.hair}") if d.hair else ""
    subject = d.pron if d.hair else f"the {d.noun}"
    return f"{first} {_sentence(f'{subject} wears {d.clothes()}')} {d.extras_sentence()}"


def _this_person(d: Draft) -> str:
    """This person is wearing ... and is carrying ... Her hair is ..."""
    bag = next((e for e in d.extras if e.kind == "bag"), None)
    rest = [e for e in d.extras if e is not bag]
    first = f"this person is wearing {d.clothes()}"
    if bag:
        first += f" and is {bag.participle}"
    tail = ""
    if rest:
        tail = _sentence(f"{d.pron} {_join([e.simple for e in rest], d.rng)}")
    return f"{_sentence(first)} {d.hair_sentence or ''} {tail}"


def _in_with_fragment(d: Draft) -> str:
    """A young lady in a pink dress and black leggings with a red handbag. She has ..."""
    worn = _join([x for x in (d.upper, d.lower) if x], d.rng)
    first = f"a {d.noun} in {worn}"
    if d.extras:
        first += f" {d.extras_with()}"
    more = []
    if d.hair:
        more.append(f"has {d.hair}")
    if d.shoes:
        more.append(f"is wearing {d.shoes}")
    second = _sentence(f"{d.pron} {' and '.join(more)}") if more else ""
    return f"{_sentence(first)} {second}"


def _opener_first(d: Draft) -> str:
    """Seen from behind, a man with ... wears ..."""
    opener = d.opener or "in this photo"
    first = f"{opener}, a {d.noun}{d.with_hair()} {d.verb_wearing()} {d.clothes()}"
    return f"{_sentence(first)} {d.extras_sentence()}"


def _wearing_fragment(d: Draft) -> str:
    """Woman wearing a white t-shirt, black shorts and sneakers, carrying a red handbag."""
    first = f"{d.noun} wearing {d.clothes()}"
    if d.extras:
        first += ", " + _join([e.participle for e in d.extras], d.rng)
    return f"{_sentence(first)} {d.hair_sentence or ''}"


def _there_is(d: Draft) -> str:
    """There is a woman with ... who is dressed in ..."""
    first = f"there is a {d.noun}{d.with_hair()} who is dressed in {d.clothes()}"
    return f"{_sentence(first)} {d.extras_sentence()}"


def _paired_with(d: Draft) -> str:
    """The woman is dressed in a white shirt paired with black trousers. She has ..."""
    if d.upper and d.lower:
        first = f"the {d.noun} is dressed in {d.upper} paired with {d.lower}"
    else:
        first = f"the {d.noun} is dressed in {d.upper or d.lower}"
    more = []
    if d.hair:
        more.append(f"has {d.hair}")
    if d.shoes:
        more.append(f"wears {d.shoes}")
    more += [e.simple for e in d.extras]
    second = _sentence(f"{d.pron} {_join(more, d.rng)}") if more else ""
    return f"{_sentence(first)} {second}"


def _pedestrian_is(d: Draft) -> str:
    """The pedestrian is a man with ... He is in ..., with ..."""
    first = f"the pedestrian is a {d.noun}{d.with_hair()}"
    second = f"{d.pron} is in {d.clothes()}"
    if d.extras:
        second += f", {d.extras_with()}"
    return f"{_sentence(first)} {_sentence(second)}"


def _outfit_consists(d: Draft) -> str:
    """The man's outfit consists of ... He has ... and carries ..."""
    first = f"the {d.noun}'s outfit consists of {d.clothes()}"
    more = [f"has {d.hair}"] if d.hair else []
    more += [e.simple for e in d.extras]
    second = _sentence(f"{d.pron} {_join(more, d.rng)}") if more else ""
    return f"{_sentence(first)} {second}"


def _has_on(d: Draft) -> str:
    """This woman has on ... She also has ..."""
    first = f"this {d.noun} has on {d.clothes()}"
    more = [f"has {d.hair}"] if d.hair else []
    more += [e.simple for e in d.extras]
    second = _sentence(f"{d.pron} also {_join(more, d.rng)}") if more else ""
    return f"{_sentence(first)} {second}"


def _action_first(d: Draft) -> str:
    """A man is walking away from the camera. He is wearing ..."""
    action = d.action or "walking"
    first = f"a {d.noun}{d.with_hair()} is {action}"
    second = f"{d.pron} is wearing {d.clothes()}"
    if d.extras:
        second += f" and {d.extras_simple()}"
    return f"{_sentence(first)} {_sentence(second)}"


PATTERNS: tuple[Callable[[Draft], str], ...] = (
    _with_hair_wearing,
    _has_hair_then_wears,
    _this_person,
    _in_with_fragment,
    _opener_first,
    _wearing_fragment,
    _there_is,
    _paired_with,
    _pedestrian_is,
    _outfit_consists,
    _has_on,
    _action_first,
)
PATTERN_WEIGHTS = (14, 10, 9, 8, 6, 7, 7, 8, 7, 6, 7, 6)
NEEDS_VIEW = {_opener_first, _action_first}


class CaptionWriter:
    """Writes captions for one image of one identity."""

    def __init__(self, identity: Identity, shot: Shot, rng: np.random.Generator) -> None:
        self.who = identity
        self.shot = shot
        self.rng = rng
        woman = identity.gender == "woman"
        self.pron, self.poss = ("she", "her") if woman else ("he", "his")

    def captions(self, count: int) -> list[str]:
        """``count`` distinct captions, each from a different pattern."""
        order = self.rng.choice(
            len(PATTERNS),
            size=len(PATTERNS),
            replace=False,
            p=np.asarray(PATTERN_WEIGHTS) / sum(PATTERN_WEIGHTS),
        )
        written: list[str] = []
        attempt = 0
        while len(written) < count:
            pattern = PATTERNS[int(order[attempt % len(order)])]
            attempt += 1
            caption = self.write(pattern)
            if caption not in written:
                written.append(caption)
        return written

    def write(self, pattern: Callable[[Draft], str]) -> str:
        """One caption in ``pattern``; drafts that say too little are drawn again."""
        for _ in range(MAX_REDRAFTS):
            caption = _clean(pattern(self._draft(force_view=pattern in NEEDS_VIEW)))
            if len(tokenize(caption)) >= MIN_WORDS:
                break
        return caption

    # ------------------------------------------------------------------ phrases
    def _word(self, group: str, canonical: str) -> str:
        return pick(
            self.rng, PHRASES[group][canonical], (5, 2, 1)[: len(PHRASES[group][canonical])]
        )

    def _mention(self, key: str) -> bool:
        return bool(self.rng.random() < MENTION_RATE[key])

    def _noun(self) -> str:
        if self.who.gender == "woman":
            options = ("woman", "lady", "young woman", "young lady", "female pedestrian", "girl")
            weights = (10, 3, 2, 1, 1, 1)
        else:
            options = ("man", "guy", "young man", "gentleman", "male pedestrian")
            weights = (12, 3, 2, 1, 1)
        return pick(self.rng, options, weights)

    def _garment(self, group: str, kind: str, colour: str, colour_rate: float = 1.0) -> str:
        noun = self._word(group, kind)
        phrase = f"{colour} {noun}" if self.rng.random() < colour_rate else noun
        if noun in PLURAL_NOUNS:
            return f"a pair of {phrase}" if self.rng.random() < 0.2 else phrase
        return _article(phrase)

    def _hair(self) -> tuple[str, str]:
        """The hair as a noun phrase and as a sentence."""
        style, colour = self.who.hair_style, self.who.hair_colour
        pron, poss = self.pron, self.poss
        if style == "bald":
            phrase = pick(self.rng, ("a bald head", "a shaved head"))
            return phrase, _sentence(pick(self.rng, (f"{pron} is bald", f"{pron} has {phrase}")))
        if style == "ponytail":
            phrase = pick(
                self.rng,
                (
                    f"{colour} hair in a ponytail",
                    f"a {colour} ponytail",
                    f"{colour} hair tied back in a ponytail",
                ),
            )
            return phrase, _sentence(f"{poss} {colour} hair is pulled back into a ponytail")
        if style == "bun":
            phrase = pick(self.rng, (f"{colour} hair in a bun", f"{colour} hair tied up in a bun"))
            return phrase, _sentence(f"{poss} {colour} hair is tied up in a bun")
        adjective = style
        phrase = pick(
            self.rng, (f"{adjective} {colour} hair", f"{colour} {adjective} hair"), (4, 1)
        )
        sentence = pick(
            self.rng,
            (f"{pron} has {phrase}", f"{poss} hair is {adjective} and {colour}"),
        )
        return phrase, _sentence(sentence)

    def _bag(self) -> Extra:
        bag = self.who.bag
        assert bag is not None
        poss, colour = self.poss, bag.colour
        noun = f"{colour} {self._word('bag_type', bag.type)}"
        thing = _article(noun)
        if bag.type == "backpack":
            if self.shot.view == "front" and self.rng.random() < 0.3:
                straps = f"the straps of {thing} over {poss} shoulders"
                return Extra("bag", f"wearing {thing}", f"has {straps}", straps)
            return pick(
                self.rng,
                (
                    Extra("bag", f"carrying {thing}", f"carries {thing}", thing),
                    Extra(
                        "bag",
                        f"wearing {thing}",
                        f"has {thing} on {poss} back",
                        f"{thing} on {poss} back",
                    ),
                ),
            )
        if bag.type == "handbag":
            return pick(
                self.rng,
                (
                    Extra("bag", f"holding {thing}", f"holds {thing}", thing),
                    Extra(
                        "bag",
                        f"carrying {thing} in {poss} hand",
                        f"carries {thing}",
                        f"{thing} in hand",
                    ),
                ),
            )
        over = f"{thing} over {poss} shoulder"
        return pick(
            self.rng,
            (
                Extra("bag", f"carrying {thing}", f"carries {thing}", thing),
                Extra("bag", f"carrying {over}", f"has {over}", over),
            ),
        )

    def _hat(self) -> Extra:
        hat = self.who.hat
        assert hat is not None
        thing = _article(f"{hat.colour} {self._word('hat_type', hat.type)}")
        on_head = f"{thing} on {self.poss} head"
        return pick(
            self.rng,
            (
                Extra("hat", f"wearing {thing}", f"wears {thing}", thing),
                Extra("hat", f"wearing {thing}", f"has {on_head}", on_head),
            ),
        )

    def _glasses(self) -> Extra:
        word = self._word("glasses", "true")
        return Extra(
            "glasses", f"wearing {word}", pick(self.rng, (f"wears {word}", f"has {word} on")), word
        )

    def _view(self) -> tuple[str, str]:
        """What the person is doing as seen by the camera, and a sentence opener."""
        shot, poss = self.shot, self.poss
        if shot.view == "back":
            action = (
                "walking away from the camera"
                if shot.walking
                else f"standing with {poss} back to the camera"
            )
            return action, pick(self.rng, ("seen from behind", "from the back"))
        if shot.view == "side":
            if shot.walking:
                action = f"walking to the {shot.facing}"
            else:
                action = f"standing in profile, facing {shot.facing}"
            return action, pick(self.rng, ("seen from the side", "in profile"))
        action = "walking towards the camera" if shot.walking else "standing and facing the camera"
        return action, pick(self.rng, ("seen from the front", "facing the camera"))

    def _draft(self, force_view: bool) -> Draft:
        who = self.who
        show_upper = self._mention("upper")
        show_lower = self._mention("lower") or not show_upper
        hair = self._hair() if self._mention("hair") else (None, None)
        extras: list[Extra] = []
        if who.bag and self._mention("bag"):
            extras.append(self._bag())
        if who.hat and self._mention("hat"):
            extras.append(self._hat())
        if who.glasses and self.shot.view != "back" and self._mention("glasses"):
            extras.append(self._glasses())
        self.rng.shuffle(extras)  # type: ignore[arg-type]
        action = opener = None
        if force_view or self._mention("view"):
            action, opener = self._view()
        lower_rate = 0.92
        return Draft(
            noun=self._noun(),
            pron=self.pron,
            poss=self.poss,
            hair=hair[0],
            hair_sentence=hair[1],
            upper=self._garment("upper_type", who.upper_type, who.upper_colour)
            if show_upper
            else None,
            lower=self._garment("lower_type", who.lower_type, who.lower_colour, lower_rate)
            if show_lower
            else None,
            shoes=self._garment("shoes_type", who.shoes_type, who.shoes_colour, 0.8)
            if self._mention("shoes")
            else None,
            extras=extras,
            action=action,
            opener=opener,
            rng=self.rng,
        )


def write_captions(
    identity: Identity, shot: Shot, rng: np.random.Generator, count: int
) -> list[str]:
    """``count`` distinct captions of one image."""
    return CaptionWriter(identity, shot, rng).captions(count)
