"""mlxcore: the MLX training library behind mlxflow (no orchestration imports here).

Importing this package first makes MLX's Linux CPU backend use a fast BLAS (see `_blas`).
"""

import os
import sys

from mlxcore.perf._blas import ensure_fast_blas

# transformers advises installing PyTorch on import; mlxcore only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# MLX-CUDA keeps every input of a launched CUDA graph alive until the graph finishes, and lets up
# to 10 graphs of up to 1000 MB of inputs each (its H100/B200 default) run ahead of the GPU: in a
# training step that is ~7 GB held only because the host is ahead. 100 MB a graph (Metal's
# default is 40-50) measured on an H100 (`200mb` bf16 B32xT1024, bench/activation_memory.py): peak
# 26.7 -> 19.2 GB at 0.98x the step time. Read once, when MLX makes its first CUDA stream, so
# this must precede `import mlx.core`; a value the user set wins. Metal and the CPU ignore it on
# Linux; on macOS Metal keeps its own tuned default, so it is left alone there.
CUDA_GRAPH_MB = "100"
if not sys.platform.startswith("darwin"):
    os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", CUDA_GRAPH_MB)

BLAS = ensure_fast_blas()

__version__ = "0.1.0"
