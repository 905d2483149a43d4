"""The Prefect side of mlxcore's training callback: a progress artifact and a metrics table."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from mlxcore.train.callbacks import TrainingCallback
from mlxcore.bench.plots import loss_curve, markdown_image


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class StageProgress:
    """`on_progress(done, total)` for a data stage: a progress artifact, updated every `interval` s."""

    def __init__(self, description: str, interval: float = 2.0):
        self.description, self.interval, self.artifact_id, self.last = description, interval, None, 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=pct, description=self.description)
            self.last = now
        elif now - self.last >= self.interval or done >= total:
            update_progress_artifact(self.artifact_id, pct)
            self.last = now


@contextmanager
def progress_bar(total: int, description: str, unit: str) -> Iterator[Callable[[int, int], None]]:
    """`on_progress(done, total)` that moves a terminal bar and a Prefect progress artifact together."""
    from tqdm.auto import tqdm

    artifact = StageProgress(description)
    with tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True) as bar:
        def update(done: int, total: int) -> None:
            artifact(done, total)
            if total != bar.total:  # a stage that learns its size as it goes (e.g. tensors to export)
                bar.total = total
            bar.update(done - bar.n)

        yield update


# Sums a loss reports beside its value (GRPO, preference objectives, reward models): metrics columns;
# a mixture of experts' router statistics (mlxcore.models.moe) too, with one expert_usage_<e> per expert.
REPORTED = ("accuracy", "margin", "reward_chosen", "reward_rejected", "kl", "clip_fraction", "abs_error",
            "router_aux_loss", "router_entropy", "expert_usage_max", "expert_usage_min", "expert_usage_cv",
            "lm_loss", "contrastive_loss", "itm_loss", "itm_accuracy", "temperature")  # the VLM loss (mlxcore/vlm)


class PrefectProgress(TrainingCallback):
    """Progress artifact updated at most every `interval` seconds; metrics table at the end."""

    def __init__(self, stage: str, run_name: str, interval: float = 2.0):
        self.stage, self.run_name, self.interval = stage, run_name, interval
        self.artifact_id, self.total, self.last, self.rows, self.curve_rows = None, 1, 0.0, [], -1

    def on_begin(self, info: dict) -> None:
        self.total = max(info["total_steps"], 1)
        self.artifact_id = create_progress_artifact(
            progress=100.0 * info["start_step"] / self.total,
            description=f"{self.stage}: {info['params']:,} parameters, {self.total} steps"
            + (f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""),
        )

    def _progress(self, step: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.artifact_id and (force or now - self.last >= self.interval):
            update_progress_artifact(self.artifact_id, 100.0 * step / self.total)
            self.last = now

    @staticmethod
    def _rows(info: dict) -> dict:
        """Rows available so far, when training on a growing file (distillation)."""
        return {"rows": info["rows"]} if "rows" in info else {}

    def on_train(self, info: dict) -> None:
        experts = sorted((k for k in info if k.startswith("expert_usage_") and k not in REPORTED), key=lambda k: (len(k), k))
        reported = {k: round(info[k], 4) for k in (*REPORTED, *experts) if k in info}  # what the loss reports (DPO, GRPO, MoE)
        self.rows.append({"step": info["step"], "loss": round(info["loss"], 4), "val_loss": None,
                          "lr": f"{info['lr']:.2e}", "grad_norm": round(info["grad_norm"], 3),
                          "tok_per_s": round(info["tok_per_s"])} | reported | self._rows(info))
        self._progress(info["step"], force=info["step"] >= self.total)

    def on_eval(self, info: dict) -> None:
        self.rows.append({"step": info["step"], "loss": None, "val_loss": round(info["val_loss"], 4),
                          "lr": None, "grad_norm": None, "tok_per_s": None} | self._rows(info))
        if info["step"] > 0:
            self._loss_curve()  # a new version at every evaluation: the curve grows while training runs

    def _loss_curve(self) -> None:
        """The loss curve as a PNG inside a markdown artifact (the Prefect UI renders data-URI images)."""
        train = [(r["step"], r["loss"]) for r in self.rows if r["loss"] is not None]
        val = [(r["step"], r["val_loss"]) for r in self.rows if r["val_loss"] is not None]
        if (not train and not val) or self.curve_rows == len(self.rows):
            return  # nothing to draw, or nothing new since the last version
        self.curve_rows = len(self.rows)
        png = loss_curve(train, val, f"{self.run_name} {self.stage}")
        create_markdown_artifact(key=artifact_key(self.run_name, self.stage, "loss-curve"),
                                 markdown=f"### {self.stage} loss\n\n{markdown_image(png, f'{self.stage} loss curve')}\n",
                                 description=f"{self.stage}: train and held-out loss by step")

    def on_end(self, info: dict) -> None:
        self._progress(info["step"], force=True)
        self._loss_curve()
        key = artifact_key(self.run_name, self.stage, "metrics")
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        create_table_artifact(table=[{k: row.get(k) for k in columns} for row in self.rows], key=key, description=f"{self.stage} metrics by step")
        create_markdown_artifact(
            key=artifact_key(self.run_name, self.stage, "summary"),
            markdown=(
                f"### {self.stage}\n\n| | |\n|---|---|\n"
                f"| checkpoint | `{info['checkpoint']}` |\n| steps | {info['step']} |\n"
                f"| held-out loss | {_num(info['initial_val_loss'])} (step 0) → {_num(info['val_loss'])} |\n"
                f"| train loss | {_num(info['train_loss'])} |\n| throughput | {info['tok_per_s']:.0f} tok/s |\n"
            ),
        )


def _num(value) -> str:
    """A loss for the summary table; "—" where there is none (no held-out set, e.g. the RL update)."""
    return "—" if value is None else f"{value:.4f}"
