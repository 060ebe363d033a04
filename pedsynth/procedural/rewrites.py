"""Rewrites of procedural captions written from the ground truth: faithful paraphrases and
single-fact corruptions.

For a caption of the procedural benchmark, :func:`mentioned` reads which facts it states (with
the benchmark's own phrase lists, ``attributes.json``'s ``phrases``, not with the lexicon a
filter uses); :class:`Writer` states exactly those facts again in sentence patterns and
synonyms of its own (none of ``captions.py``'s); :func:`corrupt` changes one fact of a kind in
:data:`KINDS` first. The faithfulness benchmark (``benchmarks/bench_filter.py``) measures the
filters on them and the ablation (``pedsynth.train.ablation``) trains on builds whose rewrites
include them.
"""

from __future__ import annotations

import json
import re

import numpy as np

KINDS = ("garment colour", "garment type", "gender", "hair colour", "bag")

# Garments a type may be swapped to: clearly different garments (a t-shirt is not a shirt's
# contradiction, a coat is).
UPPER_SWAPS = {
    "t-shirt": ["jacket", "coat", "hoodie", "sweater", "tank top", "dress"],
    "shirt": ["jacket", "coat", "hoodie", "sweater", "dress"],
    "jacket": ["t-shirt", "shirt", "hoodie", "sweater", "tank top", "dress"],
    "coat": ["t-shirt", "shirt", "hoodie", "sweater", "tank top", "dress"],
    "hoodie": ["t-shirt", "shirt", "coat", "tank top", "dress"],
    "sweater": ["t-shirt", "shirt", "jacket", "coat", "tank top", "dress"],
    "tank top": ["t-shirt", "jacket", "coat", "hoodie", "sweater", "dress"],
    "dress": ["t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater", "tank top"],
}
LOWER_SWAPS = {
    "trousers": ["shorts", "skirt", "leggings"],
    "jeans": ["shorts", "skirt", "leggings"],
    "shorts": ["trousers", "jeans", "skirt", "leggings"],
    "skirt": ["trousers", "jeans", "shorts", "leggings"],
    "leggings": ["shorts", "skirt", "jeans"],
}
BAG_SWAPS = {
    "backpack": ["handbag", "shoulder bag"],
    "handbag": ["backpack"],
    "shoulder bag": ["backpack"],
}

# The paraphrases' own words (several are not in the benchmark's captions).
WORDS = {
    "t-shirt": ["T-shirt", "tee shirt", "t-shirt"],
    "shirt": ["shirt", "button-down shirt"],
    "jacket": ["jacket", "windbreaker", "zip jacket"],
    "coat": ["coat", "trench coat", "overcoat"],
    "hoodie": ["hoodie", "hooded top"],
    "sweater": ["sweater", "knit sweater", "jumper"],
    "tank top": ["tank top", "sleeveless top"],
    "dress": ["dress", "sundress"],
    "trousers": ["trousers", "pants", "slacks"],
    "jeans": ["jeans", "denim jeans"],
    "shorts": ["shorts", "short pants"],
    "skirt": ["skirt", "pleated skirt"],
    "leggings": ["leggings", "tights"],
    "sneakers": ["sneakers", "trainers", "sports shoes"],
    "boots": ["boots", "ankle boots"],
    "leather shoes": ["leather shoes", "loafers", "shoes"],
    "sandals": ["sandals", "flip-flops"],
    "heels": ["heels", "high heels", "pumps"],
    "backpack": ["backpack", "rucksack", "school bag"],
    "handbag": ["handbag", "purse", "tote bag"],
    "shoulder bag": ["shoulder bag", "messenger bag", "satchel"],
    "cap": ["cap", "baseball cap"],
    "beanie": ["beanie", "knitted hat"],
    "hat": ["hat", "sun hat"],
    "grey": ["grey", "gray"],
    "blue": ["blue", "blue", "dark blue"],
    "man": ["man", "gentleman", "guy"],
    "woman": ["woman", "lady", "girl"],
    "person": ["person", "pedestrian"],
}
PLURAL = {"trousers", "jeans", "shorts", "leggings", "sneakers", "boots", "leather shoes"}
PLURAL |= {"sandals", "heels"}


