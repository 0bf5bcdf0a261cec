"""FLOP formulas of the fused ops for ``torch.utils.flop_counter.FlopCounterMode``.

A custom op is opaque to PyTorch's FLOP counter: without a formula the loss counted 0 FLOPs,
and a trainer measuring its model FLOP utilisation after switching to fastclip undercounted.
The formulas count the matrix products each op runs, 2 FLOP per multiply-add, as the counter
counts ``aten.mm``: for a block of ``n`` rows, ``m`` columns and ``D`` features,

* ``contrastive_loss_fwd``: the logits ``X Yᵀ``, ``2·n·m·D``;
* ``contrastive_loss_bwd``: the logits recomputed and the two gradient products ``G Y`` and
  ``Gᵀ X``, ``6·n·m·D`` (the backward never stores the logits: it makes them again);
* ``contrastive_loss_fwd_bwd``: the one pass's three products, ``6·n·m·D``.

(The normalisation, the epilogue and the statistics are O(n·D + n·m) without products, which
the counter does not count for aten ops either.)

The counter copies the formula registry when a ``FlopCounterMode`` is made, so the formulas
must be in it before: they are added when ``torch.utils.flop_counter`` is imported, by a
finder that waits for that import, or at once when it already was. ``import fastclip`` does
not import the counter itself: on a machine with Triton that import also imports Triton's
runtime (~150 ms).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

_COUNTER = "torch.utils.flop_counter"


def _block(x_shape, y_shape) -> int:
    """n·m·D of a block: x [n, D], y [m, D]."""
    return int(x_shape[0]) * int(y_shape[0]) * int(x_shape[1])


def fwd_flops(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _block(x_shape, y_shape)


def bwd_flops(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * _block(x_shape, y_shape)


def fwd_bwd_flops(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * _block(x_shape, y_shape)


def _register() -> None:
    from torch.utils.flop_counter import flop_registry, shape_wrapper  # noqa: PLC0415 - see the docstring
    ops = torch.ops.fastclip
    for op, formula in ((ops.contrastive_loss_fwd, fwd_flops), (ops.contrastive_loss_bwd, bwd_flops),
                        (ops.contrastive_loss_fwd_bwd, fwd_bwd_flops)):
        flop_registry.setdefault(op, shape_wrapper(formula))


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``torch.utils.flop_counter`` is imported, it has the other
    finders find it and wraps the loader so that :func:`_register` runs once the module has
    executed; then it leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _COUNTER:
            return None
        self._remove()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec

    def _remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register()
        except Exception:  # noqa: BLE001 - a torch whose counter changed: no formulas, the import stands
            pass

    def __getattr__(self, name):      # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)


def install() -> None:
    """Add the formulas now if the counter is imported, else when it is."""
    if _COUNTER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
