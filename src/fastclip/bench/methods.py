"""What the loss benchmarks run: per loss, one table entry and the methods it yields.

A loss is one :class:`BenchLoss` in :data:`LOSSES` (its math lives in
:mod:`fastclip.ops.losses`; this is what the benchmarks run around it); nothing else in
``fastclip.bench`` names a loss. The methods of a run on one device, in table order:

* ``floor``: ``floor_products`` ``torch.matmul`` of the loss's shapes (X·Yᵀ, then in
  the backward G·Y and Gᵀ·X, with X·Yᵀ recomputed first where the fused kernels
  recompute it): 2N²D FLOP per product. No correct loss can be much faster
  (docs/design.md §6). Where one N×N buffer would not fit comfortably the same
  products run on row chunks of the same FLOP (the ``impl`` column says so).
* ``naive``: open_clip's own loss class (``open_clip_class``), loaded from open_clip's
  ``loss.py`` by file path when ``open_clip`` is importable (its package ``__init__``
  imports torchvision, so it is not run); otherwise ``formula``, the same loss with
  materialised logits. The ``impl`` column records which.
* every fastclip backend of the device, named by the registry
  (``fastclip.ops.backends.all_backends()``), through ``fused(x, y, params, backend)``;
  one that exists for the device but cannot run here is recorded as skipped with the
  registry's reason.
* the loss's extra ``peers`` (e.g. ``inf-cl`` for ``clip`` on CUDA).

The per-call overhead mode (``--overhead``) runs ``auto`` (the fused loss with
``backend="auto"``), the same backends, ``naive`` and ``floor``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .env import gb, version
from .measure import Step, esize, unit_features

__all__ = ["BenchLoss", "Peer", "LOSSES", "get_loss", "methods_for", "overhead_methods",
           "known_methods", "build_step", "make_inputs", "skip_reason", "extra_bytes_estimate",
           "floor_rows", "naive_peer", "load_open_clip", "fwd_flop", "fwd_bwd_flop",
           "FLOOR", "NAIVE", "AUTO"]

FLOOR, NAIVE, AUTO = "floor", "naive", "auto"
# Largest single N×N floor buffer: above it the floor runs on row chunks of this size.
# Chunks of >= 2 GiB keep BLAS / cuBLAS at full speed (a chunk is >= 4096 rows at
# N = 131072 fp32), so chunking changes the memory, not the time.
_FLOOR_CAP = {"cpu": 2 << 30, "cuda": 8 << 30}


@dataclass(frozen=True)
class Peer:
    """A loss implementation from another project, run beside fastclip's.

    name: the method name in the tables ("inf-cl").
    devices: device types it runs on.
    load: () -> (fn, description) where fn(x, y, params) returns the loss, or
        (None, why it cannot run here).
    check: (N, D, dtype) -> why it cannot take this case, "" when it can.
    extra_bytes: (N, D, dtype) -> memory it needs beyond the inputs and their gradients
        (an upper estimate; methods above the memory budget are skipped, never run).
    """
    name: str
    devices: tuple[str, ...]
    load: Callable[[], tuple]
    check: Callable[[int, int, torch.dtype], str]
    extra_bytes: Callable[[int, int, torch.dtype], int]


@dataclass(frozen=True)
class BenchLoss:
    """One loss, as the benchmarks see it (benchmarks/README.md, "Adding a loss").

    name: the ``--loss`` value and the ``loss`` column of every result.
    title: one line for headers ("symmetric InfoNCE (CLIP)").
    params: device -> the loss's scalar parameters after the features, as 0-dim
        float32 leaves requiring grad (CLIP: the exponentiated scale s).
    fused: (x, y, params, backend) -> 0-dim loss: fastclip's fused op.
    fused_name: how the ``impl`` column names it ("fastclip.clip_loss").
    formula: (x, y, *params) -> loss with materialised logits: the naive peer where
        open_clip is not importable.
    formula_name: its dotted name for the ``impl`` column.
    open_clip_class: the class in open_clip's ``loss.py`` called as
        ``cls()(x, y, *params)``.
    naive_buffers: N×N buffers of the input dtype that the open_clip class and the
        formula hold at their peak (memory estimate for the budget).
    floor_products: matmuls of the floor's forward+backward: 4 when the backward
        recomputes X·Yᵀ before G·Y and Gᵀ·X, 3 when it reuses the forward's buffer.
    peers: extra peers of this loss.
    distributed: (x, y, params, dist_impl, backend) -> the loss over all ranks
        (fastclip's sharded form), or None when the loss has none.
    open_clip_sharded: (rank, world) -> keyword arguments of ``open_clip_class`` for
        a group of ``world`` ranks.
    sharded_formula: (x, y, params, rank) -> the same loss from all-gathered features
        (with gradient), where open_clip is not importable.
    """
    name: str
    title: str
    params: Callable[[str], tuple]
    fused: Callable[..., Tensor]
    fused_name: str
    formula: Callable[..., Tensor]
    formula_name: str
    open_clip_class: str
    naive_buffers: tuple[int, int]
    floor_products: int
    peers: tuple[Peer, ...] = ()
    distributed: Callable[..., Tensor] | None = None
    open_clip_sharded: Callable[[int, int], dict] | None = None
    sharded_formula: Callable[..., Tensor] | None = None


# ------------------------------------------------------------------------- clip
def _clip_params(device: str) -> tuple:
    return (torch.tensor(1 / 0.07, dtype=torch.float32, device=device, requires_grad=True),)


def _clip_fused(x, y, params, backend):
    import fastclip  # noqa: PLC0415
    return fastclip.clip_loss(x, y, params[0], backend=backend)


def _clip_formula(x, y, s):
    from fastclip.ops.reference import clip_loss_naive  # noqa: PLC0415
    return clip_loss_naive(x, y, s)


def _clip_distributed(x, y, params, dist_impl, backend):
    from fastclip.distributed import clip_loss  # noqa: PLC0415
    return clip_loss(x, y, params[0], dist_impl=dist_impl, backend=backend)


def _clip_sharded_formula(x, y, params, rank):
    """open_clip's ClipLoss(local_loss=True, gather_with_grad=True): features all-gathered
    with gradient, the two local n×N logit matrices, two cross-entropies."""
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.distributed.nn.functional import all_gather  # noqa: PLC0415
    s = params[0]
    all_x = torch.cat(all_gather(x), 0)
    all_y = torch.cat(all_gather(y), 0)
    labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
    return (F.cross_entropy(s * x @ all_y.T, labels)
            + F.cross_entropy(s * y @ all_x.T, labels)) / 2


def _inf_cl_load():
    try:
        import inf_cl  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - a broken install is as good as none
        return None, f"inf-cl not importable ({type(e).__name__}: {e}); pip install inf-cl"
    cal = inf_cl.cal_inf_loss
    # inf-cl's own ``scale=`` passes through a GradientGather whose backward calls
    # dist.all_reduce, which fails without a process group; scaling the row features is
    # exactly what cal_inf_loss does with it.
    return (lambda x, y, p: 0.5 * (cal(p[0] * x, y) + cal(p[0] * y, x)),
            f"inf-cl {version('inf-cl') or version('inf_cl') or '?'} "
            "(s applied to the row features)")


def _inf_cl_check(n: int, d: int, dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "inf-cl takes float32 features only"
    if d % 256:
        return f"inf-cl needs D a multiple of its head_dim 256 (D={d})"
    return ""


INF_CL = Peer(name="inf-cl", devices=("cuda",), load=_inf_cl_load, check=_inf_cl_check,
              extra_bytes=lambda n, d, dtype: 12 * n * d * 4 + 64 * n)

CLIP = BenchLoss(
    name="clip", title="symmetric InfoNCE (CLIP)",
    params=_clip_params, fused=_clip_fused, fused_name="fastclip.clip_loss",
    formula=_clip_formula, formula_name="fastclip.ops.reference.clip_loss_naive",
    open_clip_class="ClipLoss",
    # open_clip holds two N×N logit matrices (both directions), their log-softmax outputs
    # and, in the backward, their gradients: ~6 N×N, 7 budgeted. The one-matmul formula
    # peaked at 3.8 N×N fp32 beyond the inputs on the CPU (N = 4096-16384,
    # benchmarks/results/cpu-amd-epyc.md); 6 budgeted for other allocators and dtypes.
    naive_buffers=(7, 6),
    floor_products=4, peers=(INF_CL,),
    distributed=_clip_distributed,
    open_clip_sharded=lambda rank, world: dict(local_loss=True, gather_with_grad=True,
                                               rank=rank, world_size=world),
    sharded_formula=_clip_sharded_formula)

# ------------------------------------------------------------------------ siglip
def _siglip_params(device: str) -> tuple:
    # The paper's initialisation: t = 10 (log t = log 10), b = -10.
    return (torch.tensor(10.0, dtype=torch.float32, device=device, requires_grad=True),
            torch.tensor(-10.0, dtype=torch.float32, device=device, requires_grad=True))


def _siglip_fused(x, y, params, backend):
    import fastclip  # noqa: PLC0415
    return fastclip.siglip_loss(x, y, params[0], params[1], backend=backend)


def _siglip_formula(x, y, t, b):
    from fastclip.ops.reference import siglip_loss_naive  # noqa: PLC0415
    return siglip_loss_naive(x, y, t, b)


def _siglip_distributed(x, y, params, dist_impl, backend):
    from fastclip.distributed import siglip_loss  # noqa: PLC0415
    return siglip_loss(x, y, params[0], params[1], dist_impl=dist_impl, backend=backend)


def _siglip_sharded_formula(x, y, params, rank):
    """open_clip's SigLipLoss(dist_impl="gather") written out: text features all-gathered
    with gradient, this rank's n×N logits and labels, divided by the local n."""
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.distributed.nn.functional import all_gather  # noqa: PLC0415
    t, b = params
    all_y = torch.cat(all_gather(y), 0)
    n = x.shape[0]
    logits = t * x @ all_y.T + b                                     # [n, N]
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n) + rank * n] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