# ------------------------------------------------------------------ what the parent states
def _phrase_at(caption: str, words: list[str]) -> re.Match | None:
    for word in sorted(words, key=len, reverse=True):
        m = re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", caption, flags=re.IGNORECASE)
        if m:
            return m
    return None


GENDER_WORDS = r"\b(man|woman|lady|guy|gentleman|girl|male|female|he|she|his|her)\b"


def mentioned(caption: str, person: dict, phrases: dict) -> dict:
    """Which facts ``caption`` states, read with the benchmark's own phrase lists: per garment
    whether its colour is said, hair, bag (``"generic"`` when only the word "bag" names it),
    hat, glasses, gender."""
    text = re.sub(r"dress shoes", "DRESS-SHOES", caption, flags=re.IGNORECASE)
    said: dict = {}
    for region in ("upper", "lower", "shoes"):
        m = _phrase_at(text, phrases[f"{region}_type"][person[f"{region}_type"]])
        if region == "shoes" and m is None and "DRESS-SHOES" in text:
            m = re.search("DRESS-SHOES", text)
        if m:
            before = text[: m.start()].lower()
            said[region] = before.endswith(person[f"{region}_colour"] + " ")
    if re.search(r"\b(hair|ponytail|bald|shaved head)\b", caption, flags=re.IGNORECASE):
        said["hair"] = True
    for item in ("bag", "hat"):
        value = person[item]
        m = value and _phrase_at(text, phrases[f"{item}_type"][value["type"]])
        if m:
            said[item] = "generic" if m.group().lower() == item else True
    if person["glasses"] and _phrase_at(text, phrases["glasses"]["true"]):
        said["glasses"] = True
    if re.search(GENDER_WORDS, caption, flags=re.IGNORECASE):
        said["gender"] = True
    return said


