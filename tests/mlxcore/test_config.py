"""Typed configs: presets, YAML overrides, and errors that name the file, line and key."""

from pathlib import Path

import pytest

from mlxcore.config import (BenchRunConfig, ConfigError, DistillConfig, EvalConfig, FinetuneConfig, ModelConfig,
                            PipelineConfig, PreferenceRunConfig, RewardModelRunConfig, ExportRunConfig, RLConfig, load_config,
                            with_overrides)

from tests.conftest import REPO


def test_presets_have_the_documented_shapes_and_sizes():
    tiny, big = ModelConfig(preset="tiny"), ModelConfig(preset="200mb")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.intermediate_size) == (256, 4, 4, 2, 704)
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.resolved_head_dim, big.intermediate_size) == (768, 15, 12, 3, 64, 2048)
    assert 97e6 < big.num_params(6400) < 99e6  # "about 98M parameters with a 6400 vocab"
    assert tiny.rope_theta == 1e6 and tiny.tie_embeddings


def test_preset_fields_can_be_overridden_and_custom_needs_every_shape():
    assert ModelConfig(preset="tiny", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="preset 'custom' needs hidden_size"):
        ModelConfig(preset="custom", num_layers=2)


def test_model_param_count_matches_the_built_model():
    from mlxcore.models.model import from_config, hf_config, num_params

    cfg = ModelConfig(preset="tiny")
    assert num_params(from_config(hf_config(cfg, 1000))) == cfg.num_params(1000)


def test_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: exp1\nsft:\n  lr: 0.0002\nmodel:\n  preset: tiny\n  num_layers: 3\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.sft.lr, cfg.model.num_layers, cfg.model.hidden_size) == ("exp1", 2e-4, 3, 256)
    assert cfg.pretrain == PipelineConfig().pretrain  # untouched sections keep their defaults


def test_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\npretrain:\n  steps: 10\n  lr: -1\n  stepz: 5\nmodel:\n  num_kv_heads: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:4: pretrain.lr: Input should be greater than or equal to 0" in msg
    assert f"{path}:5: pretrain.stepz: Extra inputs are not permitted" in msg
    assert f"{path}:6: model:" in msg and "num_kv_heads=3" in msg


def test_a_bad_set_is_reported_against_the_set_not_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\nsft:\n  lr: 0.0002\n  steps: 10\npretrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["sft.stepz=5", "model.num_layers=0", "sft.lr=oops"])
    lines = str(err.value).splitlines()[1:]
    assert "  --set sft.stepz=5: sft.stepz: Extra inputs are not permitted" in lines
    assert "  --set model.num_layers=0: model.num_layers: Input should be greater than 0" in lines
    assert any(line.startswith("  --set sft.lr=oops: sft.lr: Input should be a valid number") for line in lines)
    assert f"  {path}:6: pretrain.lr: Input should be greater than or equal to 0" in lines  # the file's own error keeps its line
    assert not any(f"{path}:3" in line or f"{path}:2" in line for line in lines)  # sft's lines set nothing wrong
    with pytest.raises(ConfigError, match="--set sft=3: sft: Input should be a valid dictionary"):
        load_config(None, ["sft=3"])
    # a section-level check names every --set inside the section (it named the last one, which set nothing wrong)
    with pytest.raises(ConfigError, match=r"--set pretrain.steps=4, --set pretrain.lr=0.001: pretrain: .*"
                                          r"warmup_steps=\d+ exceeds steps=4"):
        load_config(None, ["pretrain.steps=4", "pretrain.lr=0.001"])


