"""Use an optimized BLAS for MLX's CPU backend on Linux when the system has one.

The Linux `mlx[cpu]` wheel links the netlib reference BLAS (about 6 GFLOP/s float32 GEMM on
our machines). Loading OpenBLAS with global symbols before `mlx.core` is imported makes MLX
resolve its BLAS calls there (about 95 GFLOP/s): prefill gets ~15x faster. Nothing happens on
macOS (Accelerate), when mlx is already imported, when no OpenBLAS is installed
(Debian/Ubuntu: `apt install libopenblas0-pthread`), or with GEMMA3_MLX_NO_BLAS=1.
"""

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload_blas() -> str | None:
    global loaded
    if loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    if os.environ.get("GEMMA3_MLX_NO_BLAS"):
        return None
    for path in CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