# ------------------------------------------------------------------ writing rewrites
class Writer:
    """Rewrites of one person's stated facts in this script's own sentence patterns."""

    def __init__(self, person: dict, said: dict, rng: np.random.Generator):
        self.p, self.said, self.rng = person, said, rng
        if "gender" in said:
            self.noun = self.word(person["gender"])
            woman = person["gender"] == "woman"
            self.pron, self.poss, self.obj = (
                ("she", "her", "her") if woman else ("he", "his", "him")
            )
        else:
            self.noun = self.word("person")
            self.pron, self.poss, self.obj = f"the {self.noun}", f"the {self.noun}'s", "them"

    def word(self, key: str) -> str:
        options = WORDS.get(key, [key])
        return options[int(self.rng.integers(len(options)))]

    def garment(self, region: str) -> str:
        kind = self.p[f"{region}_type"]
        noun = self.word(kind)
        if self.said[region]:
            noun = f"{self.word(self.p[f'{region}_colour'])} {noun}"
        if kind in PLURAL:
            return noun
        return ("an " if noun[0].lower() in "aeiou" else "a ") + noun

    def hair(self) -> str | None:
        if "hair" not in self.said:
            return None
        style, colour = self.p["hair_style"], self.word(self.p["hair_colour"])
        if style == "bald":
            return "a shaved head"
        if style == "ponytail":
            return f"{colour} hair tied into a ponytail"
        if style == "bun":
            return f"{colour} hair worn up in a bun"
        return f"{style} {colour} hair" if self.rng.random() < 0.5 else f"{colour} {style} hair"

    def hair_sentence(self) -> str | None:
        """The hair as a sentence of its own, sometimes with the colour after a copula."""
        if "hair" not in self.said:
            return None
        style, colour = self.p["hair_style"], self.word(self.p["hair_colour"])
        if style in ("short", "long", "curly") and self.rng.random() < 0.5:
            return _cap(f"{self.poss} hair is {colour} and {style}.")
        return _cap(f"{self.pron} has {self.hair()}.")

    def carried(self) -> list[str]:
        out = []
        if "bag" in self.said:
            bag = self.p["bag"]
            kind = "bag" if self.said["bag"] == "generic" else self.word(bag["type"])
            out.append(f"a {self.word(bag['colour'])} {kind}")
        if "hat" in self.said:
            hat = self.p["hat"]
            out.append(f"a {self.word(hat['colour'])} {self.word(hat['type'])}")
        if "glasses" in self.said:
            out.append("glasses")
        return out

    def write(self) -> str:
        noun, pron = self.noun, self.pron
        clothes = [self.garment(r) for r in ("upper", "lower", "shoes") if r in self.said]
        outfit = _join(clothes) if clothes else "everyday clothes"
        hair, things = self.hair(), self.carried()
        also = f" {_cap(pron)} also has {_join(things)} with {self.obj}." if things else ""
        pattern = int(self.rng.integers(5))
        if pattern == 0:
            text = f"Dressed in {outfit}, the {noun} walks along"
            text += f" with {_join(things)}." if things else "."
            text += f" {self.hair_sentence()}" if hair else ""
        elif pattern == 1:
            who = f"a {noun} with {hair}" if hair else f"a {noun}"
            text = f"{_cap(who)} can be seen in {outfit}.{also}"
        elif pattern == 2:
            text = f"Wearing {outfit}, this {noun}"
            text += f" carries {_join(things)}." if things else " is on the move."
            text += f" {self.hair_sentence()}" if hair else ""
        elif pattern == 3:
            text = f"{_cap(outfit)} make up the outfit of this {noun}."
            text += f" {self.hair_sentence()}" if hair else ""
            text += also
        else:
            text = f"The {noun} here" + (f" has {hair} and" if hair else "")
            text += f" is clothed in {outfit}.{also}"
        return " ".join(text.split())


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def corrupt(kind: str, person: dict, said: dict, rng: np.random.Generator, vocab: dict):
    """``person`` and ``said`` with one fact of ``kind`` changed, or None if not applicable."""
    p, s = json.loads(json.dumps(person)), dict(said)

    def choose(options):
        return options[int(rng.integers(len(options)))]

    if kind == "garment colour":
        regions = [r for r in ("upper", "lower", "shoes") if s.get(r)]
        if not regions:
            return None
        region = choose(regions)
        p[f"{region}_colour"] = choose(
            [c for c in vocab["upper_colour"] if c != p[f"{region}_colour"]]
        )
    elif kind == "garment type":
        regions = [r for r in ("upper", "lower") if r in s]
        if not regions:
            return None
        region = choose(regions)
        swaps = UPPER_SWAPS if region == "upper" else LOWER_SWAPS
        p[f"{region}_type"] = choose(swaps[p[f"{region}_type"]])
    elif kind == "gender":
        p["gender"] = "woman" if p["gender"] == "man" else "man"
        s["gender"] = True  # a gender the parent leaves out is added, and wrong
    elif kind == "hair colour":
        if "hair" not in s or p["hair_style"] == "bald":
            return None
        p["hair_colour"] = choose([c for c in vocab["hair_colour"] if c != p["hair_colour"]])
    elif kind == "bag":
        if p["bag"] is None:
            p["bag"] = {"type": choose(vocab["bag_type"]), "colour": choose(vocab["bag_colour"])}
            s["bag"] = True
        elif "bag" in s:
            if s["bag"] is True and rng.random() < 0.5:  # "bag" alone names no type
                p["bag"]["type"] = choose(BAG_SWAPS[p["bag"]["type"]])
            else:
                p["bag"]["colour"] = choose(
                    [c for c in vocab["bag_colour"] if c != p["bag"]["colour"]]
                )
        else:
            return None  # the person has a bag the parent does not mention
    return p, s
