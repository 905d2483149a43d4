"""TensorBoard: event files under `<run dir>/tensorboard/<run name>` (`tensorboard --logdir runs/NAME/tensorboard`).

The writer is torch's `SummaryWriter` when torch is installed, else tensorboardX's. Params go in as
a markdown table (the text tab) and as hparams; artifacts are not TensorBoard's: a text entry names them.
"""

from __future__ import annotations

from pathlib import Path

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # no torch: tensorboardX's writer, the same API
    from tensorboardX import SummaryWriter

from mlxcore.tracking import Tracker


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, settings, run_dir, run_name, experiment, params, tags=None):
        self.writer, self.run_ref = None, None
        super().__init__(settings, run_dir, run_name, experiment, params, tags)

    def _start(self) -> None:
        logdir = Path(self.run_dir) / "tensorboard" / self.run_name
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.run_ref = {"logdir": str(logdir)}
        rows = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in self.params.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}", 0)

    def _metrics(self, points) -> None:
        for key, value, step, ts in points:
            self.writer.add_scalar(key, value, step, walltime=ts)
        self.writer.flush()

    def _artifact(self, path: str, folder: str) -> None:
        self.writer.add_text("artifacts", f"{folder}/{Path(path).name}: {path}" if folder else str(path), 0)

    def _finish(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()
