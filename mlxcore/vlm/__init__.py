"""Vision-language models: data (image + text rows), a tiny ViT + projector + mlx-lm decoder,
contrastive / matching / LM losses on the shared training loop, retrieval and zero-shot metrics.

README "Vision-language" describes the formats, the config keys and measured numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

MLXFLOW_VLM = "mlxflow_vlm"  # config.json model_type of ours


def vision_geometry(vision_config: dict) -> dict:
    """{"image_size", "patch_size"} of a `vision_config` (mlx-vlm's defaults where it omits them;
    ours always has both)."""
    return {"image_size": int(vision_config.get("image_size", 336)),
            "patch_size": int(vision_config.get("patch_size", 14))}


def image_geometry(model_dir: str | Path | None) -> dict | None:
    """The image geometry (`vision_geometry`) a VLM dir was built for (ours, or an mlx-vlm layout
    with a `vision_config`), read from its config.json alone; None when `model_dir` is not a
    readable VLM dir. Fine-tuning it, the model decides these, not `data.image_size` /
    `patch_size`."""
    path = Path(model_dir) / "config.json" if model_dir else None
    try:
        config = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    v = config.get("vision_config") if isinstance(config, dict) else None
    return vision_geometry(v) if isinstance(v, dict) else None
