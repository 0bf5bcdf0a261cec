"""Linear-probe evaluation: L2-regularised multinomial logistic regression on frozen features.

Follows the CLIP paper's protocol: the inverse regularisation strength ``C`` is chosen on a
validation split by a coarse sweep over ``10^-6 .. 10^6`` (two decades apart) followed by
repeatedly halving the step around the best value (default down to 1/8 decade); the
classifier is then refit on train + validation and scored on the test set. The objective matches
scikit-learn's ``LogisticRegression(C=C)`` (``C * sum CE + ||W||^2 / 2``, bias unpenalised; with two
classes, where scikit-learn fits one weight vector, the penalty on the softmax's two is doubled),
scaled by ``1 / (C N)``, and is minimised with ``torch.optim.LBFGS`` (strong-Wolfe line search) on
whichever device the features live on (or ``device``), in float64 on the CPU (as scikit-learn)
and float32 on a GPU unless told otherwise (``dtype``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import as_features, class_indices, finite_rows, fp32_math, int_at_least


@dataclass
class LinearProbeResult:
    classifier: nn.Linear  # D -> num_classes, fp32 (whatever the fit's dtype), on the fitting device
    C: float  # chosen inverse regularisation strength
    accuracy: float  # test top-1 in [0, 1]
    val_accuracy: float  # validation top-1 at the chosen C
    # (C, val accuracy) tried, in order: the coarse grid ascending, then the refinements
    search: List[Tuple[float, float]] = field(default_factory=list)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int = 1000,
                 init: Optional[nn.Linear] = None, tol: float = 1e-7) -> nn.Linear:
    """Minimise ``mean CE(W x + b, y) + ||W||^2 / (2 C N)`` (the penalty doubled when ``y`` holds
    exactly two classes: scikit-learn's binary problem) with LBFGS. ``x`` ``[N, D]`` float,
    ``y`` ``[N]`` long. Returns an ``nn.Linear(D, num_classes)`` (warm-started from ``init``).
    ``max_iter`` (a positive int, default 1000): LBFGS iterations at most. ``x`` and ``y`` hold
    at least one row, as many each. Runs with autocast off
    (in ``x``'s dtype, whatever the caller's context). ``C``: a finite positive number;
    ``num_classes``: an int above every label."""
    if isinstance(C, bool) or not isinstance(C, numbers.Real):
        raise TypeError(f"C must be a finite positive number, got {type(C).__name__} {C!r}")
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a finite positive number, got {C}")
    max_iter = int_at_least(max_iter, "max_iter")
    num_classes = int_at_least(num_classes, "num_classes")
    if x.dim() != 2 or x.shape[0] == 0 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, D] with N >= 1 and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"y must hold class indices in [0, num_classes={num_classes}), got values from "
                         f"{int(y.min())} to {int(y.max())}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite values (NaN or inf): a probe cannot be fitted on them")
    # Its own autograd graph, whatever the caller's context: ``enable_grad`` for a caller under
    # ``no_grad``, ``inference_mode(False)`` (and copies of inference tensors) for one under
    # ``inference_mode``, and detached features, so that the fit never reaches back into the
    # model that made them (features straight from ``encode_image`` filled its ``.grad``).
    with torch.inference_mode(False), torch.enable_grad(), fp32_math():
        x, y = (t.clone() if t.is_inference() else t for t in (x.detach(), y))
        # Features above 2^16 are fitted as x / s with C s^2: the same objective in V = W s
        # (logits V (x / s) = W x, penalty ||V||^2 / (2 C s^2) = ||W||^2 / 2C), s a power of two
        # (exact). Features of 1e12 overflowed LBFGS's fp32 step ("value cannot be converted to
        # type float"), those of 1e20 gave NaN weights at chance accuracy, and at 1e6 the
        # unscaled fit stopped 0.25 away (in probability) from the optimum the scaled one reaches
        # (float64, tests/eval/test_linear_probe.py). Tiny features stay as they are (C s^2 made
        # the penalty's factor overflow).
        amax = float(x.abs().max()) if x.numel() else 0.0
        s = 2.0 ** round(math.log2(amax)) if amax > 2.0 ** 16 else 1.0
        x = x / s if s != 1.0 else x
        clf = nn.Linear(x.shape[1], num_classes, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            if init is not None:
                clf.weight.copy_(init.weight * s)
                clf.bias.copy_(init.bias)
            else:
                clf.weight.zero_()
                clf.bias.zero_()
        # Two classes: scikit-learn fits one vector w where the softmax has w1, w2 with logit
        # difference (w1 - w2); its penalty ||w||^2 / 2C is ours at w1 = -w2 = w / 2 only with
        # the penalty doubled (else our C was its 2C: probabilities 0.07 apart at C = 1).
        lam = (2.0 if torch.unique(y).numel() == 2 else 1.0) / (C * s * s * x.shape[0])
        # tol / s: the gradient in V = W s is the gradient in W over s, so the fit stops where
        # it stopped unscaled (tol itself stopped features of 1e5 at 300x the objective's gap).
        # tolerance_change: float64 stopped at 1e-10 with the objective 3e-6 (relative) above
        # scikit-learn's at C = 1e4 (one probability 3.5e-3 off), at 1e-14 it reached it; the
        # objective is O(1), so 1e-14 is ~50 ulp of float64; float32 resolves ~1e-7 of it.
        change = 1e-14 if x.dtype == torch.float64 else 1e-10
        opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                tolerance_grad=tol / s, tolerance_change=change, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(x), y) + 0.5 * lam * clf.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            clf.weight.div_(s)
    if not bool(torch.isfinite(clf.weight).all() and torch.isfinite(clf.bias).all()):
        raise ValueError(f"the probe's fit at C={C:g} diverged (non-finite weights): features of magnitude "
                         f"{amax:.3g} are out of {str(x.dtype).removeprefix('torch.')}'s reach")
    return clf.requires_grad_(False)


@torch.no_grad()
def _score(clf: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """Top-1 accuracy (a row with non-finite features is a miss) and the mean cross-entropy."""
    with fp32_math():
        logits = clf(x)
        hit = (logits.argmax(1) == y) & finite_rows(x)
        return hit.float().mean().item(), F.cross_entropy(logits, y).item()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, val_features: Optional[torch.Tensor] = None,
                 val_labels: Optional[torch.Tensor] = None, val_fraction: float = 0.2,
                 Cs: Optional[Sequence[float]] = None, refine_steps: int = 4, max_iter: int = 1000,
                 refit: bool = True, device=None, seed: int = 0,
                 dtype: Optional[torch.dtype] = None) -> LinearProbeResult:
    """Fit a linear probe and report test accuracy.

    Features ``[N, D]`` (any float dtype; fit in ``dtype`` with autocast off), labels ``[N]`` ints in
    ``[0, C)``, those fitted on (training and validation) of at least 2 classes (ValueError
    otherwise: one class makes every prediction right); training and validation features must
    be finite, a test row with NaN/inf is a miss. Without ``val_features`` a random
    ``val_fraction`` (a number in (0, 1), default 0.2) of train, drawn with ``seed`` (an int >= 0,
    default 0), is held out for choosing ``C``; ``val_features`` and
    ``val_labels`` come together or not at all (ValueError otherwise).

    ``Cs``: the coarse grid of positive numbers (default ``10^-6, 10^-4, ..., 10^6``), in any
    order: it is sorted and deduplicated (values whose log10 differ by 10^-6 or less count as
    one), so the result does not depend on the order given. The best C has the highest
    validation accuracy, then the lowest validation loss, then is the smallest.
    ``refine_steps`` (an int >= 0, default 4; 0 disables): rounds of refinement, each trying the
    best C so far times ``10^(+-step)``, keeping the best and halving ``step``. The first
    ``step`` is half the smaller of the log10 gaps between the best grid value and its
    neighbours in the sorted grid (for an evenly spaced grid, half its spacing: the default
    grid's 4 rounds reach 1/8 decade), so a refinement never reaches past a neighbour, nor
    outside the grid's smallest and largest values; a grid of one value is not refined.
    ``max_iter`` (a positive int, default 1000): LBFGS iterations per fit. ``refit`` (a bool,
    default True): refit on train + val with the chosen C before testing. ``dtype``: that of
    the fits, ``torch.float32`` or ``torch.float64``; default float64 on the CPU, float32
    elsewhere (GPUs other than datacentre parts run float64 at 1/32-1/64 of float32's rate).
    float32 cannot resolve the objective's last digits where C is large: at C = 1e4 a float32
    fit on 100 rows stopped with one test probability 0.83 from scikit-learn's optimum (0.022
    on 80 of them, tests/eval/test_linear_probe.py), which float64 reaches; on the CPU
    float64 took 0.6-3.7x float32's time (N = 10000, D = 512, 100 classes, C = 0.1-1000).
    Near-separable data at C ~ 1e6 leaves the objective almost flat: there LBFGS can stop short
    of the optimum in float64 too (one test probability 0.9 off on 3 Gaussian classes, N = 100).
    Returns a ``LinearProbeResult``.
    """
    # Checked before any data is touched: these would otherwise be ignored silently
    # (val_labels alone, refine_steps < 0) or fit nothing (max_iter=0 scores chance).
    if val_labels is not None and val_features is None:
        raise ValueError("val_labels was given without val_features: pass both (a validation split) "
                         "or neither (val_fraction of the training set is held out)")
    max_iter = int_at_least(max_iter, "max_iter")
    refine_steps = int_at_least(refine_steps, "refine_steps", minimum=0)
    seed = int_at_least(seed, "seed", minimum=0)
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be a bool, got {type(refit).__name__} {refit!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.float64 or None (float64 on the CPU, "
                         f"float32 elsewhere), got {dtype!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real):
        raise TypeError(f"val_fraction must be a number in (0, 1), got {type(val_fraction).__name__} "
                        f"{val_fraction!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_features = as_features(train_features, "train_features")
    test_features = as_features(test_features, "test_features")
    if val_features is not None:
        val_features = as_features(val_features, "val_features")
    dev = torch.device(device) if device is not None else train_features.device
    dt = dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    xt, yt = train_features.to(dev, dt), class_indices(train_labels, "train_labels", device=dev)
    xs, ys = test_features.to(dev, dt), class_indices(test_labels, "test_labels", device=dev)
    if xt.dim() != 2 or xs.dim() != 2 or xt.shape[1] != xs.shape[1]:
        raise ValueError(f"train_features/test_features must be [N, D] with equal D, got "
                         f"{tuple(xt.shape)}, {tuple(xs.shape)}")
    if yt.shape != (xt.shape[0],) or ys.shape != (xs.shape[0],):
        raise ValueError(f"train_labels/test_labels must have one label per feature row, got "
                         f"{tuple(yt.shape)} for {xt.shape[0]} and {tuple(ys.shape)} for {xs.shape[0]} rows")
    if xt.shape[0] == 0:
        raise ValueError("train_features is empty: nothing to fit")
    if xs.shape[0] == 0:
        raise ValueError("test_features is empty: nothing to score")
    # Test rows with NaN/inf are misses (as in zero-shot); the fit cannot use them.
    bad = int((~finite_rows(xt)).sum())
    if bad:
        raise ValueError(f"train_features: {bad} of {xt.shape[0]} rows hold NaN or inf (a diverged model?); "
                         f"a probe cannot be fitted on them")
    if Cs is not None:
        try:
            Cs = list(Cs)       # read once: a generator was used up by the check below
        except TypeError:
            raise TypeError(f"Cs must be a sequence of positive numbers, got {type(Cs).__name__}") from None
        # Any real number type (NumPy's float32 is not a Python float), never a bool.
        if any(isinstance(c, bool) or not isinstance(c, numbers.Real) or not (c > 0 and math.isfinite(c))
               for c in Cs):
            raise ValueError(f"Cs must be finite positive numbers (inverse regularisation strengths), "
                             f"got {list(Cs)}")
        Cs = [float(c) for c in Cs]
    if val_features is None:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(xt.shape[0], generator=g).to(dev)
        if xt.shape[0] < 2:
            raise ValueError(f"at least 2 training samples are needed to hold out a validation split, got "
                             f"{xt.shape[0]} (or pass val_features)")
        nv = min(xt.shape[0] - 1, max(1, int(round(val_fraction * xt.shape[0]))))
        xv, yv, xt, yt = xt[perm[:nv]], yt[perm[:nv]], xt[perm[nv:]], yt[perm[nv:]]
    else:
        if val_labels is None:
            raise ValueError("val_labels is required with val_features")
        xv, yv = val_features.to(dev, dt), class_indices(val_labels, "val_labels", device=dev)
        if xv.dim() != 2 or xv.shape[1] != xt.shape[1]:
            raise ValueError(f"val_features must be [N, D={xt.shape[1]}], got {tuple(xv.shape)}")
        if not bool(torch.isfinite(xv).all()):
            raise ValueError("val_features hold NaN or inf (a diverged model?): C cannot be chosen on them")
    if xv.shape[0] == 0 or yv.shape != (xv.shape[0],):
        raise ValueError("val_features/val_labels must be [N, D] and [N] with N >= 1")
    fitted = torch.cat([yt, yv]).unique()
    if fitted.numel() < 2:
        # A classifier of one class is right on every test image of it: accuracy 100% whatever
        # the features, a number that says nothing about them.
        raise ValueError(f"train_labels{'/val_labels' if val_features is not None else ''} hold a single class "
                         f"({int(fitted[0])}): a probe needs at least 2 classes to tell apart")
    num_classes = int(max(yt.max(), yv.max(), ys.max()).item()) + 1

    tried = {}
    search: List[Tuple[float, float]] = []
    state = {"clf": None}

    def evaluate(log_c: float) -> Tuple[float, float]:
        key = round(log_c, 6)
        if key not in tried:
            state["clf"] = fit_logistic(xt, yt, num_classes, 10.0 ** log_c, max_iter, init=state["clf"])
            acc, loss = _score(state["clf"], xv, yv)
            tried[key] = (acc, -loss)
            search.append((10.0 ** log_c, acc))
        return tried[key]

    logs = sorted(math.log10(c) for c in (Cs if Cs is not None else [10.0 ** e for e in range(-6, 7, 2)]))
    if not logs or any(not math.isfinite(v) for v in logs):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    # Sorted and deduplicated, so that neither the order given nor a repeated value changes the
    # search: the step used to come from the first two entries as given.
    grid: List[float] = []
    for v in logs:
        if not grid or v - grid[-1] > 1e-6:   # within 1e-6 in log10: one C (``evaluate``'s key)
            grid.append(v)
    best = max(grid, key=evaluate)   # the first (smallest C) of equally good ones
    b = grid.index(best)
    gaps = [grid[j + 1] - grid[j] for j in (b - 1, b) if 0 <= j < len(grid) - 1]
    # Half the smaller neighbouring gap: the refinement stays between the best's neighbours on
    # an uneven grid, and is half the spacing on an even one.
    step = min(gaps) / 2 if gaps else 0.0
    # Within the grid's span: a best C at an edge is refined inwards only (the search went
    # past it: Cs=[0.1, 1, 10] chose 86.6, the default grid 7.5e-8 below its 1e-6).
    for _ in range(refine_steps if step else 0):
        best = max([c for c in (best - step, best, best + step) if grid[0] <= c <= grid[-1]], key=evaluate)
        step /= 2
    C = 10.0 ** best
    val_acc = tried[round(best, 6)][0]
    x_fit, y_fit = (torch.cat([xt, xv]), torch.cat([yt, yv])) if refit else (xt, yt)
    clf = fit_logistic(x_fit, y_fit, num_classes, C, max_iter)
    acc, _ = _score(clf, xs, ys)
    return LinearProbeResult(clf.float(), C, acc, val_acc, search)
