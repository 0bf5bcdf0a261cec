"""Type stub of the compiled extension ``fastclip._C`` (csrc/bindings.cpp, csrc/cuda_stub.cpp,
csrc/contrastive_loss/cuda/binding.cu). Every function takes raw pointers as ints, sizes
and row strides in elements; the Python layer (fastclip.ops.backends) validates first.

``loss`` is ``LossSpec.code`` (0: clip/softmax, 1: siglip/sigmoid). Statistic pointers
(``row``, ``col``, ``pos``) are float64 arrays whatever the features' dtype; features,
gradients and upstream gradients follow ``is_double`` (float64, else float32). ``bf16``
(CPU): the float32 features hold bfloat16 values (an exact upcast); the AVX512_BF16 build
then runs the products on bf16 pairs, and every other build ignores it.
"""

# --- CPU kernels (csrc/contrastive_loss/cpu) -------------------------------------------
def cpu_fwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
            is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
            pos_offset: int, row: int, col: int, pos: int, num_threads: int,
            bf16: bool) -> None:
    """Block forward: writes row [n], col [m], pos [n]."""

def cpu_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
            is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
            pos_offset: int, row: int, col: int, grad_row: int, grad_col: int, grad_pos: int,
            dx: int, dy: int, num_threads: int, bf16: bool) -> tuple[float, float]:
    """Block backward: writes dx [n, d], dy [m, d]; returns (dscale, dbias)."""

def cpu_fwd_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
                is_double: bool, scale: float, bias: float, normalize: bool, eps: float,
                pos_offset: int, grad_row: int, grad_col: int, grad_pos: int, row: int,
                col: int, pos: int, dx: int, dy: int, num_threads: int, bf16: bool
                ) -> tuple[float, float]:
    """One-pass forward and backward of a one-pass loss; returns (dscale, dbias)."""

def cpu_isa() -> str:
    """The CPU kernels' build the calls run: "avx512bf16", "avx512", "avx2" or "generic"
    (128-bit)."""

# --- CUDA kernels (csrc/contrastive_loss/cuda), or their stub without CUDA --------------
CUDA_BUILT: bool

def cuda_status() -> tuple[bool, str]:
    """(ok, reason): can the CUDA kernels run here? The reason says why not."""

# Present when built with CUDA (CUDA_BUILT). ``dtype``: 0 float32, 1 float16, 2 bfloat16;
# ``params``: a device pointer to ``num_params`` float32 values (scale, bias); statistics,
# their upstream gradients and ``dparams`` are device pointers (float64, float64, float32);
# ``stream``: the caller's cudaStream_t as an int. The workspace sizes need no GPU.
def cuda_fwd_workspace_bytes(n: int, m: int, d: int) -> int: ...
def cuda_bwd_workspace_bytes(n: int, m: int, d: int) -> int: ...
def cuda_fwd_bwd_workspace_bytes(n: int, m: int, d: int) -> int: ...

def cuda_fwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int, dtype: int,
             allow_tf32: bool, params: int, num_params: int, normalize: bool, eps: float,
             pos_offset: int, row: int, col: int, pos: int, workspace: int,
             workspace_bytes: int, stream: int) -> None:
    """Block forward on the stream: writes row [n], col [m], pos [n] (float64)."""

def cuda_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int, dtype: int,
             allow_tf32: bool, params: int, num_params: int, normalize: bool, eps: float,
             pos_offset: int, row: int, col: int, grad_row: int, grad_col: int, grad_pos: int,
             dx: int, dy: int, dparams: int, workspace: int, workspace_bytes: int,
             stream: int) -> None:
    """Block backward on the stream: writes dx [n, d], dy [m, d], dparams [num_params]."""

def cuda_fwd_bwd(loss: int, x: int, y: int, n: int, m: int, d: int, ldx: int, ldy: int,
                 dtype: int, allow_tf32: bool, params: int, num_params: int, normalize: bool,
                 eps: float, pos_offset: int, grad_row: int, grad_col: int, grad_pos: int,
                 row: int, col: int, pos: int, dx: int, dy: int, dparams: int, workspace: int,
                 workspace_bytes: int, stream: int) -> None:
    """One-pass forward and backward of a one-pass loss on the stream."""
