"""What makes a directory a model: the one place that says so.

A model dir has a `config.json` (ours, Hugging Face, mlx-lm); an adapter dir has mlx-lm's
`adapter_config.json` and `adapters.safetensors` (base model + LoRA/DoRA/QLoRA adapters, see
adapters.py). Nothing here imports the rest of mlxcore, so configs, models, adapters and
checkpoints can all ask.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model_dir(path: str | Path, adapters: bool = True) -> bool:
    """A dir `checkpoint.load` opens: a config.json, or (unless `adapters=False`) an adapter dir."""
    return (Path(path) / CONFIG).is_file() or (adapters and is_adapter_dir(path))
