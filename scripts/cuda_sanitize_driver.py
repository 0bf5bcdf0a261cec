"""Tiny driver for scripts/sanitize_cuda.sh: one forward+backward of the ``cuda`` backend.

    python scripts/cuda_sanitize_driver.py small|large

small: odd sizes, every dtype, both the 16-byte cp.async path and the scalar fallback
(odd row stride), M != N with a pos_offset through the block functions.
large: one bf16 and one fp32 case big enough for several row/column groups and column
splits (n=2048, m=3000, D=264), still quick under the sanitizer.
Exits non-zero when a result is not finite (the sanitizer reports memory errors itself).
"""

from __future__ import annotations

import sys

import torch

from fastclip.ops.backends import get_backend


def case(n: int, m: int, d: int, dtype: torch.dtype, ld: int, pos_offset: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(n * 31 + m)
    xb = torch.randn(n, ld, device="cuda", generator=g).to(dtype)
    yb = torch.randn(m, ld, device="cuda", generator=g).to(dtype)
    x, y = xb[:, :d], yb[:, :d]
    s = torch.tensor(14.0, device="cuda")
    b = get_backend("cuda")
    row, col, pos = b.fwd(x, y, s, True, 1e-12, pos_offset)
    gr, gc, gp = (torch.randn(k, device="cuda", generator=g) for k in (n, m, n))
    dx, dy, ds = b.bwd(x, y, s, True, 1e-12, pos_offset, row, col, gr, gc, gp)
    torch.cuda.synchronize()
    for name, t in (("row_lse", row), ("col_lse", col), ("pos", pos), ("dx", dx), ("dy", dy),
                    ("dscale", ds)):
        if not torch.isfinite(t).all():
            sys.exit(f"non-finite {name} for n={n} m={m} d={d} {dtype} ld={ld}")
    print(f"ok n={n} m={m} d={d} {dtype} ld={ld} pos_offset={pos_offset}")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "small"
    ok, reason = get_backend("cuda").availability()
    if not ok:
        sys.exit(f"cuda backend unavailable: {reason}")
    if which == "small":
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            case(77, 130, 40, dtype, 40, 0)       # vectorised path, masked tails
            case(65, 3, 21, dtype, 23, -2)        # scalar fallback, tiny m, negative offset
        torch.backends.cuda.matmul.allow_tf32 = True
        case(70, 90, 48, torch.float32, 48, 5)    # tf32 path
    elif which == "large":
        case(2048, 3000, 264, torch.bfloat16, 264, 0)
        case(2048, 3000, 264, torch.float32, 264, 0)
    else:
        sys.exit(f"usage: {sys.argv[0]} small|large")


if __name__ == "__main__":
    main()
