"""Time builds of the C++ CPU kernels against each other in one process, calls interleaved.

    python scripts/ab_cpu_builds.py installed /tmp/variant/_C.cpython-311-x86_64-linux-gnu.so
    python scripts/ab_cpu_builds.py installed B.so --loss clip --n 4096 --threads 2 --floor
    python scripts/ab_cpu_builds.py installed@avx512bf16 installed@avx512 --dtype bf16 --threads 2

For tuning the kernels (benchmarks/results/cpu-kernel-tuning.md) on a machine whose speed
drifts: timed in separate runs, two builds see different speeds (up to 2x over minutes on one
2-core machine), and a 5 % change is lost in it. Here every build is loaded side by side, each
under a module name of its own, and each round calls every build once (order reversed every
other round), so neighbouring calls see the same speed; the per-round ratio to the first build
cancels the drift. ``installed`` is the build fastclip imports. Each build's gradients are
compared with the first build's first, so a build that computes something else is seen.
``BUILD@ISA`` runs that build with ``FASTCLIP_CPU_ISA=ISA`` (set before each of its calls): the
same build's instruction sets against each other, e.g. bf16 against fp32 products.

Prints, per build: fastest and median call (forward+backward, ms) and the median, min and max
over the rounds of its time / the first build's time. Inputs, parameters, the fused call and
``--floor`` (torch.matmul's products of the loss's shapes: 3 for SigLIP, 4 for CLIP) are
``fastclip bench``'s own (fastclip.bench.methods).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import time

import torch


def load_build(path: str, index: int):
    """The extension module in ``path``, loaded under a name of its own (a second load of the
    same name would return the module already loaded)."""
    name = f"fastclip_ab{index}._C"      # the last part, _C, names the init function
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+",
                    help="paths of _C builds, or 'installed'; BUILD@ISA sets FASTCLIP_CPU_ISA")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="feature dtype (default fp32)")
    ap.add_argument("--loss", choices=["clip", "siglip"], default="siglip")
    ap.add_argument("--n", type=int, default=2048, help="batch size N (default 2048)")
    ap.add_argument("--d", type=int, default=512, help="feature size D (default 512)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--rounds", type=int, default=40, help="calls of each build (default 40)")
    ap.add_argument("--floor", action="store_true", help="also time torch.matmul's products")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1 or args.d < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--n, --d, --threads and --rounds must be at least 1")

    from fastclip import _ext
    from fastclip.bench import methods as M

    if _ext.extension() is None:
        print(f"ab_cpu_builds: {_ext.extension_error()}", file=sys.stderr)
        return 2
    builds: dict[str, object] = {}
    isas: dict[str, str | None] = {}
    for i, arg in enumerate(args.builds):
        path, _, isa = arg.partition("@")
        if path == "installed":
            name = f"{i}:installed"
            builds[name] = _ext.extension()
        elif not os.path.isfile(path):
            ap.error(f"build {path!r}: no such file")
        else:
            name = f"{i}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
            builds[name] = load_build(path, i)
        if isa:
            name += f"@{isa}"
            builds[name] = builds.pop(name[:-len(isa) - 1])
        isas[name] = isa or None

    torch.set_num_threads(args.threads)
    # The benchmark's own inputs and steps: unit features, the loss's initial parameters, the
    # fused op on the cpu backend and the floor, as `fastclip bench` runs them.
    spec = M.get_loss(args.loss)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    inputs = M.make_inputs(spec, args.n, args.d, dtype, "cpu", args.seed)
    x, y = inputs[0], inputs[1]
    steps = {"fused": M.build_step(spec, "cpu", inputs, device="cpu")}
    if args.floor:
        steps["floor"] = M.build_step(spec, M.FLOOR, inputs, device="cpu")

    def call(name: str) -> float:
        step = steps["floor" if name == "floor" else "fused"]
        if name != "floor":
            _ext._C = builds[name]
            if isas[name] is None:
                os.environ.pop("FASTCLIP_CPU_ISA", None)
            else:
                os.environ["FASTCLIP_CPU_ISA"] = isas[name]
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        step.bwd(step.fwd())
        return time.perf_counter() - t0

    names = list(builds) + (["floor"] if args.floor else [])
    installed = _ext.extension()
    isa_env = os.environ.get("FASTCLIP_CPU_ISA")
    try:
        first = None
        for name in builds:                  # warm-up, and the gradients side by side
            call(name)
            grads = torch.cat([x.grad.flatten(), y.grad.flatten()])
            if first is None:
                first = grads
            print(f"{name}: max |grad - first build's| = {(grads - first).abs().max().item():.3g}")
        if args.floor:
            call("floor")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(call(name))
    finally:
        _ext._C = installed
        if isa_env is None:
            os.environ.pop("FASTCLIP_CPU_ISA", None)
        else:
            os.environ["FASTCLIP_CPU_ISA"] = isa_env
    print(f"{args.loss} forward+backward, {args.dtype}, N = {args.n}, D = {args.d}, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    base = times[names[0]]
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base)]
        print(f"  {name:24s} fastest {min(times[name]) * 1e3:9.2f} ms  median "
              f"{statistics.median(times[name]) * 1e3:9.2f} ms  / first build: median "
              f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
