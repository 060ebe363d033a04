"""The attribute lexicon: facts read from hand-written captions, and how two captions compare."""

from __future__ import annotations

import pytest

from pedsynth.lexicon import compare_facts, extract_facts, lexicon, slot_template
from pedsynth.procedural.vocabulary import COLOURS, HAIR_COLOURS, PHRASES

MAN = "A man in a red coat and blue jeans carries a black backpack."


def _compare(parent: str, child: str) -> list[str]:
    return compare_facts(extract_facts(parent), extract_facts(child))


def test_facts_of_a_caption_with_every_region():
    facts = extract_facts(
        "A young woman with long blonde hair wears a navy blue hoodie, grey jeans and white "
        "trainers. She carries a brown leather handbag and wears glasses."
    )
    assert dict(facts) == {
        "gender": ("woman",),
        "hair_colour": ("blonde",),
        "hair_length": ("long",),
        "upper_type": ("hoodie",),
        "upper_colour": ("navy",),
        "lower_type": ("jeans",),
        "lower_colour": ("grey",),
        "shoes_type": ("sneakers",),
        "shoes_colour": ("white",),
        "bag_type": ("handbag",),
        "bag_colour": ("brown",),
        "glasses": ("yes",),
    }
    assert facts.accessories == ("glasses",)


@pytest.mark.parametrize(
    ("caption", "fact", "value"),
    [
        ("He wears a shirt that is red.", "upper_colour", ("red",)),
        ("Her hair is long and brown.", "hair_colour", ("brown",)),
        ("Her hair is long and brown.", "hair_length", ("long",)),
        ("The man is dressed in black.", "clothes_colour", ("black",)),
        ("A red and white striped shirt.", "upper_colour", ("red", "white")),
        ("She has on a pair of light blue jeans.", "lower_colour", ("blue",)),
        ("A gray sweater over a dark blue shirt.", "upper_colour", ("grey", "navy")),
        ("A blonde lady walks.", "hair_colour", ("blonde",)),
        ("A bald man in a coat.", "hair_length", ("bald",)),
        ("He is not carrying a bag.", "bag_type", ("none",)),
        ("She doesn't wear glasses.", "glasses", ("no",)),
        ("A woman with a black ponytail.", "hair_style", ("ponytail",)),
    ],
)
def test_colour_and_attribute_binding(caption, fact, value):
    assert extract_facts(caption)[fact] == value


def test_colours_of_details_belong_to_their_garment_and_of_people_to_nobody():
    facts = extract_facts("A black man wears a white t-shirt with red stripes. A grey car.")
    assert facts["upper_colour"] == ("red", "white")
    assert "clothes_colour" not in facts and "hair_colour" not in facts
    striped = extract_facts("a black and white striped shirt")
    assert compare_facts(extract_facts("a white shirt with black stripes"), striped) == []


@pytest.mark.parametrize(
    "child",
    [
        "The man wears a red overcoat with navy trousers and has a black rucksack on his back.",
        "Carrying a black backpack, this guy is dressed in a red coat and dark blue pants.",
        "A man in a coat and jeans.",  # leaving facts out is faithful
        "He has a black backpack; his coat is red and his jeans are blue.",
    ],
)
def test_paraphrases_with_synonyms_agree(child):
    assert _compare(MAN, child) == []


@pytest.mark.parametrize(
    ("old", "new", "reasons"),
    [
        ("A man", "A woman", ["contradicts:gender"]),
        ("red coat", "green coat", ["contradicts:upper_colour"]),
        ("blue jeans", "grey jeans", ["contradicts:lower_colour"]),
        ("blue jeans", "blue shorts", ["contradicts:lower_type"]),
        ("red coat", "red dress", ["contradicts:upper_type"]),
        ("black backpack", "black handbag", ["contradicts:bag_type"]),
        ("black backpack", "white backpack", ["contradicts:bag_colour"]),
        ("backpack.", "backpack and an umbrella.", ["adds:umbrella"]),
        ("A man in", "A man with short black hair in", ["adds:hair"]),
        ("blue jeans", "blue jeans, white sneakers", ["adds:shoes"]),
        ("carries a black backpack", "has no bag", ["contradicts:bag_type"]),
    ],
)
def test_single_fact_changes_are_named(old, new, reasons):
    child = MAN.replace(old, new)
    assert child != MAN
    assert _compare(MAN, child) == reasons


