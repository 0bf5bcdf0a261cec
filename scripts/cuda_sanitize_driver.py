"""Tiny driver for scripts/sanitize_cuda.sh: every block function of the ``cuda`` backend
(forward, backward, and the one-pass forward+backward of one-pass losses) for every loss
it implements.

    python scripts/cuda_sanitize_driver.py small|large

small: odd sizes, every dtype, both the 16-byte cp.async path and the scalar fallback
(odd row stride), M != N with a pos_offset, several row blocks and column splits (the
gradient pass's turnstiles), the TF32 path.
large: one bf16 and one fp32 case big enough for several row/column groups, many row
blocks per column split and a long turnstile chain (n=2048, m=3000, D=264), still quick
under the sanitizer.
Exits non-zero when a result is not finite (the sanitizer reports memory errors itself).
"""

from __future__ import annotations

import sys

import torch

from fastclip.ops.backends import get_backend
from fastclip.ops.losses import get_loss

PARAMS = {"clip": (14.0,), "siglip": (10.0, -10.0)}


def case(loss: str, n: int, m: int, d: int, dtype: torch.dtype, ld: int, pos_offset: int) -> None:
    spec, be = get_loss(loss), get_backend("cuda")
    g = torch.Generator(device="cuda").manual_seed(n * 31 + m)
    xb = torch.randn(n, ld, device="cuda", generator=g).to(dtype)
    yb = torch.randn(m, ld, device="cuda", generator=g).to(dtype)
    x, y = xb[:, :d], yb[:, :d]                  # row stride ld, unit inner stride
    p = torch.tensor(PARAMS[loss], dtype=torch.float32, device="cuda")
    row, col, pos = be.fwd(spec, x, y, p, True, 1e-12, pos_offset)
    gr, gc, gp = (torch.randn(k, device="cuda", generator=g, dtype=torch.float64) / k
                  for k in (n, m, n))
    dx, dy, dp = be.bwd(spec, x, y, p, True, 1e-12, pos_offset, row, col, gr, gc, gp)
    outs = {"row": row, "col": col, "pos": pos, "dx": dx, "dy": dy, "dparams": dp}
    if spec.one_pass:
        both = be.fwd_bwd(spec, x, y, p, True, 1e-12, pos_offset, gr, gc, gp)
        outs.update(zip(("1p_row", "1p_col", "1p_pos", "1p_dx", "1p_dy", "1p_dparams"), both))
    torch.cuda.synchronize()
    for name, t in outs.items():
        if not torch.isfinite(t).all():
            sys.exit(f"non-finite {name} for {loss} n={n} m={m} d={d} {dtype} ld={ld}")
    print(f"ok {loss} n={n} m={m} d={d} {dtype} ld={ld} pos_offset={pos_offset}")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "small"
    ok, reason = get_backend("cuda").availability()
    if not ok:
        sys.exit(f"cuda backend unavailable: {reason}")
    losses = get_backend("cuda").losses
    if which == "small":
        for loss in losses:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                case(loss, 77, 130, 40, dtype, 40, 0)      # vectorised path, masked tails
                case(loss, 65, 3, 21, dtype, 23, -2)       # scalar fallback, tiny m, offset < 0
                case(loss, 200, 300, 40, dtype, 48, 7)     # 4 row blocks x 5 column splits
            torch.backends.cuda.matmul.allow_tf32 = True
            case(loss, 70, 90, 48, torch.float32, 48, 5)   # tf32 path
            torch.backends.cuda.matmul.allow_tf32 = False
    elif which == "large":
        for loss in losses:
            case(loss, 2048, 3000, 264, torch.bfloat16, 264, 0)
            case(loss, 2048, 3000, 264, torch.float32, 264, 0)
    else:
        sys.exit(f"usage: {sys.argv[0]} small|large")


if __name__ == "__main__":
    main()
