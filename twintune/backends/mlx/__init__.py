"""The MLX backend.

On Linux, MLX's CPU wheel (`mlx[cpu]`) ships the reference BLAS, whose matrix products are several
times slower than an optimised one. With TWINTUNE_MLX_BLAS=torch, importing this package (before
anything imports mlx) binds MLX's BLAS calls to the BLAS inside torch's CPU library instead, and
sets torch to one thread (its BLAS called from MLX's threads with its own thread pool is far
slower, not faster): on the demo, an MLX training step took 0.10 s instead of 0.30 s, as with
Debian's OpenBLAS preloaded. The values differ from the reference BLAS's only in rounding.

How: MLX's bundled `cblas_sgemm` calls the Fortran `sgemm_` through the dynamic linker, which
looks in the global scope first; promoting libtorch_cpu.so (which exports `sgemm_`, `dgemm_`, ...)
to the global scope before MLX's libraries load makes those calls land in torch's.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

BLAS_ENV = "TWINTUNE_MLX_BLAS"


def bind_blas_to_torch() -> bool:
    """Make MLX's matrix products use torch's BLAS (Linux; before mlx is imported). True if bound."""
    if not sys.platform.startswith("linux"):
        return False
    from twintune.errors import TwintuneWarning

    if "mlx.core" in sys.modules:
        warnings.warn(f"{BLAS_ENV}=torch has no effect: mlx was imported before twintune's MLX backend.",
                      TwintuneWarning, stacklevel=2)
        return False
    try:
        import torch
    except ImportError:
        warnings.warn(f"{BLAS_ENV}=torch needs torch installed; MLX keeps its own BLAS.", TwintuneWarning, stacklevel=2)
        return False
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(library):
        return False
    torch.set_num_threads(1)
    ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
    return True


if os.environ.get(BLAS_ENV) == "torch":
    bind_blas_to_torch()