SIGLIP = BenchLoss(
    name="siglip", title="pairwise sigmoid (SigLIP)",
    params=_siglip_params, fused=_siglip_fused, fused_name="fastclip.siglip_loss",
    formula=_siglip_formula, formula_name="fastclip.ops.reference.siglip_loss_naive",
    open_clip_class="SigLipLoss",
    # open_clip: the logits, the ±1 label matrix (built from -ones and 2·eye), their
    # product, logsigmoid's output and, in the backward, the logits' gradient: ~6 N×N,
    # 7 budgeted; the formula builds the same minus one.
    naive_buffers=(7, 6),
    # The gradient of a tile needs that tile only: X·Yᵀ, G·Y and Gᵀ·X, 6N²D FLOP.
    floor_products=3,
    distributed=_siglip_distributed,
    open_clip_sharded=lambda rank, world: dict(rank=rank, world_size=world, dist_impl="gather"),
    sharded_formula=_siglip_sharded_formula)

# The loss table: adding a loss to every benchmark is adding its entry here.
LOSSES: dict[str, BenchLoss] = {s.name: s for s in (CLIP, SIGLIP)}


def get_loss(name: str) -> BenchLoss:
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} has no benchmark entry; expected one of "
                         f"{', '.join(LOSSES)}")
    return LOSSES[name]


