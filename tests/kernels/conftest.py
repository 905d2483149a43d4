"""The built CPU kernel extension, shared by the kernel tests."""

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import pytest

from mlxcore import kernels
from mlxcore.kernels import _build


@pytest.fixture(scope="module")
def fast():
    """Skips when the extension cannot be built here (the reason is in the skip message)."""
    if _build.mode() == "off":
        pytest.skip("MLXFLOW_KERNELS=off")
    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {_build.error()}")
    return _build.load()
