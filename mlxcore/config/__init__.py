"""Typed configs, one per concern (a module each: base, model, data, train, bench, stages, rl,
vlm; `resolver` loads YAML and `--set` overrides). Presets are named instances; YAML only overrides them.

Every model rejects unknown keys, so a typo in a YAML file is an error that names the key,
the file and the line, never a silently ignored setting.
"""

from __future__ import annotations

from mlxcore.distill.schema import PromptConfig, TeacherConfig, VerifyPolicy  # noqa: F401 (distill's, re-exported)

from mlxcore.config.base import (  # noqa: F401
    ConfigError, TrackingConfig,
)
from mlxcore.config.model import (  # noqa: F401
    LORA_KEYS, LoRAConfig, MODEL_PRESETS, ModelConfig, QuantizeConfig,
)
from mlxcore.config.data import (  # noqa: F401
    DataConfig, FilterConfig, MixSource, ROW_FORMAT, SourceConfig, SyntheticConfig, SyntheticTask,
    TokenizerConfig,
)
from mlxcore.config.train import (  # noqa: F401
    DistributedConfig, HostConfig, SampleConfig, TrainConfig,
)
from mlxcore.config.bench import (  # noqa: F401
    BENCH_SUITES, BenchConfig, BenchRunConfig, BenchTarget, EvalConfig, ExportConfig, ExportFormat,
    ExportRunConfig, GGUF_TYPES, GateTolerance, HubPushConfig, ParityGateConfig, SuiteName,
)
from mlxcore.config.stages import (  # noqa: F401
    DEMO_TASKS, DistillConfig, FinetuneConfig, PipelineConfig, PreferenceObjective,
    PreferenceRunConfig, PreferenceSourceConfig, PreferenceStage, PromotionConfig,
    RewardModelRunConfig, StreamConfig, StudentConfig, SyntheticPairsConfig,
)
from mlxcore.config.rl import (  # noqa: F401
    JUDGE_TEMPLATE, JudgeConfig, RLConfig, RLDataConfig, RLUpdateConfig, RL_LOSSES, RewardSpec,
    RolloutConfig,
)
from mlxcore.config.vlm import (  # noqa: F401
    VLMDataConfig, VLMEvalConfig, VLMLossConfig, VLMModelConfig, VLMRunConfig,
)
from mlxcore.config.resolver import (  # noqa: F401
    apply_overrides, defaults, fill_sections, load_config, merge, spec, with_overrides,
)

__all__ = ['PromptConfig', 'TeacherConfig', 'VerifyPolicy', 'BENCH_SUITES', 'BenchConfig', 'BenchRunConfig', 'BenchTarget', 'ConfigError', 'DEMO_TASKS', 'DataConfig', 'DistillConfig', 'DistributedConfig', 'EvalConfig', 'ExportConfig', 'ExportFormat', 'ExportRunConfig', 'FilterConfig', 'FinetuneConfig', 'GGUF_TYPES', 'GateTolerance', 'HostConfig', 'HubPushConfig', 'JUDGE_TEMPLATE', 'JudgeConfig', 'LORA_KEYS', 'LoRAConfig', 'MODEL_PRESETS', 'MixSource', 'ModelConfig', 'ParityGateConfig', 'PipelineConfig', 'PreferenceObjective', 'PreferenceRunConfig', 'PreferenceSourceConfig', 'PreferenceStage', 'PromotionConfig', 'QuantizeConfig', 'RLConfig', 'RLDataConfig', 'RLUpdateConfig', 'RL_LOSSES', 'ROW_FORMAT', 'RewardModelRunConfig', 'RewardSpec', 'RolloutConfig', 'SampleConfig', 'SourceConfig', 'StreamConfig', 'StudentConfig', 'SuiteName', 'SyntheticConfig', 'SyntheticPairsConfig', 'SyntheticTask', 'TokenizerConfig', 'TrackingConfig', 'TrainConfig', 'VLMDataConfig', 'VLMEvalConfig', 'VLMLossConfig', 'VLMModelConfig', 'VLMRunConfig', 'apply_overrides', 'defaults', 'fill_sections', 'load_config', 'merge', 'spec', 'with_overrides']