def fwd_flop(spec: BenchLoss, n: int, d: int) -> int:
    """Effective forward FLOP, whatever the method does: one X·Yᵀ."""
    return 2 * n * n * d


def fwd_bwd_flop(spec: BenchLoss, n: int, d: int) -> int:
    """Effective forward+backward FLOP: the floor's products."""
    return spec.floor_products * 2 * n * n * d


# --------------------------------------------------------------------- peers
@functools.lru_cache(maxsize=None)
def load_open_clip(class_name: str):
    """``class_name`` from open_clip's ``loss.py`` by file path, or (None, why)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError) as e:
        return None, f"open_clip not importable ({e})"
    if spec is None or not spec.submodule_search_locations:
        return None, "open_clip not importable"
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.isfile(path):
        return None, f"open_clip has no loss.py at {path}"
    mspec = importlib.util.spec_from_file_location("_fastclip_bench_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(mod)
        cls = getattr(mod, class_name)
    except Exception as e:  # noqa: BLE001 - any failure means: use the formula
        return None, f"open_clip's loss.py did not load ({type(e).__name__}: {e})"
    ver = version("open_clip_torch") or version("open-clip-torch") or "?"
    return cls, f"open_clip {ver} loss.{class_name}"


def naive_peer(spec: BenchLoss, naive: str = "auto"):
    """(fn(x, y, params) -> loss, description, is_formula) of the naive peer.

    ``naive``: "auto" (open_clip if importable, else the formula), "open_clip" (raise
    when it is not importable) or "formula"."""
    desc = ""
    if naive in ("auto", "open_clip"):
        cls, desc = load_open_clip(spec.open_clip_class)
        if cls is not None:
            inst = cls()
            return (lambda x, y, p: inst(x, y, *p)), desc, False
        if naive == "open_clip":
            raise RuntimeError(f"--naive open_clip: {desc}")
    why = f" ({desc})" if desc else ""
    return (lambda x, y, p: spec.formula(x, y, *p)), f"formula {spec.formula_name}{why}", True


# ------------------------------------------------------------------- methods
def _backends(device: str, spec: BenchLoss):
    """The registry's backends that run on ``device`` and implement the loss."""
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    return [b for b in all_backends().values() if device in b.devices and spec.name in b.losses]