def test_additions_to_an_item_the_parent_names():
    parent = "A woman in a shirt and black trousers carries a bag."
    assert _compare(parent, "A woman in a yellow shirt and black trousers.") == [
        "adds:upper_colour"
    ]
    assert _compare(parent, "A woman carrying a backpack.") == []  # "bag" covers a backpack
    assert _compare("A woman with long hair.", "A woman with long curly hair.") == [
        "adds:hair_style"
    ]


def test_each_garment_keeps_its_own_colour():
    parent = "He wears a black jacket over a white shirt."
    assert _compare(parent, "He wears a black jacket and a white shirt.") == []
    assert _compare(parent, "He wears a white jacket over a black shirt.") == [
        "contradicts:upper_colour"
    ]


def test_synonym_groups():
    lex = lexicon()
    assert lex.types_compatible("lower", "jeans", "trousers")
    assert not lex.types_compatible("lower", "jeans", "shorts")
    assert not lex.types_compatible("upper", "t-shirt", "tank top")
    assert lex.types_compatible("upper", "top", "jacket")
    assert lex.colours_compatible("navy", "blue")
    assert lex.colours_compatible("khaki", "beige")
    assert not lex.colours_compatible("grey", "blue")
    assert lex.colours_compatible("white", "grey", hair=True)
    assert not lex.colours_compatible("white", "grey")


def test_every_word_of_the_procedural_benchmark_is_covered():
    lex = lexicon()
    regions = {"upper_type": "upper", "lower_type": "lower", "shoes_type": "shoes"}
    regions |= {"bag_type": "bag", "hat_type": "hat"}
    for group, region in regions.items():
        for canonical, words in PHRASES[group].items():
            assert canonical in lex.types[region], canonical
            for word in words:
                (value,) = extract_facts(f"a {word}")[f"{region}_type"]
                assert lex.types_compatible(region, value, canonical), (word, value)
    for word in PHRASES["glasses"]["true"]:
        assert extract_facts(f"He wears {word}.")["glasses"] == ("yes",)
    for colour in COLOURS:
        assert extract_facts(f"a {colour} coat")["upper_colour"] == (colour,)
    for colour in HAIR_COLOURS:
        assert extract_facts(f"{colour} hair")["hair_colour"] == (colour,)
    for noun in ("lady", "girl", "female pedestrian", "gentleman", "guy", "male pedestrian"):
        assert len(extract_facts(f"a {noun}")["gender"]) == 1


def test_slot_template_is_the_sentence_pattern():
    caption = "A man with short black hair wears a red and white shirt. He carries a grey bag."
    expected = (
        "A {gender} with {hair_length} {hair_colour} hair wears a {upper_colour} {upper_type}. "
        "{pron} carries a {bag_colour} {bag_type}."
    )
    assert slot_template(caption) == expected
    other = "A woman with long blonde hair wears a blue and black shirt. She carries a red bag."
    assert slot_template(other) == expected  # same pattern, other facts
    assert slot_template("The lady is dressed in navy, with sunglasses.") == (
        "The {gender} is dressed in {clothes_colour}, with {accessory}."
    )


def test_lexicon_words_that_bridge_a_colour_and_its_noun_are_not_nouns():
    lex = lexicon()
    nouns = {"garment", "detail", "accessory", "person", "hair_noun"}
    bridging = {w for w in lex.modifiers if (w,) in lex.phrases and lex.phrases[(w,)].kind in nouns}
    assert bridging == set()
    assert "no" in lex.negations and "on" in lex.wear_words  # quoted: not YAML booleans
    assert extract_facts("a red zip-up jacket")["upper_colour"] == ("red",)
