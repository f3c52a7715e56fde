"""Typed config loading: unknown keys, wrong types and bad overrides are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.dataset.prep_config import PrepConfig
from pipeline.loader.stream import DataConfig


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides_build_typed_config(tmp_path):
    p = _yaml(tmp_path, "out_dir: d\nseq_len: 64\ntokenizer:\n  vocab_size: 1000\n")
    cfg = load_config(PrepConfig, p, ["tokenizer.model_type=unigram", "val_fraction=0", "corpus=[a.txt, b/]"])
    assert cfg.seq_len == 64
    assert cfg.tokenizer.vocab_size == 1000
    assert cfg.tokenizer.model_type == "unigram"
    assert cfg.val_fraction == 0.0 and isinstance(cfg.val_fraction, float)
    assert cfg.corpus == ["a.txt", "b/"]


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(
        PrepConfig, _yaml(tmp_path, "out_dir: d\nval_fraction: 5e-3\n"), ["tokenizer.character_coverage=1e0"]
    )
    assert cfg.val_fraction == 0.005 and cfg.tokenizer.character_coverage == 1.0
    with pytest.raises(ConfigError, match=r"key 'val_fraction': got 'lots', expected a number"):
        load_config(PrepConfig, None, ["out_dir=d", "val_fraction=lots"])


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = _yaml(tmp_path, "out_dir: d\ntokenizer:\n  vocab_sise: 1000\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml: key 'tokenizer\.vocab_sise': unknown key \(did you mean 'vocab_size'\?\)",
    ):
        load_config(PrepConfig, p)


def test_wrong_type_and_bad_choice_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'seq_len': got 'long', expected an integer"):
        load_config(PrepConfig, _yaml(tmp_path, "out_dir: d\nseq_len: long\n"))
    with pytest.raises(
        ConfigError, match=r"key 'tokenizer\.model_type': got 'wordpiece', expected one of 'bpe', 'unigram'"
    ):
        load_config(PrepConfig, None, ["out_dir=d", "tokenizer.model_type=wordpiece"])
    with pytest.raises(
        ConfigError, match=r"key 'on_corrupt_shard': got 'ignore', expected one of 'fail', 'skip'"
    ):
        load_config(DataConfig, None, ["on_corrupt_shard=ignore"])


def test_missing_required_key_and_value_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key\(s\) out_dir"):
        load_config(PrepConfig, _yaml(tmp_path, "seq_len: 64\n"))
    with pytest.raises(ConfigError, match=r"key 'val_fraction': got 0\.7, expected 0 <= x < 0\.5"):
        load_config(PrepConfig, None, ["out_dir=d", "val_fraction=0.7"])
    with pytest.raises(ConfigError, match=r"key 'data\.batch_size': got 0"):
        load_config(DataConfig, None, ["batch_size=0"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'seq_len': expected key=value"):
        parse_overrides(["seq_len"])
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(PrepConfig, tmp_path / "nope.yaml")
    with pytest.raises(
        ConfigError, match=r"override 'tokenizer\.vocab_size\.x': 'vocab_size' is a value, not a section"
    ):
        parse_overrides(["tokenizer.vocab_size=3", "tokenizer.vocab_size.x=1"])


def test_shipped_dataset_configs_load():
    from data_prep.prepare import load_dataset_config
    from data_prep.task_sft import TaskDataConfig

    kinds = {}
    for path in sorted(Path("configs/data").glob("*.yaml")):
        cfg = load_dataset_config(str(path))
        assert cfg.train_shards >= 1, path
        kinds[path.name] = type(cfg)
    assert kinds["sample.yaml"] is PrepConfig and kinds["tasks.yaml"] is TaskDataConfig


def test_resolved_config_file_is_every_default_and_loads_back_exactly(tmp_path):
    import json
    from dataclasses import asdict, replace

    from pipeline.train_config import load_resolved_config, load_train_config, write_resolved_config

    cfg = load_train_config(
        "configs/train/local.yaml", ["steps=7", "tracking.uri=https://u:pw@mlflow.example/x"]
    )
    path = write_resolved_config(cfg, tmp_path / "config.json")
    written = json.loads(path.read_text())
    assert (
        written["optim"]["beta2"] == 0.95 and written["model"]["n_layers"] == cfg.model.n_layers
    )  # defaults, preset
    assert "pw" not in path.read_text() and written["tracking"]["uri"] == "https://mlflow.example/x"
    back = load_resolved_config(path)
    assert back == replace(cfg, tracking=replace(cfg.tracking, uri="https://mlflow.example/x"))
    # what a started run adds (its machine's decisions) is not an input
    written["runtime"] = {"precision": "fp32"}
    path.write_text(json.dumps(written))
    assert load_resolved_config(path) == back
    assert asdict(back)["steps"] == 7


def test_a_resolved_config_is_not_overridden(tmp_path, capsys):
    from pipeline.train import main
    from pipeline.train_config import load_train_config, write_resolved_config

    path = write_resolved_config(load_train_config("configs/train/local.yaml"), tmp_path / "config.json")
    assert main(["--resolved", str(path), "steps=3"]) == 2
    assert "loaded as is" in capsys.readouterr().err
