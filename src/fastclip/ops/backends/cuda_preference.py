"""Which of the GPU backends (``cuda``, ``triton``) ``backend="auto"`` tries first.

A small table keyed by the GPU's compute capability (major, minor). No measurement backs
it yet (issue 7 was written without a GPU; benchmarks/bench_contrastive_loss.py fills
benchmarks/results/ and this table must then follow those numbers). The prior:

* sm_80 / sm_86 / sm_89 (Ampere, Ada): the CUDA kernels use mma.sync m16n8k16 with
  ldmatrix and cp.async, the instructions Triton's ``tl.dot`` also lowers to on these
  chips, with no autotuning cost at first use: ``cuda`` first.
* sm_90 (Hopper) and newer: Triton lowers ``tl.dot`` to wgmma (warpgroup MMA, TMA),
  which the CUDA kernels do not use yet (they run their sm_80 mma.sync path there, about
  half of Hopper's dense tensor throughput): ``triton`` first.
* anything older than sm_80 (no bf16 mma.sync; the CUDA kernels are built for sm_80 and
  sm_90a only): ``triton`` first, ``cuda`` will report the missing kernel image.

Only the order changes; availability is still checked backend by backend, and a backend
named explicitly (argument or ``FASTCLIP_BACKEND``) is never reordered.
"""

from __future__ import annotations

# (major, minor) -> preferred first GPU backend. Lookup: exact key, then (major, None).
_TABLE: dict[tuple[int, int | None], str] = {
    (8, 0): "cuda",      # A100
    (8, 6): "cuda",      # A10, RTX 30xx
    (8, 7): "cuda",      # Jetson Orin
    (8, 9): "cuda",      # L4, L40, RTX 40xx
    (9, 0): "triton",    # H100, H200 (wgmma)
    (10, None): "triton",
    (12, None): "triton",
}
_DEFAULT_NEW = "triton"     # unknown, newer than the table
_DEFAULT_OLD = "triton"     # pre-Ampere


def preferred(capability: tuple[int, int]) -> str:
    """The GPU backend ``auto`` tries first on a device of this compute capability."""
    major, minor = capability
    if (major, minor) in _TABLE:
        return _TABLE[(major, minor)]
    if (major, None) in _TABLE:
        return _TABLE[(major, None)]
    return _DEFAULT_OLD if major < 8 else _DEFAULT_NEW


def auto_order(order: list[str], capability: tuple[int, int] | None = None) -> list[str]:
    """``order`` (the cuda device's preference list) with the preferred GPU backend first.

    ``capability`` defaults to the current CUDA device's; without a usable CUDA device
    (nothing to choose for) ``order`` is returned unchanged. Makes no CUDA call unless
    ``torch.cuda.is_available()``.
    """
    if capability is None:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            return list(order)
        capability = torch.cuda.get_device_capability()
    first = preferred(tuple(capability))
    gpu = [b for b in ("cuda", "triton") if b in order]
    if first not in gpu:
        return list(order)
    ranked = [first] + [b for b in gpu if b != first]
    it = iter(ranked)
    # Keep the positions of the GPU backends in the list, just reorder them.
    return [next(it) if b in gpu else b for b in order]
