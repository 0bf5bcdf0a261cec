"""Registers, spills and shared memory of the Triton kernels' tile configurations, compiled
offline for a GPU architecture: no GPU needed (Triton's own ptxas and cuobjdump).

    python scripts/triton_resources.py [--arch 90] [--dtype bf16] [--loss siglip]
                                       [--pass bwd|fwd|merge|gemm|all] [--extra]

For each configuration of ``_FWD_CONFIGS`` / ``_BWD_CONFIGS`` of the fused kernels and of
``_CONFIGS`` of the gemm backend's gradient-tile kernel (the fused backward's clipped to D as the
autotuner's pruning does, D = 512), each kernel variant the op launches (loss, pass A/B,
the one-pass STATS form, NORMALIZE=True), it compiles the kernel for ``sm_<arch>`` with the
launcher's specialisation (16-aligned pointers and sizes) and prints what the compiler
reports: registers per thread, local-memory stack (spills), shared memory, and whether the
dots became warpgroup MMA (wgmma, sm_90) or mma.sync. A configuration that spills is
slow; one whose shared memory exceeds the GPU's is dropped by the autotuner at run time.
``--extra`` also compiles the candidate configurations listed below (not in the
autotuner's lists), so that a change of the lists is checked before any GPU time.
Speed is not measured here: that needs a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # compile, never interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip.ops.triton import contrastive_loss as K  # noqa: E402
from fastclip.ops.triton import contrastive_loss_gemm as KG  # noqa: E402

# Candidates for Hopper: tiles of 64 or 128 rows (wgmma's granularity) with a wide
# accumulator. Compiled with Triton 3.6 for sm_90 (bf16, D = 512) every one of them spills:
# 112-216 bytes of stack at 8 warps for 64x64 with a 512-wide accumulator, 24-432 bytes at
# 16 warps (whose 128-register cap is the limit), so none is in the autotuner's list.
EXTRA_BWD = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 512},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 512},
                  num_warps=16, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 256},
                  num_warps=16, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=16, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "BLOCK_DO": 256},
                  num_warps=16, num_stages=2),
]
EXTRA_FWD = [
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]

_T = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _cuobjdump() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else "cuobjdump"


def _resources(ck) -> tuple[int, int, int]:
    """(registers, stack bytes, shared bytes): cuobjdump for the first two, the launch's
    dynamic shared memory from Triton's metadata (cuobjdump sees only the static part)."""
    reg, stack, static = _cubin_resources(ck.asm["cubin"])
    return reg, stack, max(static, int(getattr(ck.metadata, "shared", 0) or 0))


def _cubin_resources(cubin: bytes) -> tuple[int, int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    reg = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    shared = int(re.search(r"SHARED:(\d+)", out).group(1))
    return reg, stack, shared


def _signature(fn, pointers: dict[str, tuple[str, ...]]) -> dict:
    """Triton's signature of ``fn``: the pointer type of every ``*_ptr`` argument from
    ``pointers`` (type -> argument names), i32 for the rest (the constexprs are replaced by
    ``_compile``). A pointer argument the table misses, or a name the kernel does not have,
    is an error: left to the i32 default, the forward's ``pos_ptr`` (added to the kernel
    after this table was written) made every forward configuration fail to compile."""
    typed = {a: t for t, names in pointers.items() for a in names}
    unknown = sorted(set(typed) - set(fn.arg_names))
    missing = [a for a in fn.arg_names if a.endswith("_ptr") and a not in typed]
    if unknown or missing:
        raise ValueError(f"{fn.__name__}: pointer types out of date with the kernel's arguments "
                         f"(untyped: {', '.join(missing) or '-'}; not arguments: "
                         f"{', '.join(unknown) or '-'})")
    return {a: typed.get(a, "i32") for a in fn.arg_names}


def _compile(fn, sig: dict, const: dict, aligned_ints: list, cfg, arch: int):
    """Compile ``fn`` for sm_<arch> with the launcher's specialisation: the constexprs of
    ``const``, every pointer and the integers ``aligned_ints`` 16-divisible."""
    sig = dict(sig, **{k: "constexpr" for k in const})
    aligned = [a for a in fn.arg_names if a.endswith("_ptr")] + aligned_ints
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                   **K._OPTS})


def compile_bwd(cfg, dtype: str, loss: int, cols_outer: bool, stats: bool, arch: int):
    fn = K._bwd_kernel
    sig = _signature(fn, {_T[dtype]: ("x_ptr", "y_ptr", "out_ptr"),
                          "*fp32": ("rho_ptr", "sig_ptr", "p_ptr", "gr_ptr", "gc_ptr", "gp_ptr",
                                    "ws_ptr", "keep_ptr"),
                          "*fp64": ("row_ptr", "col_ptr", "tu_ptr", "tg_ptr", "stat_ptr")})
    const = dict(LOSS=loss, COLS_OUTER=cols_outer, STATS=stats, NORMALIZE=True, SCALE_W=False,
                 PRECISION="ieee", UPCAST=False, **cfg.kwargs)
    return _compile(fn, sig, const, ["sx", "sy", "sout", "D"], cfg, arch)


