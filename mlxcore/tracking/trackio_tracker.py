"""trackio (Hugging Face's local-first tracker): a SQLite database per project in $TRACKIO_DIR
(`trackio show` opens the dashboard). When $TRACKIO_DIR is unset at the first import, it is set to
`<run dir>/trackio`; trackio reads it once per process."""

from __future__ import annotations

import os
from pathlib import Path

from mlxcore.tracking import Tracker


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, settings, run_dir, run_name, experiment, params, tags=None):
        os.environ.setdefault("TRACKIO_DIR", str(Path(run_dir).resolve() / "trackio"))
        import trackio  # ImportError: reported as not installed

        self.trackio, self.run, self.run_ref = trackio, None, None
        super().__init__(settings, run_dir, run_name, experiment, params, tags)

    def _start(self) -> None:
        self.run = self.trackio.init(project=self.experiment, name=self.run_name, config=self.params, embed=False,
                                     auto_log_cpu=bool(self.settings.system_metrics), auto_log_gpu=False)
        self.run_ref = {"dir": os.environ.get("TRACKIO_DIR"), "project": self.experiment, "name": self.run_name}

    def _metrics(self, points) -> None:
        by_step: dict[tuple[str, int], dict] = {}
        for key, value, step, _ in points:
            by_step.setdefault((key.split("/", 1)[0], step), {})[key] = value
        for (_, step), row in by_step.items():
            self.run.log(row, step=step)

    def _artifact(self, path: str, folder: str) -> None:
        self.trackio.log_artifact(path, name=f"{folder}-{Path(path).name}".strip("-").replace("/", "-"))

    def _finish(self, status: str) -> None:
        self.run.finish()
