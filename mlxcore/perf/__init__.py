"""Performance: the fast BLAS MLX's Linux CPU backend is given on import (`_blas`), speed and
memory measurements of a training setup (`speed`), model FLOPs and MFU (`stats`), and the
machine report (`doctor`). The fused CPU kernels themselves are `mlxcore.kernels`.
"""
