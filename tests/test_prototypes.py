"""Style prototypes learned from captions: patterns, clusters, the template file, the CLI, the
caption stage drawing from a learned file."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from pedsynth.cli import main
from pedsynth.prompts import load_prompt, load_templates
from pedsynth.prototypes import (
    caption_pattern,
    learn_prototypes,
    render_structure,
    template_file_text,
)
from pedsynth.schemas.config import ConfigError
from pedsynth.schemas.text import CaptionConfig, EngineConfig
from pedsynth.tasks.caption import CaptionStage
from pedsynth.tasks.text_checks import check_generated

TINY_VLM = EngineConfig(model="tiny-random:llava", max_tokens=24, batch_size=16)

# Three families of sentence patterns; within a family only a word or two differs.
WEARS = [  # "A man in a red shirt and blue jeans ..."
    "A man in a red shirt and blue jeans walks down the street.",
    "A woman in a white coat and black trousers walks down the road.",
    "A man in a grey jacket and black shorts walks along the street.",
    "A woman in a pink sweater and blue jeans is walking down the street.",
    "A man in a green shirt and white trousers walks down the street.",
    "A man in a blue coat and grey jeans walks down a street.",
]
HAIR = [  # "She has long black hair ..."
    "She has long black hair and carries nothing in her hands.",
    "He has short brown hair and holds nothing in his hands.",
    "She has long blonde hair and carries nothing in her arms.",
]
BAG = [  # "The person carries a black backpack ..."
    "The person carries a black backpack on the back while crossing.",
    "The person carries a red handbag on the arm while crossing.",
]
FAMILY = {"walk": WEARS, "nothing": HAIR, "crossing": BAG}


def _family(text: str) -> str:
    return next(k for k in FAMILY if k in text)


def test_render_structure_in_the_banks_form():
    assert render_structure("A {gender} in a {upper_colour} {upper_type} and {lower_type}.") == (
        "A [person/woman/man] in a [upper clothing description] and [lower clothing description]."
    )
    # hair slots merge across "and", the word "hair" goes into the slot, "an" becomes "a",
    # a pronoun opening a sentence is capitalised
    assert render_structure(
        "{pron} has {hair_length} and {hair_colour} hair. {poss} bag is an {bag_colour} {bag_type}"
    ) == ("[He/She] has [hair description]. [His/Her] bag is a [bag description]")
    assert caption_pattern("The weather is nice today.") is None  # no attribute, no template
    # slot syntax in a caption cannot make a slot of its own
    pattern = caption_pattern("A man [sic] in a red {coat} <b>")
    assert pattern == "A [person/woman/man] sic in a [upper clothing description] b"


def test_patterns_pass_the_caption_checks_as_leaks():
    for caption in WEARS + HAIR + BAG:
        pattern = caption_pattern(caption)
        assert pattern and "[" in pattern
        outcome = check_generated(pattern, min_words=1, max_words=100)
        assert getattr(outcome, "reason", None) == "template_leak"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_prototype_per_cluster_covers_every_family(seed):
    captions = WEARS + HAIR + BAG
    protos, stats = learn_prototypes(captions, n=3, seed=seed)
    # WEARS[0] and WEARS[4] share one pattern: 10 distinct patterns of 11 captions
    assert stats == {"captions": 11, "patterned": 11, "patterns": 10, "clusters": 3}
    assert len({p.text for p in protos}) == 3
    assert sorted(_family(p.text) for p in protos) == ["crossing", "nothing", "walk"]
    # uniform over clusters: one prototype each however large; the sizes are the families'
    assert [(p.id, p.cluster_captions) for p in protos] == [
        ("p0001", 6),
        ("p0002", 3),
        ("p0003", 2),
    ]


def test_prototypes_are_deterministic_and_order_free():
    captions = WEARS + HAIR + BAG + [c.replace("A ", "One ", 1) for c in WEARS]
    shuffled = captions[:]
    random.Random(4).shuffle(shuffled)
    prov = {"source": "test", "n": 5, "seed": 0}
    first = template_file_text(learn_prototypes(captions, n=5, seed=0)[0], prov)
    again = template_file_text(learn_prototypes(captions, n=5, seed=0)[0], prov)
    reordered = template_file_text(learn_prototypes(shuffled, n=5, seed=0)[0], prov)
    assert first == again == reordered
    others = {
        template_file_text(learn_prototypes(captions, n=5, seed=s)[0], prov) for s in range(8)
    }
    for text in others:  # every seed gives a valid file of 5 distinct templates
        assert len({t["text"] for t in yaml.safe_load(text)["templates"]}) == 5


def test_fewer_patterns_than_n_gives_each_pattern_once():
    captions = HAIR + HAIR[:1] + ["Nothing to see here."]  # a duplicate and a caption w/o slot
    protos, stats = learn_prototypes(captions, n=1000, seed=0)
    assert stats == {"captions": 5, "patterned": 4, "patterns": 3, "clusters": 3}
    assert sorted(p.cluster_captions for p in protos) == [1, 1, 2]


# ---------------------------------------------------------------- the file, the CLI, the stage


@pytest.fixture(scope="module")
def procedural(tmp_path_factory):
    from pedsynth.procedural import generate

    folder = tmp_path_factory.mktemp("proto") / "bench"
    generate(folder, identities=40, images_per_identity=2, seed=3, workers=1)
    return folder


def test_cli_writes_a_bank_the_caption_stage_draws_from(procedural, tmp_path, capsys):
    out = tmp_path / "learned.yaml"
    assert main(["learn-templates", f"cuhk-pedes:{procedural}", str(out), "--n", "12"]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = json.loads((procedural / "reid_raw.json").read_text())
    train_captions = sum(len(r["captions"]) for r in records if r["split"] == "train")
    assert 0 < train_captions < sum(len(r["captions"]) for r in records)
    data = yaml.safe_load(out.read_text())
    prov = data["provenance"]
    assert prov["captions"] == train_captions  # train split only: no test caption in prompts
    assert (prov["n"], prov["seed"], prov["source"]) == (12, 0, f"cuhk-pedes:{procedural}")
    learned = {t["id"]: t["text"] for t in data["templates"]}
    assert len(learned) == 12 == summary["templates"] and len(set(learned.values())) == 12

    cfg = CaptionConfig(engine=TINY_VLM, template_share=1.0, templates=str(out))
    stage = CaptionStage(cfg, seed=0)
    jobs = [stage._job({"image_id": f"img-{i}"}, k) for i in range(60) for k in range(2)]
    assert {j.template_id for j in jobs} <= set(learned) and len({j.template_id for j in jobs}) > 6
    guided = load_prompt("caption_template")
    for job in jobs[:5]:
        assert job.prompt == guided.render(template=learned[job.template_id])
    default = CaptionStage(cfg.model_copy(update={"templates": None}), seed=0)
    assert stage.fingerprint_parts()["templates"] == load_templates(out).hash
    assert stage.fingerprint_parts()["templates"] != default.fingerprint_parts()["templates"]
    # the same command again writes the same bytes
    again = tmp_path / "again.yaml"
    assert main(["learn-templates", f"cuhk-pedes:{procedural}", str(again), "--n", "12"]) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no `templates:` list"),
        ("templates: []\n", "no `templates:` list"),
        ("templates: [{id: a}]\n", "entry 0 needs an `id` and a `text`"),
        ("templates: [{id: a, text: no slot here}]\n", "template a has no [slot]"),
        ("templates: [{id: a, text: '[x]'}, {id: a, text: '[y]'}]\n", "duplicate template ids"),
        ("templates: [{id: a, text: '[x]'\n", "not valid YAML"),
    ],
)
def test_a_bad_template_file_is_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "bank.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        CaptionStage(CaptionConfig(engine=TINY_VLM, templates=str(path)), seed=0)
    message = str(err.value)
    assert str(path) in message and says in message and "\n" not in message


def test_a_missing_template_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_templates(tmp_path / "absent.yaml")
    assert main(["learn-templates", f"cuhk-pedes:{tmp_path / 'nothing'}", "x.yaml"]) == 2


def test_a_missing_template_file_fails_the_preflight_in_one_line(procedural_small, tmp_path):
    from pedsynth.preflight import check_build
    from pedsynth.schemas.config import load_config

    missing = tmp_path / "nope.yaml"
    caption = f"caption={{engine: {{model: 'tiny-random:llava'}}, templates: '{missing}'}}"
    cfg = load_config(
        None,
        sources=[f"cuhk-pedes:{procedural_small}"],
        out=str(tmp_path / "out"),
        overrides=[caption],
    )
    with pytest.raises(ConfigError, match="nope.yaml") as caught:
        check_build(cfg)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written before the check
