"""`python -m mlxcore.models.mlx_lm_cli <mlx-lm command> ...`: mlx-lm's own CLI (`server`, `generate`, ...)
able to open our Power Retention checkpoints.

mlx-lm finds a model's classes by importing `mlx_lm.models.<model_type>`; `retention` is ours
(mlxcore/models/retention.py), so it is registered under that module name before mlx-lm's CLI runs.
Every other model type is mlx-lm's own module, exactly as with `python -m mlx_lm`. The server's
batched generation uses the model's `make_cache()` (a fixed-size recurrent state per layer).
"""

import runpy
import sys

from mlxcore.models import retention

sys.modules.setdefault("mlx_lm.models.retention", retention)

if __name__ == "__main__":
    runpy.run_module("mlx_lm", run_name="__main__", alter_sys=True)
