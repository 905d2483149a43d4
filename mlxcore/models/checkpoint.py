"""Training checkpoints: HF-layout model dirs plus optimizer and trainer state, written atomically.

  <out>/checkpoints/step-00000100/   config.json, model.safetensors, tokenizer files,
                                     optimizer.safetensors, trainer_state.json
  <out>/model/                       the final checkpoint, same files + manifest.json

With adapters (LoRA/DoRA/QLoRA) a checkpoint holds `adapters.safetensors` and
`adapter_config.json` (mlx-lm's adapter layout, see `adapters.py`) instead of `config.json` and
`model.safetensors`; it resumes the same way.

A checkpoint dir appears by rename only when complete, so any `step-*` dir can be resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlxcore  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxcore import lineage as lineages
from mlxcore.models import adapters, card, moe
from mlxcore.data.tokenizer import copy_files
from mlxcore.io import atomic_dir, write_json, write_manifest
from mlxcore.models.model import load as load_model
from mlxcore.models.model import save_weights

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step-{step:08d}"


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    root = Path(ckpt_root)
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(p.name.split("-")[1]), p))
    return sorted(found)


def latest(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune(ckpt_root: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def save(
    path: str | Path,
    model: nn.Module,
    config: dict,
    trainer_state: dict,
    optimizer: optim.Optimizer | None = None,
    tokenizer_dir: str | Path | None = None,
    adapter_config: dict | None = None,
) -> Path:
    """Write a complete checkpoint dir atomically (replacing an older one at `path`).

    With `adapter_config` only the trainable (adapter) weights are written, mlx-lm style.
    """
    with atomic_dir(path, replace=True) as tmp:
        if adapter_config is not None:
            mx.save_safetensors(str(tmp / adapters.ADAPTER_WEIGHTS), adapters.trainable_weights(model),
                                metadata={"format": "mlx"})
            write_json(tmp / adapters.ADAPTER_CONFIG, adapter_config)
        else:
            save_weights(model, tmp / "model.safetensors")
            write_json(tmp / "config.json", config)
        if tokenizer_dir is not None:
            copy_files(tokenizer_dir, tmp)
        if optimizer is not None:
            mx.save_safetensors(str(tmp / OPTIMIZER_STATE), dict(sorted(tree_flatten(optimizer.state))))
        write_json(tmp / TRAINER_STATE, trainer_state)
    return Path(path)


def finalize(src: str | Path, final: str | Path, extra_state: dict, lineage: dict | None = None) -> Path:
    """Publish checkpoint `src` as the final model dir, atomically, with a manifest and a model card.

    Files are hard-linked (copied across filesystems), so a 400 MB model is not written twice.
    `lineage` ({"sources", "licenses", "base_model"}: `mlxcore.lineage`) goes into the manifest;
    the README.md model card is written after it (not part of the digest; `mlxcore.models.card`).
    """
    src = Path(src)
    with atomic_dir(final, replace=True) as tmp:
        for f in src.iterdir():
            if f.name != TRAINER_STATE:
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        state = json.loads((src / TRAINER_STATE).read_text()) | extra_state
        write_json(tmp / TRAINER_STATE, state)
        kind, cfg_file = ("adapter", adapters.ADAPTER_CONFIG) if adapters.is_adapter_dir(src) else ("checkpoint", "config.json")
        write_manifest(tmp, kind, json.loads((src / cfg_file).read_text()), step=state["step"],
                       **(lineages.fields(lineage) if lineage is not None else {}))
        card.write_card(tmp, title=Path(final).parent.name)
    return Path(final)


def save_model_dir(out: str | Path, model: nn.Module, config: dict, tokenizer_dir: str | Path | None = None,
                   manifest_config: dict | None = None) -> Path:
    """A plain model dir (config.json, model.safetensors, tokenizer, manifest), atomically."""
    with atomic_dir(out, replace=True) as tmp:
        save_weights(model, tmp / "model.safetensors")
        write_json(tmp / "config.json", config)
        if tokenizer_dir is not None:
            copy_files(tokenizer_dir, tmp)
        write_manifest(tmp, "checkpoint", manifest_config or config)
    return Path(out)


def restore(path: str | Path, model: nn.Module, optimizer: optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) from a checkpoint dir; returns its trainer state."""
    path = Path(path)
    if adapters.is_adapter_dir(path):
        saved = mx.load(str(path / adapters.ADAPTER_WEIGHTS))
        expected = set(adapters.trainable_weights(model))
        if set(saved) != expected:
            raise ValueError(f"{path}: its adapters do not match this run's adapter layout "
                             f"(e.g. {sorted(set(saved) ^ expected)[:3]})")
        model.load_weights(list(saved.items()), strict=False)
    else:
        saved = moe.from_hf_layout(mx.load(str(path / "model.safetensors")))  # a MoE's experts restacked
        model.load_weights(list(saved.items()), strict=True)
    if optimizer is not None:
        optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_STATE)).items()))
    mx.eval(model.parameters(), optimizer.state if optimizer is not None else [])
    return json.loads((path / TRAINER_STATE).read_text())


def load(path: str | Path) -> tuple[nn.Module, dict]:
    """(model, config) for any model dir we write or read: a checkpoint, a local Hugging Face /
    mlx-lm model dir, or an adapter dir (its base model + the adapters, as trained)."""
    return adapters.load(path) if adapters.is_adapter_dir(path) else load_model(path)


def fuse(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapters of `adapter_dir` as one plain checkpoint (HF layout) to `out_dir`."""
    model, config = adapters.load(adapter_dir)
    model = adapters.fuse_model(model)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    acfg = json.loads((Path(adapter_dir) / adapters.ADAPTER_CONFIG).read_text())
    return save_model_dir(out_dir, model, config, tokenizer_dir=adapter_dir,
                          manifest_config={"fused_from": str(adapter_dir), **acfg})
