"""Weights & Biases: `wandb.init(mode=tracking mode)`, files under `<run dir>/wandb`.

The mode is $WANDB_MODE, else "offline" (sync later with `wandb sync <run dir>/wandb/offline-run-*`).
W&B wants one step counter per run; each stage counts its own steps, so every stage gets its own step
metric (`define_metric("sft/*", step_metric="sft/step")`).
"""

from __future__ import annotations

import os
from pathlib import Path

import wandb

from mlxcore.tracking import Tracker


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, settings, run_dir, run_name, experiment, params, tags=None):
        self.run, self.run_ref, self.stages = None, None, set()
        super().__init__(settings, run_dir, run_name, experiment, params, tags)

    def _start(self) -> None:
        root = Path(self.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.experiment, name=self.run_name, dir=str(root), config=self.params,
                              mode=os.environ.get("WANDB_MODE", "offline"), tags=[v[:64] for v in self.tags.values() if v][:20],
                              settings=wandb.Settings(silent=True, x_disable_stats=not self.settings.system_metrics),
                              reinit="create_new")
        self.run_ref = {"dir": str(self.run.dir), "id": self.run.id}

    def _metrics(self, points) -> None:
        by_step: dict[tuple[str, int], dict] = {}
        for key, value, step, _ in points:
            stage = key.split("/", 1)[0]
            if stage not in self.stages:
                self.run.define_metric(f"{stage}/step", hidden=True)
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            by_step.setdefault((stage, step), {f"{stage}/step": step})[key] = value
        for row in by_step.values():
            self.run.log(row)

    def _artifact(self, path: str, folder: str) -> None:
        self.run.save(path, base_path=str(Path(path).parent), policy="now")

    def _finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