def methods_for(spec: BenchLoss, device: str, only: list[str] | None = None
                ) -> list[tuple[str, str]]:
    """[(method, why it cannot run here or "")] in table order, filtered by ``only``."""
    out = [(FLOOR, ""), (NAIVE, "")]
    for b in _backends(device, spec):
        ok, why = b.availability()
        out.append((b.name, "" if ok else f"backend unavailable: {why}"))
    out += [(p.name, "") for p in spec.peers if device in p.devices]
    names = [m for m, _ in out]
    assert len(set(names)) == len(names), f"method names collide: {names}"
    if only:
        # A method asked for that this device does not offer gets a skipped row saying so,
        # not silence.
        out = [t for t in out if t[0] in only] + [(m, _elsewhere(spec, m, device))
                                                    for m in dict.fromkeys(only) if m not in names]
    return out


def _elsewhere(spec: BenchLoss, method: str, device: str) -> str:
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    b = all_backends().get(method)
    devices = b.devices if b is not None else next((p.devices for p in spec.peers if p.name == method), ())
    return f"runs on {' or '.join(devices) or 'another device'} only, not --device {device}"


def overhead_methods(spec: BenchLoss, device: str) -> list[tuple[str, str]]:
    """Methods of the per-call overhead mode: auto, each backend, naive, floor."""
    out = [(AUTO, "")]
    for b in _backends(device, spec):
        ok, why = b.availability()
        out.append((b.name, "" if ok else f"backend unavailable: {why}"))
    return out + [(NAIVE, ""), (FLOOR, "")]


def known_methods(spec: BenchLoss) -> list[str]:
    """Every method name a run of ``spec`` can have, on any device (for --methods)."""
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    return [FLOOR, NAIVE, *(n for n, b in all_backends().items() if spec.name in b.losses),
            *(p.name for p in spec.peers)]


def _peer(spec: BenchLoss, method: str) -> Peer | None:
    return next((p for p in spec.peers if p.name == method), None)