def compile_fwd(cfg, dtype: str, loss: int, arch: int, block_m: int = 128):
    fn = K._fwd_kernel
    sig = _signature(fn, {_T[dtype]: ("x_ptr", "y_ptr"),
                          "*fp32": ("rho_ptr", "sig_ptr", "p_ptr", "pa_ptr", "pb_ptr"),
                          "*fp64": ("row_ptr", "pos_ptr")})
    const = dict(LOSS=loss, BLOCK_M=block_m, PRECISION="ieee", UPCAST=False, **cfg.kwargs)
    return _compile(fn, sig, const, ["sx", "sy", "D", "m"], cfg, arch)


def compile_merge(loss: int, first: bool, last: bool, arch: int):
    """The forward's column merge as the launcher runs it (default warps and stages)."""
    fn = K._col_merge_kernel
    sig = _signature(fn, {"*fp32": ("pa_ptr", "pb_ptr", "cmax_ptr"),
                          "*fp64": ("csum_ptr", "col_ptr")})
    const = dict(LOSS=loss, FIRST=first, LAST=last, BLOCK_C=256)
    return _compile(fn, sig, const, ["m"], triton.Config({}, num_warps=4, num_stages=3), arch)


def compile_gemm(cfg, dtype: str, loss: int, stats: bool, arch: int):
    fn = KG._grad_tile_kernel
    sig = _signature(fn, {_T[dtype]: ("x_ptr", "y_ptr", "g_ptr"),
                          "*fp32": ("rho_ptr", "sig_ptr", "p_ptr", "gr_ptr", "gc_ptr", "gp_ptr",
                                    "ws_ptr", "rgu_ptr", "rg_ptr", "rphi_ptr", "cgu_ptr",
                                    "cphi_ptr"),
                          "*fp64": ("row_ptr", "col_ptr")})
    const = dict(LOSS=loss, STATS=stats, SCALE_W=False, PRECISION="ieee", UPCAST=False,
                 **cfg.kwargs)
    return _compile(fn, sig, const, ["sx", "sy", "D", "m", "sp"], cfg, arch)


def _mma(ck) -> str:
    ptx = ck.asm.get("ptx", "")
    return "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")


def _name(cfg) -> str:
    kw = cfg.kwargs
    return "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO")
                    if k in kw) + f" w{cfg.num_warps} s{cfg.num_stages}"


def report(what: str, build, *args) -> bool:
    """Compile with ``build(*args)`` and print one line of resources; False when it failed."""
    try:
        ck = build(*args)
        reg, stack, shared = _resources(ck)
        print(f"{what:<58} REG {reg:3d}  STACK {stack:5d}  SHARED {shared:6d}  {_mma(ck)}",
              flush=True)
        return True
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        print(f"{what:<58} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}",
              flush=True)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    p.add_argument("--dtype", choices=list(_T), default="bf16")
    p.add_argument("--loss", choices=["clip", "siglip", "all"], default="all")
    p.add_argument("--pass", dest="which", choices=["fwd", "merge", "bwd", "gemm", "all"], default="all")
    p.add_argument("--extra", action="store_true", help="also the candidate configurations")
    a = p.parse_args(argv)
    losses = {"clip": [K.SOFTMAX.value], "siglip": [K.SIGMOID.value],
              "all": [K.SOFTMAX.value, K.SIGMOID.value]}[a.loss]
    print(f"Triton {triton.__version__}, sm_{a.arch}, {a.dtype}, D = 512 "
          "(REG per thread, STACK bytes of local memory per thread, SHARED bytes)")
    ok = True
    if a.which in ("bwd", "all"):
        # clipped to D = 512 and deduplicated by the autotuner's own pruning
        prune = lambda cs: K._prune_bwd(cs, {"D": 512})  # noqa: E731
        cfgs = [(c, "") for c in prune(K._BWD_CONFIGS)] + (
            [(c, " (candidate)") for c in prune(EXTRA_BWD)] if a.extra else [])
        for cfg, tag in cfgs:
            for loss in losses:
                variants = [(False, False), (True, False)] + (
                    [(False, True), (True, True)] if loss == K.SIGMOID.value else [])
                for cols_outer, stats in variants:
                    what = (f"bwd {_name(cfg)}{tag} loss={loss} "
                            f"pass={'B' if cols_outer else 'A'}{' stats' if stats else ''}")
                    ok &= report(what, compile_bwd, cfg, a.dtype, loss, cols_outer, stats,
                                 a.arch)
    if a.which in ("fwd", "all"):
        cfgs = [(c, "") for c in K._FWD_CONFIGS] + ([(c, " (candidate)") for c in EXTRA_FWD]
                                                   if a.extra else [])
        for cfg, tag in cfgs:
            for loss in losses:
                ok &= report(f"fwd 128x{_name(cfg)}{tag} loss={loss}", compile_fwd, cfg,
                             a.dtype, loss, a.arch)
    if a.which in ("merge", "all"):
        for loss in losses:
            for first, last in ((True, True), (True, False), (False, False), (False, True)):
                ok &= report(f"merge first={first:d} last={last:d} loss={loss}", compile_merge,
                             loss, first, last, a.arch)
    if a.which in ("gemm", "all"):
        for cfg in KG._CONFIGS:
            for loss in losses:
                for stats in (False, True) if loss == K.SIGMOID.value else (False,):
                    ok &= report(f"gemm {_name(cfg)} loss={loss}{' stats' if stats else ''}",
                                 compile_gemm, cfg, a.dtype, loss, stats, a.arch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
