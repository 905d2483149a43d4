"""Vision-language training: data -> preprocess -> train -> vlm-eval -> bench (README "Vision-language")."""

from __future__ import annotations

from prefect import flow

from mlxcore.config import VLMRunConfig, with_overrides
from tasks.report import reported
from tasks.train import publish
from tasks.vlm import bench_report, evaluate, preprocess, sources, train_vlm


@flow(name="vlm")
@reported
def vlm(config: VLMRunConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["loss.contrastive_weight=0", "train.steps=200"]."""
    config = with_overrides(config, overrides)
    run, d = str(config.run_dir), config.data
    files = sources(d, run)
    data = preprocess(files, d.image_size, d.patch_size, d.max_images_per_sample, d.max_tokens, d.vocab_size,
                      config.init_from, run)
    trained = train_vlm(data["path"], config.init_from, config.model, config.loss, config.train, run)
    held_out = evaluate(trained["checkpoint"], data["path"], config.eval, run)
    bench = bench_report(held_out["path"], run, f"vlm bench {config.name}")
    return {"checkpoint": trained["checkpoint"], "train": trained, "data": data, "eval": held_out["metrics"],
            "bench": bench, "model": publish(trained["checkpoint"], run)}