def floor_rows(n: int, dtype: torch.dtype, device: str, max_mem_bytes: int = 0) -> int:
    """Rows of the floor's logits buffer: all N, or a chunk where N×N would be too big."""
    cap = _FLOOR_CAP[device]
    if max_mem_bytes:
        cap = min(cap, max_mem_bytes // 4)
    row_bytes = n * esize(dtype)
    if n * row_bytes <= cap:
        return n
    rows = max(1, cap // row_bytes)
    return max(min(n, 256), rows // 256 * 256)


def extra_bytes_estimate(spec: BenchLoss, method: str, n: int, d: int, dtype: torch.dtype, *,
                         device: str, naive: str = "auto", max_mem_bytes: int = 0) -> int:
    """Memory a method needs beyond the inputs and their gradients (an upper estimate).

    fastclip's backends: 8 N·D accumulator copies, plus the buffers the backend declares
    (``Backend.scratch_bytes``: the reference's N² tiles, the gemm backend's logit chunk, the
    cpu kernel's dY buffers; nothing for the fused GPU kernels). (Every backend was charged the
    reference's N² tiles: a memory budget skipped the fused kernel, ~4 MB at N = 4096 in bf16,
    where it kept open_clip's loss, ~129 MB.)
    """
    e = esize(dtype)
    acc = 8 if dtype == torch.float64 else 4
    if method == FLOOR:
        return floor_rows(n, dtype, device, max_mem_bytes) * n * e
    if method == NAIVE:
        is_formula = naive == "formula" or naive_peer(spec, naive)[2]
        return spec.naive_buffers[1 if is_formula else 0] * n * n * e
    peer = _peer(spec, method)
    if peer is not None:
        return peer.extra_bytes(n, d, dtype)
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    b = all_backends().get(method)
    scratch = b.scratch_bytes(n, n, d, acc) if b is not None else 6 * min(1 << 24, n * n) * acc
    return 8 * n * d * acc + 64 * n + scratch


def skip_reason(spec: BenchLoss, method: str, n: int, d: int, dtype: torch.dtype, *,
                device: str, naive: str = "auto", max_mem_bytes: int = 0) -> str:
    """Why ``method`` must not run at this size ("" when it may): capability or memory."""
    peer = _peer(spec, method)
    if peer is not None:
        why = peer.check(n, d, dtype)
        if why:
            return why
        fn, desc = peer.load()
        if fn is None:
            return desc
    elif method == NAIVE:
        if naive == "open_clip" and load_open_clip(spec.open_clip_class)[0] is None:
            return load_open_clip(spec.open_clip_class)[1]
    elif method not in (FLOOR, AUTO):
        from fastclip.ops.backends import get_backend  # noqa: PLC0415
        b = get_backend(method)
        if dtype not in b.dtypes:
            return (f"backend {method!r} takes "
                    f"{', '.join(str(t).replace('torch.', '') for t in b.dtypes)}")
    need = 4 * n * d * esize(dtype) + extra_bytes_estimate(
        spec, method, n, d, dtype, device=device, naive=naive, max_mem_bytes=max_mem_bytes)
    if max_mem_bytes and need > max_mem_bytes:
        return f"would need {gb(need)} (budget {gb(max_mem_bytes)}, --max-mem-gb)"
    return ""


# --------------------------------------------------------------------- steps
# In the impl of a floor that runs a one-pass loss on row chunks: its "forward" holds all
# three products, so it has no forward time of one X·Yᵀ to compare with (report.derive).
ALL_IN_FORWARD = "all in the forward"


def _floor_step(spec: BenchLoss, x: Tensor, y: Tensor, rows: int) -> Step:
    n = x.shape[0]
    recompute = spec.floor_products == 4
    assert spec.floor_products in (3, 4), spec.floor_products
    xd, yd = x.detach(), y.detach()
    buf = torch.empty((rows, n), dtype=x.dtype, device=x.device)   # logits, then G
    gx, gy = torch.empty_like(xd), torch.empty_like(yd)
    # Written once here, so that the first timed step does not pay the buffers' first touch:
    # the floor keeps them between steps. With one rep (large N) the only timed step is the
    # first: untouched, the floor's forward took 308 ms instead of 147 (N = 8192, D = 32).
    for t in (buf, gx, gy):
        t.zero_()
    what = f"{spec.floor_products} x torch.matmul"
    if rows >= n:
        def fwd():
            torch.matmul(xd, yd.T, out=buf)

        def bwd(_):
            if recompute:
                torch.matmul(xd, yd.T, out=buf)
            torch.matmul(buf, yd, out=gx)             # G·Y
            torch.matmul(buf.T, xd, out=gy)           # Gᵀ·X
        return Step(fwd, bwd, f"{what}, one N x N buffer", (gx, gy))
    chunks = [(a, min(n, a + rows)) for a in range(0, n, rows)]

    def chunk_grads(i, a, b, g):
        torch.matmul(g, yd, out=gx[a:b])              # G·Y, this chunk's rows
        if i == 0:
            torch.matmul(g.T, xd[a:b], out=gy)        # Gᵀ·X, summed over the chunks
        else:
            gy.addmm_(g.T, xd[a:b])
    if not recompute:
        # A one-pass loss on row chunks: each chunk's X·Yᵀ, G·Y and Gᵀ·X at once, in the
        # forward (as the fused one-pass loss computes its gradients), nothing kept between
        # the two calls: still 3 products.
        def fwd():
            for i, (a, b) in enumerate(chunks):
                g = buf[:b - a]
                torch.matmul(xd[a:b], yd.T, out=g)
                chunk_grads(i, a, b, g)
        return Step(fwd, lambda _: None,
                    f"3 x torch.matmul on row chunks of {rows}, {ALL_IN_FORWARD} "
                    "(N x N would not fit)", (gx, gy))
    # Row chunks of a two-pass loss: the backward recomputes each chunk's X·Yᵀ (a chunked
    # forward cannot keep them all), as the 4-product floor counts anyway.

    def fwd():
        for a, b in chunks:
            torch.matmul(xd[a:b], yd.T, out=buf[:b - a])

    def bwd(_):
        for i, (a, b) in enumerate(chunks):
            g = buf[:b - a]
            torch.matmul(xd[a:b], yd.T, out=g)
            chunk_grads(i, a, b, g)
    return Step(fwd, bwd, f"4 x torch.matmul on row chunks of {rows} (N x N would not fit)",
                (gx, gy))


def build_step(spec: BenchLoss, method: str, inputs: tuple, *, device: str,
               naive: str = "auto", max_mem_bytes: int = 0) -> Step:
    """The timed callables of ``method`` on ``inputs`` = (x [N, D], y [N, D], *params)."""
    x, y, params = inputs[0], inputs[1], tuple(inputs[2:])
    if method == FLOOR:
        return _floor_step(spec, x, y, floor_rows(x.shape[0], x.dtype, device, max_mem_bytes))
    backward = lambda loss: loss.backward()  # noqa: E731
    if method == NAIVE:
        fn, desc, _ = naive_peer(spec, naive)
        return Step(lambda: fn(x, y, params), backward, desc)
    peer = _peer(spec, method)
    if peer is not None:
        fn, desc = peer.load()
        if fn is None:
            raise RuntimeError(desc)
        return Step(lambda: fn(x, y, params), backward, desc)
    impl = f"{spec.fused_name}(backend={method!r})"
    name = method
    if method == AUTO:
        from fastclip.ops.backends import resolve_backend  # noqa: PLC0415
        name = resolve_backend(AUTO, x.device, x.dtype).name
        impl += f" -> {name}"
    if name == "cpu":
        from fastclip.ops.backends.cpu import kernels_for  # noqa: PLC0415
        impl += f", {kernels_for(x.dtype, y.dtype)} kernels"
    return Step(lambda: spec.fused(x, y, params, method), backward, impl)


def make_inputs(spec: BenchLoss, n: int, d: int, dtype: torch.dtype, device: str,
                seed: int) -> tuple:
    """(x, y, *params): unit-norm features [n, d] and the loss's parameters."""
    return (*unit_features(n, d, dtype, device, seed), *spec.params(device))