def test_a_vocab_size_the_tokenizer_cannot_have_fails_before_any_stage_dir(tmp_path):
    from mlxcore.data.tokenizer import planned_size

    cfg = ModelConfig(preset="tiny", vocab_size=5000)
    with pytest.raises(ConfigError, match="model.vocab_size=5000 does not match the BPE to train \\(at most 1024"):
        cfg.check_vocab(*planned_size(PipelineConfig().tokenizer), "the BPE to train")
    ModelConfig(preset="tiny", vocab_size=900).check_vocab(1024, exact=False)  # a BPE may stop short of 1024
    with pytest.raises(ConfigError, match="does not match runs/x/tokenizer \\(420 tokens"):
        ModelConfig(preset="tiny", vocab_size=900).check_vocab(420, tokenizer="runs/x/tokenizer")
    ModelConfig(preset="tiny").check_vocab(420)  # unset: the tokenizer's size


@pytest.mark.parametrize("text, expect", [
    ("name: x\na: b: c\n", ":2: not valid YAML: mapping values are not allowed here"),
    ("- 1\n- 2\n", ":1: expected a mapping"),
    ("pretrain:\n  warmup_steps: 50\n  steps: 10\n", "warmup_steps=50 exceeds steps=10"),
])
def test_malformed_files(tmp_path, text, expect):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[")):
        load_config(path)


def test_a_config_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\nsample:\n  num_prompts: 3 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{path}:3: not UTF-8 text \\(byte 0xe9 at column 23\\)"):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["sft.lr"])
    assert load_config(None, ["sft.lr=1e-4", "model.num_layers=2"]).sft.lr == 1e-4


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repo_loads(path: Path, tmp_path):
    if path.name.startswith("finetune-"):  # the finetune flow's configs need a model dir
        (tmp_path / "config.json").write_text("{}")
        assert isinstance(load_config(path, [f"base_model={tmp_path}"], cls=FinetuneConfig), FinetuneConfig)
        with pytest.raises(ConfigError, match=r"finetune-lora.yaml:\d+: base_model: .*not a local model dir"):
            load_config(path, cls=FinetuneConfig)
    elif path.name.startswith("distill-"):
        assert isinstance(load_config(path, cls=DistillConfig), DistillConfig)
    elif path.name.startswith("rl-"):
        config = load_config(path, cls=RLConfig)
        with pytest.raises(ConfigError, match="policy: .*not a local model dir"):
            config.check_policy()
    elif path.name.startswith("bench-"):
        assert len(load_config(path, cls=BenchRunConfig).targets) >= 2
    elif path.name.startswith("eval-"):
        assert isinstance(load_config(path, cls=EvalConfig), EvalConfig)
    elif path.name.startswith("preference-"):
        assert load_config(path, cls=PreferenceRunConfig).init_from.startswith("runs/")
    elif path.name.startswith("reward-"):
        assert load_config(path, cls=RewardModelRunConfig).init_from.startswith("runs/")
    elif path.name.startswith("vlm-"):
        from mlxcore.config import VLMRunConfig

        assert isinstance(load_config(path, cls=VLMRunConfig), VLMRunConfig)
    elif path.name.startswith("export-"):
        config = load_config(path, cls=ExportRunConfig)
        assert config.model.startswith("runs/") and config.gguf and config.gate is not None
    else:
        assert isinstance(load_config(path), PipelineConfig)


def test_distill_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("teacher:\n  api: grpc\ntarget_rows: 10\nstream:\n  val_rows: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, cls=DistillConfig)
    assert f"{bad}:2: teacher.api" in str(e.value)
    with pytest.raises(ConfigError, match="target_rows=10 leaves no training rows"):
        load_config(None, ["target_rows=10"], cls=DistillConfig)
    with pytest.raises(ConfigError, match="set student.init_from"):
        load_config(None, ["train.fine_tune_type=lora"], cls=DistillConfig)
    with pytest.raises(ConfigError, match="overrides: teacher.workers=0: teacher.workers"):
        with_overrides(DistillConfig(), ["teacher.workers=0"])
    assert with_overrides(DistillConfig(), ["target_rows=500"]).target_rows == 500


def test_demo_yaml_spells_out_the_embedded_defaults():
    assert load_config(REPO / "configs/demo.yaml") == PipelineConfig()
