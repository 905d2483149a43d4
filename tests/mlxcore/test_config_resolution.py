"""One resolution rule everywhere: defaults of the config (and its presets) -> YAML -> overrides.

The property: for every config class, from its defaults and from every YAML in configs/, setting
any one leaf key (`--set KEY=VALUE`, a flow's `overrides`) changes that key and nothing else.
A model preset sets only the shapes nobody chose.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from mlxcore.config import (MODEL_PRESETS, BenchRunConfig, BenchTarget, ConfigError, DistillConfig, EvalConfig,
                            ExportRunConfig, FinetuneConfig, HubPushConfig, ModelConfig, SourceConfig, PipelineConfig, PreferenceRunConfig, RewardModelRunConfig, RLConfig, VLMRunConfig, load_config, spec,
                            with_overrides)

from tests.conftest import REPO


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for name in ("base-model", "other-model"):
        (d / name).mkdir()
        (d / name / "config.json").write_text("{}")
    return d / "base-model"


def _required(cls, model_dir: Path) -> list[str]:
    return {FinetuneConfig: [f"base_model={model_dir}"], RLConfig: [f"policy={model_dir}"],
            PreferenceRunConfig: [f"init_from={model_dir}"], RewardModelRunConfig: [f"init_from={model_dir}"],
            ExportRunConfig: [f"model={model_dir}"]}.get(cls, [])


CLASS_OF = {"finetune": FinetuneConfig, "distill": DistillConfig, "rl": RLConfig, "bench": BenchRunConfig,
            "eval": EvalConfig, "preference": PreferenceRunConfig, "reward": RewardModelRunConfig, "export": ExportRunConfig,
            "vlm": VLMRunConfig}
YAMLS = sorted((REPO / "configs").glob("*.yaml"))


def _class_for(path: Path):
    return CLASS_OF.get(path.stem.split("-")[0], PipelineConfig)


def _flat(value, prefix="") -> dict[str, object]:
    """A config's dump as {dotted key: leaf value}; lists and None are leaves."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _leaves(config: BaseModel, prefix="") -> list[tuple[str, object, object]]:
    """(dotted key, current value, annotation) of every leaf field (nested configs walked)."""
    out = []
    for name, field in type(config).model_fields.items():
        if field.exclude:
            continue
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            out += _leaves(value, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", to_jsonable_python(value), field.annotation))
    return out


def _types(annotation) -> list:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [t for a in args if a is not type(None) for t in _types(a)]
    return [annotation]


def _candidates(value, annotation) -> list:
    """Values to try for a leaf, each different from `value`."""
    out = []
    for t in _types(annotation):
        origin = typing.get_origin(t)
        if origin is typing.Literal:
            out += [c for c in typing.get_args(t) if c != value]
        elif t is bool:
            out += [not value] if isinstance(value, bool) else [True, False]
        elif t is int:
            v = value if isinstance(value, int) and not isinstance(value, bool) else 4
            out += [v + 1, v * 2, v - 1, 1, 2, 7, 64]
        elif t is float:
            v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.5
            out += [v * 2, v / 2, v + 0.25, 0.5, 0.1, 0.9]
        elif t is str:
            out += [f"{value}x" if isinstance(value, str) else "x", "custom-name"]
        elif origin in (list, tuple):
            item = typing.get_args(t)[0]
            if typing.get_origin(item) is typing.Literal:  # a list of choices: another choice alone
                out += [[c] for c in typing.get_args(item) if [c] != list(value or [])]
            if isinstance(value, (list, tuple)) and len(value) > 1:
                out += [list(value[:1]), list(value)[::-1]]
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                out += [[value[0] + "x"], [value[0], value[0] + "x"]]
            else:
                out += [[_example(typing.get_args(t)[0])]]
        elif isinstance(t, type) and issubclass(t, BaseModel):
            out += [{}, _example(t)]
        elif origin is dict and isinstance(value, dict) and value:
            first = next(iter(value))
            out += [{**value, first: value[first] * 2 + 1}]
        elif origin is dict:  # an empty mapping: one entry
            key_type, value_type = typing.get_args(t)
            out += [{_example(key_type): _example(value_type)}]
    return [c for c in out if c != value]


def _example(t):
    """A small valid value of type `t` (a config: its required fields filled in)."""
    if t is BenchTarget:
        return {"kind": "random", "name": "another"}
    if t is HubPushConfig:
        return {"repo_id": "owner/name"}
    if t is SourceConfig:  # train or sources, one of the two: neither is required alone
        return {"train": ["x.jsonl"]}
    if isinstance(t, type) and issubclass(t, BaseModel):
        return {name: _example(f.annotation) for name, f in t.model_fields.items() if f.is_required()}
    if typing.get_origin(t) is typing.Literal:
        return typing.get_args(t)[0]
    if typing.get_origin(t) in (list, tuple):
        return [_example(typing.get_args(t)[0])]
    return {int: 1, float: 0.5, bool: True, str: "x.jsonl"}.get(t, "x")


# Keys that a cross-field rule lets change only beside another: set that one first, in both runs.
def _context(key: str, model_dir: Path, distill: bool = False) -> list[str]:
    section = key.rsplit(".", 1)[0]
    if key.endswith(".quantize"):
        return [f"{section}.fine_tune_type=lora", *(["student.init_from=" + str(model_dir)]
                                                    if key.startswith("train.") and distill else [])]
    if key.endswith(".lora.scale") or key.endswith(".lora.alpha"):  # one of the two, not both
        return [f"{section}.{'alpha' if key.endswith('scale') else 'scale'}=null"]
    if key == "train.fine_tune_type" and distill:  # distill: adapters need a base model
        return [f"student.init_from={model_dir}"]
    if key.endswith(".sources"):  # a mixture replaces train / val: one instead of them, in both runs
        return [f"{section}.train=[]", f"{section}.val=[]", f"{section}.sources=[{{spec: other.jsonl}}]"]
    if key.endswith(("model.num_experts_per_tok", "model.moe_intermediate_size")):  # a dense model has no experts
        return [f"{section}.num_experts=8"]
    return []


FIXED = {"DistillConfig": {"train.world_size"}}  # distillation trains on one process (a validator says so)


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _check_every_leaf(base: BaseModel, load, model_dir: Path) -> list[str]:
    """Set each leaf of `base` through `load(overrides)`; returns the leaves that broke the property."""
    problems = []
    for key, value, annotation in _leaves(base):
        if key.endswith("model.preset") or key in FIXED.get(type(base).__name__, ()):
            continue  # a preset sets its shapes too: its own test below
        context = _context(key, model_dir, distill=hasattr(base, "student"))
        before = _flat((load(context) if context else base).model_dump(mode="json"))
        cands = []
        if key.endswith(("init_from", "base_model", "policy")):
            cands = [str(d) for d in (model_dir, model_dir.parent / "other-model") if str(d) != value]
        elif key.endswith(("prompt_format", "response_format")):
            cands = ["Q: {question}"]
        tried = False
        for cand in cands + _candidates(value, annotation):
            raw = _yaml(cand)
            try:
                after_cfg = load([*context, f"{key}={raw}"])
            except ConfigError:
                continue  # not a valid value for this key (a bound, a cross-field rule): try another
            tried = True
            after = _flat(after_cfg.model_dump(mode="json"))
            changed = {k for k in set(before) | set(after) if before.get(k, "<absent>") != after.get(k, "<absent>")}
            if not changed or not changed <= {k for k in changed if k == key or k.startswith(key + ".")}:
                problems.append(f"{key}={raw}: changed {sorted(changed)}")
            break
        if not tried:
            problems.append(f"{key}: no candidate value validated ({_candidates(value, annotation)})")
    return problems


@pytest.mark.parametrize("cls", [PipelineConfig, FinetuneConfig, DistillConfig, RLConfig, BenchRunConfig, EvalConfig,
                                 PreferenceRunConfig, RewardModelRunConfig, ExportRunConfig, VLMRunConfig],
                         ids=lambda c: c.__name__)
def test_one_set_changes_exactly_its_key_from_the_defaults(cls, model_dir):
    req = _required(cls, model_dir)
    base = load_config(None, req, cls=cls)
    assert _check_every_leaf(base, lambda o: load_config(None, [*req, *o], cls=cls), model_dir) == []
    # the same rule for a flow's `overrides` on a config object (deployments, the Prefect UI)
    assert _check_every_leaf(base, lambda o: with_overrides(base, o), model_dir) == []


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_one_set_changes_exactly_its_key_on_top_of_every_yaml(path, model_dir):
    cls, req = _class_for(path), _required(_class_for(path), model_dir)
    base = load_config(path, req, cls=cls)
    assert _check_every_leaf(base, lambda o: load_config(path, [*req, *o], cls=cls), model_dir) == []


def test_overrides_keep_the_sections_defaults():
    """The turn-3 bugs: one key set used to rebuild its whole section from the class defaults."""
    assert load_config(None, ["sft.lr=1e-4"]) == PipelineConfig().model_copy(
        update={"sft": PipelineConfig().sft.model_copy(update={"lr": 1e-4})})
    assert load_config(None, ["tokenizer.vocab_size=2048"]).tokenizer.min_frequency == 500
    qwen = load_config(REPO / "configs/distill-qwen3.yaml", cls=DistillConfig)
    raw = yaml.safe_load((REPO / "configs/distill-qwen3.yaml").read_text())
    for key, value in raw.get("train", {}).items():
        assert getattr(qwen.train, key) == value, key


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_a_preset_gives_its_shapes_and_an_explicit_field_beats_it(preset):
    shapes = MODEL_PRESETS[preset]
    for model in (load_config(None, [f"model.preset={preset}"]).model,
                  with_overrides(PipelineConfig(), [f"model.preset={preset}"]).model,
                  with_overrides(DistillConfig(), [f"student.model.preset={preset}"]).student.model,
                  # a full dump (what Prefect stores as the parameter) given a new preset
                  with_overrides(PipelineConfig.model_validate(PipelineConfig().model_dump(mode="json")),
                                 [f"model.preset={preset}"]).model):
        assert {k: getattr(model, k) for k in shapes} == shapes and model.preset == preset
    mixed = load_config(None, [f"model.preset={preset}", "model.num_layers=3"]).model
    assert mixed.num_layers == 3 and mixed.hidden_size == shapes["hidden_size"]
    other = next(p for p in MODEL_PRESETS if p != preset)
    kept = with_overrides(load_config(None, [f"model.preset={preset}", "model.num_layers=3"]), [f"model.preset={other}"])
    assert kept.model.num_layers == 3 and kept.model.hidden_size == MODEL_PRESETS[other]["hidden_size"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_a_resolved_config_round_trips_through_its_spec(path, model_dir):
    cls = _class_for(path)
    config = load_config(path, _required(cls, model_dir), cls=cls)
    assert cls.model_validate(spec(config)) == config
    assert cls.model_validate(config.model_dump(mode="json")) == config  # what a Prefect parameter holds
    assert isinstance(ModelConfig.model_validate(ModelConfig().model_dump()), ModelConfig)


def test_a_section_set_where_the_default_is_none_starts_from_its_own_defaults():
    """`--set preference.train.steps=20` on a pipeline (no preference stage by default) gives the
    preference stage's defaults (its own training schedule) with only `steps` changed."""
    from mlxcore.config import PreferenceStage

    expected = PreferenceStage().train.model_copy(update={"steps": 20})
    for config in (load_config(None, ["preference.train.steps=20"]),
                   with_overrides(PipelineConfig(), ["preference.train.steps=20"])):
        assert config.preference.train == expected and config.preference.objective == PreferenceStage().objective
    assert PreferenceStage().train.lr != PipelineConfig().sft.lr  # the stage's own defaults, not TrainConfig()'s


def test_a_mapping_in_a_yaml_replaces_the_default_mapping_and_a_set_changes_one_key(tmp_path):
    """A YAML's `tasks: {qa: 1}` trains on qa alone: a mapping value is a value, not a section, so
    it replaces the defaults' (it was merged into them, and the demo's seven tasks came back)."""
    defaults = PipelineConfig().data.synthetic.tasks
    assert isinstance(defaults, dict) and len(defaults) > 2
    path = tmp_path / "qa.yaml"
    path.write_text("data:\n  synthetic:\n    tasks: {qa: 1}\n    seed: 3\n")
    config = load_config(path)
    assert config.data.synthetic.tasks == {"qa": 1.0}
    assert config.data.synthetic.seed == 3  # the section itself still merges key by key
    assert config.data.synthetic.pretrain_docs == PipelineConfig().data.synthetic.pretrain_docs
    assert config.tokenizer == PipelineConfig().tokenizer
    one = load_config(None, ["data.synthetic.tasks.qa=3"]).data.synthetic.tasks
    assert one == {**defaults, "qa": 3.0}
    assert load_config(path, ["data.synthetic.tasks.sort=2"]).data.synthetic.tasks == {"qa": 1.0, "sort": 2.0}
