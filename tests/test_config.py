from pathlib import Path

import pytest
import yaml

from pedsynth.schemas.config import BuildConfig, ConfigError, SourceConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["offline-tiny", "cpu-small", "gpu"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.sources, "every shipped config names its inputs"
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    for key, value in raw.items():  # every value in the file reached the validated config
        if not isinstance(value, dict | list):
            assert getattr(cfg, key) == value, key


def test_error_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("shard_rows: 10\ningest:\n  max_pixels: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "ingest.max_pixels" in msg and "'lots'" in msg and str(path) in msg


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("shard_row: 10\n")
    with pytest.raises(ConfigError, match="shard_row"):
        load_config(path)


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: a\nshard_rows: 10\nsources: [{format: folder, path: x}]\n")
    cfg = load_config(
        path,
        sources=["rstpreid:/data/R", "shards:/old"],
        out="b",
        overrides=["shard_rows=7", "ingest.min_side=3"],
    )
    assert cfg.out == "b" and cfg.shard_rows == 7 and cfg.ingest.min_side == 3
    assert [(s.format, s.path) for s in cfg.sources] == [
        ("rstpreid", "/data/R"),
        ("shards", "/old"),
    ]


@pytest.mark.parametrize(
    "spec, match", [("cuhk-pedes", "FORMAT:PATH"), ("coco:/x", "unknown format 'coco'")]
)
def test_bad_source_spec(spec, match):
    with pytest.raises(ConfigError, match=match):
        SourceConfig.parse(spec)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, overrides=["shard_rows"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_duplicate_source_names_rejected():
    with pytest.raises(ConfigError, match="share the name"):
        load_config(None, sources=["folder:/a", "folder:/b"])
    cfg = BuildConfig(
        sources=[
            SourceConfig(format="folder", path="/a"),
            SourceConfig(format="folder", path="/b", name="other"),
        ]
    )
    assert [s.label for s in cfg.sources] == ["folder", "other"]


def test_set_reaches_into_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sources: [{format: procedural, path: p, identities: 200}]\n")
    cfg = load_config(path, overrides=["sources.0.identities=30", "ingest.min_side=4"])
    assert cfg.sources[0].identities == 30 and cfg.ingest.min_side == 4
    with pytest.raises(ConfigError, match="no item '3'"):
        load_config(path, overrides=["sources.3.path=x"])
    with pytest.raises(ConfigError, match="'path' is not a section"):
        load_config(path, overrides=["sources.0.path.x=1"])


@pytest.mark.parametrize("stage", ["caption", "rewrite"])
def test_word_limits_out_of_order_are_refused(stage):
    with pytest.raises(ConfigError, match=r"min_words \(50\) must not exceed max_words \(10\)"):
        load_config(
            None,
            overrides=[
                f"{stage}={{engine: {{model: m}}}}",
                f"{stage}.min_words=50",
                f"{stage}.max_words=10",
            ],
        )


def test_booleans_are_not_numbers():
    with pytest.raises(ConfigError, match="shard_rows = True: .*expected a number, got true"):
        load_config(None, overrides=["shard_rows=true"])
    with pytest.raises(ConfigError, match="ingest.min_side = False"):
        load_config(None, overrides=["ingest.min_side=false"])
    assert load_config(None, overrides=["write.card_plots=false"]).write.card_plots is False
