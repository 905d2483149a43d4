"""The one config resolver: YAML + `--set` overrides -> a validated config, with errors naming
the file, the line and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any
import typing

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
import yaml

from mlxcore.config.base import ConfigError
from mlxcore.config.stages import PipelineConfig


def _node_line(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along `loc` (a pydantic error location)."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_errors(err: ValidationError, source: str, root: yaml.Node | None, overrides: list[str] = (),
                   label: str = "--set") -> str:
    """One line per error: where it came from (the `--set` that set the key, else the file's line), the key, why."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        # the override of this key or of a section holding it, else every override inside it (a
        # section-level check, such as warmup_steps <= steps, may be failed by any of them)
        setter = next((item for item in reversed(overrides) if _startswith(key, item.partition("=")[0])), None)
        inside = [item for item in overrides if _startswith(item.partition("=")[0], key)]
        if setter is not None or inside:
            where = f"{label} {setter}" if setter is not None else ", ".join(f"{label} {item}" for item in inside)
        else:
            line = _node_line(root, loc)
            where = f"{source}:{line}" if line else source
        lines.append(f"{where}: {key}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _startswith(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def spec(value: Any) -> Any:
    """What was chosen in a config, as plain data: validating it gives the config back.

    A nested config is always carried (its own choices may differ from its class's defaults, e.g.
    `pretrain: TrainConfig(steps=500)`); a plain field only where it was set. So a key nobody set
    keeps its default after any change elsewhere, and a model's preset fills only the shapes
    nobody chose (see `ModelConfig`)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if field.exclude:
                continue
            if name in value.model_fields_set or _has_config(item):
                out[name] = spec(item)
        return out
    if isinstance(value, (list, tuple)):
        return [spec(v) for v in value]
    if isinstance(value, dict):
        return {k: spec(v) for k, v in value.items()}
    return to_jsonable_python(value)


def _has_config(value: Any) -> bool:
    return isinstance(value, BaseModel) or (isinstance(value, (list, tuple)) and any(isinstance(v, BaseModel) for v in value))


def defaults(cls: type[BaseModel]) -> dict:
    """`spec` of a config class's defaults (its required fields left out)."""
    out = {}
    for name, field in cls.model_fields.items():
        if not field.is_required() and not field.exclude:
            value = field.get_default(call_default_factory=True)
            if _has_config(value):  # a plain default is what validation gives anyway
                out[name] = spec(value)
    return out


def _section_class(annotation) -> type[BaseModel] | None:
    """The config class of a field typed `Section` or `Section | None`."""
    for t in typing.get_args(annotation) or (annotation,):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def merge(base: dict, layer: dict, cls: type[BaseModel]) -> dict:
    """`layer` over `base` for config class `cls`: sections merge key by key; anything else is
    replaced whole, mappings too (a YAML's `tasks: {qa: 1}` means qa alone, not qa added to the
    defaults' tasks; `--set data.synthetic.tasks.qa=3` changes one weight)."""
    out = dict(base)
    for key, value in layer.items():
        field = cls.model_fields.get(key)
        sub = _section_class(field.annotation) if field is not None else None
        nested = sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value, sub) if nested else value
    return out


def fill_sections(cls: type[BaseModel], data: dict) -> dict:
    """A section that a YAML or an override brings where the default is none (e.g. `preference:`)
    starts from its class's defaults, the same as a section that was there: the one rule."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        sub, value = _section_class(field.annotation), out.get(name)
        if sub is not None and isinstance(value, dict):
            out[name] = fill_sections(sub, merge(defaults(sub), value, sub))
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sft.lr=1e-4")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type[BaseModel] = PipelineConfig):
    """Build `cls` from a YAML file (optional) plus `KEY=VALUE` overrides."""
    root, data, source = None, {}, "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is skipped
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raw = Path(path).read_bytes()
            line = raw.count(b"\n", 0, e.start) + 1
            col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col})") from None
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}:1: expected a mapping of settings, got {type(data).__name__}")
    data = fill_sections(cls, apply_overrides(merge(defaults(cls), data, cls), list(overrides)))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, root, list(overrides))) from None


def with_overrides(config: BaseModel, overrides: list[str]) -> BaseModel:
    """`config` with `KEY=VALUE` overrides applied (a flow parameter's `--set`); errors name the key."""
    if not overrides:
        return config
    data = fill_sections(type(config), apply_overrides(spec(config), list(overrides)))
    try:
        return type(config).model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "<config>", None, list(overrides), "overrides:")) from None
