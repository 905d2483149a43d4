"""mlxcore: the MLX training library behind mlxflow (no orchestration imports here).

Importing this package first makes MLX's Linux CPU backend use a fast BLAS (see `_blas`).
"""

import os

from mlxcore.perf._blas import ensure_fast_blas

# transformers advises installing PyTorch on import; mlxcore only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

BLAS = ensure_fast_blas()

__version__ = "0.1.0"
