"""A first look at one GPU backend before the long checks: is it fit to be benchmarked?

    python scripts/gpu_smoke.py BACKEND            (cuda or triton; cpu runs it on the CPU)

For every loss the backend implements, bf16 and fp32, a few sizes (odd ones, one past a
block edge, one large enough for several waves of row blocks): the fused loss and its
gradients (features, scale, bias) against the float64 reference on the same GPU, relative
error ‖out − ref‖/‖ref‖ per output. Prints one line per case and exits 1 when a result is
not finite or is off by more than 5e-2 (bf16) or 1e-3 (fp32): far looser than the test
suite's tolerance table (tests/ops/_helpers.py), since this only decides whether the
benchmark may time the backend. scripts/gpu_check.sh runs it in its own process per
backend, so that a kernel fault (a sticky CUDA error) cannot take the other backend's
measurements with it.
"""

from __future__ import annotations

import sys
import time

import torch

import fastclip
from fastclip.ops.backends import get_backend

LIMIT = {torch.bfloat16: 5e-2, torch.float32: 1e-3}
SIZES = [(77, 64), (1000, 512), (4097, 512), (20000, 768)]
if len(sys.argv) > 2 and sys.argv[2] == "--quick":
    SIZES = SIZES[:2]


DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    d = b.norm().item()
    return (a - b).norm().item() / (d if d > 0 else 1.0)


def run(loss: str, backend: str, n: int, d: int, dtype: torch.dtype, gen) -> tuple[bool, str]:
    x = torch.randn(n, d, device=DEV, generator=gen)
    # pairs correlate (cos ~0.55): a loss of order 1, not a near-0 one that rounding dominates
    y = x + 1.5 * torch.randn(n, d, device=DEV, generator=gen)
    params = (10.0,) if loss == "clip" else (10.0, -10.0)
    fn = fastclip.clip_loss if loss == "clip" else fastclip.siglip_loss

    def go(xx, yy, pdt, be):
        xx = xx.detach().requires_grad_(True)
        yy = yy.detach().requires_grad_(True)
        ps = [torch.tensor(v, device=DEV, dtype=pdt, requires_grad=True) for v in params]
        val = fn(xx, yy, *ps, normalize=True, backend=be)
        val.backward()
        return [val, xx.grad, yy.grad, *(p.grad for p in ps)]

    t0 = time.perf_counter()
    out = go(x.to(dtype), y.to(dtype), torch.float32, backend)
    if DEV == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ref = go(x.double(), y.double(), torch.float64, "reference")
    names = ["loss", "dX", "dY", "dscale", "dbias"][:len(out)]
    errs = [rel(o, r) for o, r in zip(out, ref)]
    finite = all(bool(torch.isfinite(o).all()) for o in out)
    ok = finite and max(errs) <= LIMIT[dtype]
    txt = " ".join(f"{k} {e:.1e}" for k, e in zip(names, errs))
    return ok, f"{'ok  ' if ok else 'BAD '} {loss:<6} {str(dtype)[6:]:<8} N={n:<6} D={d:<4} " \
               f"{txt}{'' if finite else ' NON-FINITE'}  (first call {dt:.2f} s)"


def main() -> int:
    global DEV
    backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    DEV = "cpu" if backend == "cpu" else "cuda"
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    ok, why = get_backend(backend).availability()
    if not ok:
        print(f"{backend}: unavailable: {why}")
        return 1
    gen = torch.Generator(device=DEV).manual_seed(int(time.time()))
    bad = 0
    for loss in get_backend(backend).losses:
        for dtype in (torch.bfloat16, torch.float32):
            for n, d in SIZES:
                try:
                    good, line = run(loss, backend, n, d, dtype, gen)
                except Exception as e:  # noqa: BLE001 - reported; a CUDA fault ends the run
                    good, line = False, f"FAIL {loss} {dtype} N={n} D={d}: {type(e).__name__}: " \
                                        f"{(str(e).splitlines() or [''])[0][:200]}"
                bad += not good
                print(f"{backend}: {line}", flush=True)
                if "CUDA error" in line or "illegal" in line:
                    return 1
    print(f"{backend}: {'healthy' if not bad else f'{bad} bad case(s)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
