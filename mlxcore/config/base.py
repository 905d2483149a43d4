"""Shared bases: the strict model every config derives from, the run and tracking mixins."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A config value is invalid; the message names the file, line and key."""


class _Strict(BaseModel):
    # hide_input_in_errors: a refused value (a pasted API key, say) is never echoed in an error
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class _Run:
    """What a flow's config has: a run dir, and the token limit pretokenize applies per kind."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def pretokenize_limit(self, kind: str) -> int | None:
        """Per-document token limit: the source's max_tokens; SFT default seq_len + 1 (what training sees)."""
        source = getattr(self.data, kind)
        if source is not None and source.max_tokens is not None:
            return source.max_tokens
        return getattr(self, kind).seq_len + 1 if kind == "sft" else None


class TrackingConfig(_Strict):
    """Where `report_to` trackers send a run (mlxcore/tracking; README "Tracking and report cards")."""

    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, "
                                                     "else sqlite:///<run dir>/mlflow.db.")
    experiment: str | None = Field(None, description="Experiment / project name; default: the run's name.")
    run_name: str | None = Field(None, description="The tracker run's name; default: <name>-<UTC time>.")
    retries: int = Field(2, ge=0, description="Retries of a failed tracker call (after the first try).")
    backoff_s: float = Field(0.5, ge=0, description="Wait before the first retry; doubles at each next one.")
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of one tracker request (MLflow).")
    system_metrics: bool = Field(True, description="CPU / memory metrics where the tracker records them.")


class _Tracked(_Strict):
    """What every training flow's config has: the experiment trackers it reports to."""

    report_to: list[Literal["mlflow", "wandb", "trackio", "tensorboard"]] = Field(
        default_factory=list, description="Experiment trackers: any of mlflow, wandb, trackio, tensorboard.")
    tracking: TrackingConfig = TrackingConfig()
