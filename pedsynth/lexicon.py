"""The attribute lexicon of pedestrian captions: which facts a caption states, and whether a
derived caption keeps its parent's facts.

:func:`extract_facts` reads a caption into :class:`Facts`: ``gender``, ``hair_colour``,
``hair_length``, ``hair_style``, ``<region>_type`` and ``<region>_colour`` for the regions
``upper``, ``lower``, ``shoes``, ``bag`` and ``hat``, ``clothes_colour`` (a colour worn without
a garment: "dressed in black") and one fact per accessory (``glasses``, ``umbrella``, ...; value
``yes`` or ``no``). Values are the lexicon's canonical keys (``navy``, ``jeans``, ``man``); a
negated item ("without a bag") has the type ``none``. The vocabulary is
``pedsynth/prompts/lexicon.yaml``, read once.

Colour binding: a colour (or a hair adjective) describes the nearest following noun of the
same phrase: other colours, modifiers ("light", "striped", "pair of") and at most one unknown
word may stand between ("a red and white striped shirt", "a pair of blue jeans"). A colour with
no such noun looks back over a copula ("a shirt that is red", "her hair is long and brown");
after a wear word with no garment ("wearing red", "a man in black") it is a ``clothes_colour``.
A colour of a garment's detail ("a white shirt with black stripes") is a second colour of that
garment; a colour of another noun ("a black man", "a red car") is no fact.

:func:`compare_facts` returns reasons, in a fixed fact order: ``contradicts:<fact>`` when both
captions state the fact and the child's value is compatible with none of the parent's (jeans ~
trousers and navy ~ blue are compatible; jeans vs shorts and grey vs blue are not; each garment's
colour is compared with the parent's garment of a compatible type, so swapping the colours of
a jacket and the shirt under it is caught), and ``adds:<item>`` (``adds:bag``) or
``adds:<fact>`` (``adds:upper_colour``) when the child states something the parent does not.
Leaving a fact out is faithful; so is a negative the parent does not state ("no bag").

:func:`slot_template` is the caption's sentence pattern: every attribute phrase replaced by its
slot, the rest of the text kept as written. Slots: ``{gender}`` (man, lady, ...), ``{pron}``
(he/she), ``{poss}`` (his/her), ``{obj}`` (him), ``{refl}`` (himself/herself),
``{hair_colour}``, ``{hair_length}``, ``{hair_style}``, ``{<region>_type}``,
``{<region>_colour}``, ``{clothes_colour}``, ``{colour}`` (a colour of a detail), and
``{accessory}``. Colours of one noun joined by "and", "or", "," or "-" become one slot
("{upper_colour} {upper_type}" for "red and white shirt"). The same caption always gives the
same template.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

REGIONS = ("upper", "lower", "shoes", "bag", "hat")
HAIR_FACTS = ("hair_colour", "hair_length", "hair_style")
PERSON_FACTS = ("gender", *HAIR_FACTS)
NONE = "none"  # the type of a negated item ("without a bag")
_WORD = re.compile(r"[a-z0-9]+|[.,;:!?()]")
_SENTENCE_END = frozenset(".;:!?()")
_PRONOUNS = {
    "he": "pron",
    "she": "pron",
    "his": "poss",
    "her": "poss",
    "hers": "poss",
    "him": "obj",
    "himself": "refl",
    "herself": "refl",
}
_CONNECTORS = re.compile(r"^[\s,/-]*(?:(?:and|or)[\s,/-]*)?$", re.IGNORECASE)
_NEGATION_REACH = 5  # words between a negation and the item it negates
_BACK_REACH = 8


@dataclass(frozen=True)
class _Entry:
    kind: str  # colour garment hair_noun hair_adj bald accessory gender detail person
    value: str | None
    region: str | None = None
    fact: str | None = None  # hair_adj: hair_length or hair_style


@dataclass(frozen=True)
class _Unit:
    """A matched phrase or a single word, with its character span in the caption."""

    kind: str  # an _Entry kind, "word" or "punct"
    value: str | None
    start: int
    end: int
    entry: _Entry | None = None


class Lexicon:
    """The vocabulary of ``lexicon.yaml`` as phrase tables and compatibility relations."""

    def __init__(self, data: dict[str, Any]):
        self.phrases: dict[tuple[str, ...], _Entry] = {}
        self.colour_senses: dict[str, frozenset[str]] = {}
        for key, spec in data["colours"].items():
            self.colour_senses[key] = frozenset(spec.get("senses") or [key])
            for word in spec["words"]:
                self._add(word, _Entry("colour", key))
        self.hair_only = frozenset(data["hair_only"])
        self.hair_senses = {
            key: frozenset(v) | self.colour_senses[key] for key, v in data["hair_senses"].items()
        }
        self.types: dict[str, dict[str, frozenset[str]]] = {}
        for region, types in data["garments"].items():
            self.types[region] = {}
            for name, spec in types.items():
                self.types[region][name] = frozenset(spec.get("compatible") or [])
                for word in spec["words"]:
                    self._add(word, _Entry("garment", name, region))
        self.accessories = tuple(data["accessories"])
        for name, words in data["accessories"].items():
            for word in words:
                self._add(word, _Entry("accessory", name))
        for gender, words in data["gender"].items():
            for word in words:
                self._add(word, _Entry("gender", gender))
        for word, style in data["hair_nouns"].items():
            self._add(word, _Entry("hair_noun", style))
        for word, (fact, value) in data["hair_adjectives"].items():
            self._add(word, _Entry("hair_adj", value, fact=fact))
        self.hair_compatible = {
            fact: frozenset(frozenset(pair) for pair in pairs)
            for fact, pairs in data["hair_compatible"].items()
        }
        for word in data["bald"]:
            self._add(word, _Entry("bald", "bald"))
        for word in data["garment_details"]:
            self._add(word, _Entry("detail", "garment"))
        for word in data["detail_nouns"]:
            self._add(word, _Entry("detail", None))
        for word in data["person_nouns"]:
            self._add(word, _Entry("person", None))
        self.modifiers = _strings(data["modifiers"])
        self.copulas = _strings(data["copulas"])
        self.wear_words = _strings(data["wear_words"])
        self.negations = _strings(data["negations"])
        self.longest = max(len(k) for k in self.phrases)

    def _add(self, phrase: str, entry: _Entry) -> None:
        if not isinstance(phrase, str):  # YAML reads a bare no/on/yes as a boolean
            raise TypeError(f"lexicon phrase {phrase!r} is not a string: quote it")
        key = tuple(_WORD.findall(phrase.lower()))
        if key in self.phrases and self.phrases[key] != entry:
            raise ValueError(f"lexicon phrase {phrase!r} is both {self.phrases[key]} and {entry}")
        self.phrases[key] = entry

    # ------------------------------------------------------------------ compatibility
    def colours_compatible(self, a: str, b: str, hair: bool = False) -> bool:
        senses = self.hair_senses if hair else {}
        left = senses.get(a) or self.colour_senses[a]
        right = senses.get(b) or self.colour_senses[b]
        return bool(left & right)

    def types_compatible(self, region: str, a: str | None, b: str | None) -> bool:
        if a is None or b is None or a == b:
            return True
        if NONE in (a, b):
            return False
        table = self.types[region]
        return b in table[a] or a in table[b]

    def values_compatible(self, fact: str, a: str, b: str) -> bool:
        if a == b:
            return True
        if fact == "hair_colour":
            return self.colours_compatible(a, b, hair=True)
        if fact.endswith("_colour"):
            return self.colours_compatible(a, b)
        if fact.endswith("_type"):
            return self.types_compatible(fact.removesuffix("_type"), a, b)
        return frozenset((a, b)) in self.hair_compatible.get(fact, frozenset())

    # ------------------------------------------------------------------ reading
    def units(self, caption: str) -> list[_Unit]:
        """The caption as matched phrases (longest first) and plain words."""
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in caption)
        tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(low)]
        units: list[_Unit] = []
        i = 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                entry = self.phrases.get(tuple(t for t, _, _ in tokens[i : i + n]))
                if entry is not None:
                    start, end = tokens[i][1], tokens[i + n - 1][2]
                    units.append(_Unit(entry.kind, entry.value, start, end, entry))
                    i += n
                    break
            else:
                word, start, end = tokens[i]
                kind = "punct" if word in _SENTENCE_END or word == "," else "word"
                units.append(_Unit(kind, word, start, end))
                i += 1
        return units


def _strings(words: list[Any]) -> frozenset[str]:
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(f"lexicon words {bad!r} are not strings: quote them")
    return frozenset(words)


@functools.cache
def lexicon() -> Lexicon:
    """The packaged lexicon, read once per process."""
    text = resources.files("pedsynth.prompts").joinpath("lexicon.yaml").read_text("utf-8")
    return Lexicon(yaml.safe_load(text))


_NOUNS = frozenset({"garment", "hair_noun", "accessory", "detail", "person"})
_ATTRIBUTES = frozenset({"colour", "hair_adj"})


class _Reader:
    """Binds each attribute word of one caption to what it describes."""

    def __init__(self, lex: Lexicon, caption: str):
        self.lex, self.caption = lex, caption
        self.units = lex.units(caption)
        # the surface word of gender units (pronouns are not nouns)
        self.surface = [caption[u.start : u.end].lower() for u in self.units]
        self.binding: dict[int, int | str] = {}  # attribute unit -> noun unit or "clothes"
        for j, unit in enumerate(self.units):
            if unit.kind in _ATTRIBUTES:
                target = self._forward(j)
                if target is None:
                    target = self._backward(j)
                if target is not None:
                    self.binding[j] = target

    def _noun(self, k: int) -> bool:
        u = self.units[k]
        return u.kind in _NOUNS or (u.kind == "gender" and self.surface[k] not in _PRONOUNS)

    def _skippable(self, k: int) -> bool:
        u = self.units[k]
        return u.kind in _ATTRIBUTES or (u.kind == "word" and u.value in self.lex.modifiers)

    def _forward(self, j: int) -> int | None:
        units, n = self.units, len(self.units)
        k, unknown, after_and = j + 1, False, False
        while k < n:
            u = units[k]
            if self._noun(k):
                return k
            if after_and and u.kind == "word" and u.value in ("a", "an", "the"):
                return None  # "red and a white shirt": a new noun phrase begins
            if self._skippable(k):
                after_and = after_and or u.value in ("and", "or")
                k += 1
                continue
            if u.kind == "punct" and u.value == "," and k + 1 < n:
                if units[k + 1].kind == "colour":
                    k += 1
                    continue
                return None
            if u.kind == "word" and not unknown and k + 1 < n and self._noun(k + 1):
                unknown = True
                k += 1
                continue
            return None
        return None

    def _backward(self, j: int) -> int | str | None:
        units, lex = self.units, self.lex
        k = j - 1
        while k >= 0 and (self._skippable(k) or units[k].value == ","):
            if units[k].kind == "word" and units[k].value in lex.copulas | lex.wear_words:
                break
            k -= 1
        if k < 0 or units[k].kind != "word":
            return None
        word = units[k].value
        if word == "in" and k > 0 and units[k - 1].kind == "garment":
            return k - 1  # "a shirt in red"
        if word in lex.wear_words:
            return "clothes"
        if word not in lex.copulas:
            return None
        skipped = 0
        for i in range(k - 1, max(-1, k - 1 - _BACK_REACH), -1):
            u = units[i]
            if u.kind == "punct" and u.value in _SENTENCE_END:
                return None
            if self._noun(i):
                return "clothes" if u.kind in ("person", "gender") else i
            if u.kind == "word" and u.value in lex.wear_words:
                return "clothes"
            if u.kind == "word" and u.value not in lex.copulas and u.value not in lex.modifiers:
                skipped += 1
                if skipped > 3:
                    return None
        return None

    def owner(self, k: int) -> int | None:
        """The garment a detail at ``k`` belongs to: the nearest one before it in the clause."""
        for i in range(k - 1, max(-1, k - 1 - _BACK_REACH), -1):
            u = self.units[i]
            if u.kind == "punct" and u.value in _SENTENCE_END:
                return None
            if u.kind == "garment":
                return i
            if self._noun(i) and u.kind != "detail":
                return None
        return None

    def negated(self, k: int) -> bool:
        for i in range(k - 1, max(-1, k - 1 - _NEGATION_REACH), -1):
            u = self.units[i]
            if u.kind == "punct" or self._noun(i):
                return False
            if u.kind != "word":
                continue
            if u.value in self.lex.negations:
                return True
            following = self.units[i + 1] if i + 1 < len(self.units) else None
            if u.value.endswith("n") and following is not None and following.value == "t":
                return True  # "doesn't", "isn't": the apostrophe splits the word
        return False


@dataclass(frozen=True)
class Mention:
    """One item a caption names: its region, type (``none`` when negated) and colours."""

    region: str
    type: str
    colours: tuple[str, ...]


@dataclass(frozen=True)
class Facts(Mapping[str, tuple[str, ...]]):
    """What a caption states: fact name -> its values (sorted), plus each item it names."""

    values: tuple[tuple[str, tuple[str, ...]], ...]
    mentions: tuple[Mention, ...] = ()

    def __getitem__(self, key: str) -> tuple[str, ...]:
        for name, value in self.values:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.values)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def accessories(self) -> tuple[str, ...]:
        """The accessories the caption says the person has."""
        names = lexicon().accessories
        return tuple(a for a in names if "yes" in self.get(a, ()))


def extract_facts(caption: str) -> Facts:
    """The facts ``caption`` states about its person (see the module docstring)."""
    lex = lexicon()
    reader = _Reader(lex, caption)
    facts: dict[str, set[str]] = {}
    mentions: list[Mention] = []

    def add(fact: str, value: str) -> None:
        facts.setdefault(fact, set()).add(value)

    bound: dict[int | str, list[_Unit]] = {}
    for j, target in reader.binding.items():
        bound.setdefault(target, []).append(reader.units[j])
    extra: dict[int, list[str]] = {}  # garment unit -> colours of its details
    for k, unit in enumerate(reader.units):
        colours = [a.value for a in bound.get(k, []) if a.kind == "colour"]
        if unit.kind == "detail" and unit.value == "garment" and colours:
            owner = reader.owner(k)  # "a white shirt with black stripes"
            if owner is not None:
                extra.setdefault(owner, []).extend(colours)
    for k, unit in enumerate(reader.units):
        attrs = bound.get(k, [])
        colours = [a.value for a in attrs if a.kind == "colour"] + extra.get(k, [])
        if unit.kind == "gender":
            add("gender", unit.value)
            if reader.surface[k] not in _PRONOUNS:
                for c in colours:
                    if c in lex.hair_only:
                        add("hair_colour", c)  # "a blonde woman"
        elif unit.kind == "person":
            for c in colours:
                if c in lex.hair_only:
                    add("hair_colour", c)
        elif unit.kind == "bald":
            add("hair_length", "bald")
        elif unit.kind == "hair_noun":
            for c in colours:
                add("hair_colour", c)
            for a in attrs:
                if a.kind == "hair_adj":
                    add(a.entry.fact, a.value)
            if unit.value:
                add("hair_style", unit.value)
        elif unit.kind == "garment":
            region = unit.entry.region
            negated = reader.negated(k)
            kept = () if negated else tuple(sorted({c for c in colours if c not in lex.hair_only}))
            mentions.append(Mention(region, NONE if negated else unit.value, kept))
            add(f"{region}_type", NONE if negated else unit.value)
            for c in kept:
                add(f"{region}_colour", c)
        elif unit.kind == "accessory":
            add(unit.value, "no" if reader.negated(k) else "yes")
    for unit in bound.get("clothes", []):
        if unit.kind == "colour" and unit.value not in lex.hair_only:
            add("clothes_colour", unit.value)
    return Facts(
        tuple((name, tuple(sorted(facts[name]))) for name in _fact_order(facts)),
        tuple(mentions),
    )


def _fact_order(names: Mapping[str, Any] | set[str]) -> list[str]:
    order = [
        *PERSON_FACTS,
        *(f"{r}_{p}" for r in REGIONS for p in ("type", "colour")),
        "clothes_colour",
        *lexicon().accessories,
    ]
    return [n for n in order if n in names]


def compare_facts(parent: Facts, child: Facts) -> list[str]:
    """Why ``child`` is not faithful to ``parent``: ``contradicts:<fact>`` / ``adds:<...>``,
    in fact order, each once; ``[]`` when every fact the child states is supported."""
    lex = lexicon()
    reasons: list[str] = []

    def say(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    def check(fact: str, item: str, parent_has_item: bool) -> None:
        mine = [v for v in child.get(fact, ()) if v not in (NONE, "no")]
        negatives = [v for v in child.get(fact, ()) if v in (NONE, "no")]
        theirs = parent.get(fact, ())
        if not theirs:
            if mine:
                say(f"adds:{fact}" if parent_has_item else f"adds:{item}")
            return
        for value in mine + negatives:
            if not any(lex.values_compatible(fact, value, p) for p in theirs):
                say(f"contradicts:{fact}")

    check("gender", "gender", False)
    parent_hair = any(f in parent for f in HAIR_FACTS)
    for fact in HAIR_FACTS:
        check(fact, "hair", parent_hair)
    for region in REGIONS:
        has_region = f"{region}_type" in parent or f"{region}_colour" in parent
        check(f"{region}_type", region, has_region)
        _check_colours(lex, parent, child, region, has_region, say)
    check_clothes = child.get("clothes_colour", ())
    if check_clothes:
        worn = set(parent.get("clothes_colour", ()))
        for region in ("upper", "lower", "shoes"):
            worn |= set(parent.get(f"{region}_colour", ()))
        if not worn:
            say("adds:clothes_colour")
        elif not all(any(lex.colours_compatible(c, w) for w in worn) for c in check_clothes):
            say("contradicts:clothes_colour")
    for name in lex.accessories:
        check(name, name, False)
    return reasons


def _check_colours(lex: Lexicon, parent: Facts, child: Facts, region: str, has_region, say):
    fact = f"{region}_colour"
    theirs = [m for m in parent.mentions if m.region == region and m.type != NONE]
    all_theirs = {c for m in theirs for c in m.colours}
    for mine in (m for m in child.mentions if m.region == region and m.colours):
        candidates = [
            m for m in theirs if m.colours and lex.types_compatible(region, m.type, mine.type)
        ]
        if candidates:
            fits = any(
                all(any(lex.colours_compatible(c, p) for p in m.colours) for c in mine.colours)
                for m in candidates
            )
        elif all_theirs:
            fits = all(any(lex.colours_compatible(c, p) for p in all_theirs) for c in mine.colours)
        elif parent.get("clothes_colour") and region != "bag" and region != "hat":
            worn = parent["clothes_colour"]
            fits = all(any(lex.colours_compatible(c, p) for p in worn) for c in mine.colours)
        else:
            say(f"adds:{fact}" if has_region else f"adds:{region}")
            continue
        if not fits:
            say(f"contradicts:{fact}")


def slot_template(caption: str) -> str:
    """``caption`` with each attribute phrase replaced by its slot (module docstring)."""
    lex = lexicon()
    reader = _Reader(lex, caption)
    slots: list[tuple[int, int, str]] = []
    for k, unit in enumerate(reader.units):
        slot = _slot(lex, reader, k, unit)
        if slot is None:
            continue
        if slots and slot.endswith("colour}") and slots[-1][2] == slot:
            gap = caption[slots[-1][1] : unit.start]
            if _CONNECTORS.match(gap):
                slots[-1] = (slots[-1][0], unit.end, slot)
                continue
        slots.append((unit.start, unit.end, slot))
    out, last = [], 0
    for start, end, slot in slots:
        out.append(caption[last:start])
        out.append(slot)
        last = end
    out.append(caption[last:])
    return " ".join("".join(out).split())


def _slot(lex: Lexicon, reader: _Reader, k: int, unit: _Unit) -> str | None:
    if unit.kind == "gender":
        role = _PRONOUNS.get(reader.surface[k])
        return "{" + (role or "gender") + "}"
    if unit.kind == "garment":
        return "{" + f"{unit.entry.region}_type" + "}"
    if unit.kind == "accessory":
        return "{accessory}"
    if unit.kind == "bald":
        return "{hair_length}"
    if unit.kind == "hair_noun":
        return "{hair_style}" if unit.value else None
    target = reader.binding.get(k)
    target_unit = reader.units[target] if isinstance(target, int) else None
    if unit.kind == "hair_adj":
        if target_unit is not None and target_unit.kind == "hair_noun":
            return "{" + unit.entry.fact + "}"
        return None
    if unit.kind != "colour":
        return None
    if target == "clothes":
        return "{clothes_colour}" if unit.value not in lex.hair_only else "{hair_colour}"
    if target_unit is None:
        return "{hair_colour}" if unit.value in lex.hair_only else "{colour}"
    if target_unit.kind == "garment" and unit.value not in lex.hair_only:
        return "{" + f"{target_unit.entry.region}_colour" + "}"
    if target_unit.kind == "hair_noun" or unit.value in lex.hair_only:
        return "{hair_colour}"
    return "{colour}"
