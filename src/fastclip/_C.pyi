"""Type stub of the compiled extension ``fastclip._C`` (csrc/bindings.cpp, csrc/cuda_stub.cpp,
csrc/contrastive_loss/cuda/binding.cu). Every function takes raw pointers as ints, sizes
and row strides in elements; the Python layer (fastclip.ops.backends) validates first.

``loss`` is ``LossSpec.code`` (0: clip/softmax, 1: siglip/sigmoid). Statistic pointers
(``row``, ``col``, ``pos``) are float64 arrays whatever the features' dtype; features,
gradients and upstream gradients follow ``is_double`` (float64, else float32).
"""

# --- CPU kernels (csrc/contrastive_loss/cpu) -------------------------------------------
def cpu_fwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
            is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
            pos_offset: int, row: int, col: int, pos: int, num_threads: int) -> None:
    """Block forward: writes row [n], col [m], pos [n]."""

def cpu_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
            is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
            pos_offset: int, row: int, col: int, grad_row: int, grad_col: int, grad_pos: int,
            dx: int, dy: int, num_threads: int) -> tuple[float, float]:
    """Block backward: writes dx [n, d], dy [m, d]; returns (dscale, dbias)."""

def cpu_fwd_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
                is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
                pos_offset: int, grad_row: int, grad_col: int, grad_pos: int, row: int,
                col: int, pos: int, dx: int, dy: int, num_threads: int
                ) -> tuple[float, float]:
    """One-pass forward and backward of a one-pass loss; returns (dscale, dbias)."""

# --- CUDA kernels (csrc/contrastive_loss/cuda), or their stub without CUDA --------------
CUDA_BUILT: bool

def cuda_status() -> tuple[bool, str]:
    """(ok, reason): can the CUDA kernels run here? The reason says why not."""
