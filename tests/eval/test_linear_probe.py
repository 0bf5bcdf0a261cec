"""Linear probe on synthetic problems with known answers."""
import math

import numpy as np
import pytest
import torch

from fastclip.eval.linear_probe import fit_logistic, linear_probe


def _blobs(n, d=8, k=4, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def test_separable_blobs_near_perfect():
    x, y = _blobs(600)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], refine_steps=2)
    assert res.accuracy >= 0.97 and res.val_accuracy >= 0.95
    assert 1e-6 <= res.C <= 1e6 and len(res.search) >= 7
    assert res.classifier.weight.shape == (4, 8)


def test_label_noise_features_are_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 5, generator=g), torch.randint(0, 2, (400,), generator=g)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:], refine_steps=0)
    assert 0.3 < res.accuracy < 0.7


def test_matches_sklearn_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(300, d=6, k=3, sep=1.0, seed=3)
    for C in (0.01, 1.0):
        clf = fit_logistic(x.double(), y, 3, C)
        ref = sklearn.LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x.numpy().astype(np.float64), y.numpy())
        p = torch.softmax(clf(x.double()), 1).numpy()
        np.testing.assert_allclose(p, ref.predict_proba(x.numpy().astype(np.float64)), atol=2e-4)


def test_explicit_validation_split_and_errors():
    x, y = _blobs(300, seed=5)
    res = linear_probe(x[:150], y[:150], x[250:], y[250:], val_features=x[150:250], val_labels=y[150:250],
                       Cs=[0.1, 10.0], refine_steps=1)
    assert res.accuracy > 0.9 and [c for c, _ in res.search][:2] == pytest.approx([0.1, 10.0])
    with pytest.raises(ValueError, match="val_labels"):
        linear_probe(x, y, x, y, val_features=x)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, val_fraction=1.5)


def test_bad_probe_inputs_are_clear_errors():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.arange(20) % 2
    for kw, exc, msg in (({"Cs": [0, 1]}, ValueError, "Cs must be finite positive"),
                         ({"Cs": [-1.0]}, ValueError, "Cs must be finite positive")):
        with pytest.raises(exc, match=msg):
            linear_probe(x, y, x, y, **kw)
    with pytest.raises(TypeError, match="train_labels must be integer"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match=r"test_labels must be class indices in \[0, inf\)"):
        linear_probe(x, y, x, -y)
    with pytest.raises(ValueError, match="train_features is empty"):
        linear_probe(x[:0], y[:0], x, y, val_features=x, val_labels=y)
    with pytest.raises(ValueError, match="test_features is empty"):
        linear_probe(x, y, x[:0], y[:0])
    with pytest.raises(ValueError, match="at least 2 training samples"):
        linear_probe(x[:1], y[:1], x, y)


def test_non_finite_features_are_an_error_to_fit_and_a_miss_to_score():
    """A diverged model's NaN features: fitting on them is a ValueError naming them (LBFGS used to
    die with "value cannot be converted to type float"); a NaN test row is a miss, not whatever
    argmax picks among NaNs (class 0)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 4, generator=g) + 3 * y[:, None].float()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train_features: 1 of 40 rows hold NaN or inf"):
        linear_probe(bad, y, x, y)
    with pytest.raises(ValueError, match="val_features hold NaN"):
        linear_probe(x, y, x, y, val_features=bad, val_labels=y)
    ones = linear_probe(x, y, x[y == 1], y[y == 1]).accuracy   # the same fit, scored on class 1
    xs = x.clone()
    xs[y == 0] = float("nan")                  # every class-0 test row: a miss
    assert linear_probe(x, y, xs, y).accuracy == pytest.approx(0.5 * ones)


def test_linear_probe_fits_in_fp32_inside_a_callers_autocast():
    """linear_probe itself turns autocast off (the fit in bf16 chose C=1e-8 and landed at chance)."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 32, generator=g)
    y = torch.arange(200) % 4
    x = centers[y] + 1.5 * torch.randn(200, 32, generator=g)
    ref = linear_probe(x[:120], y[:120], x[120:], y[120:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_probe(x[:120], y[:120], x[120:], y[120:])
    assert got.classifier.weight.dtype == torch.float32
    assert got.C == ref.C and got.accuracy == ref.accuracy


def test_numpy_inputs_and_string_labels():
    # NumPy features and NumPy numbers in Cs are what a scikit-learn user passes; string labels
    # are a clear TypeError that says what to do, not "too many dimensions 'str'".
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.arange(40) % 2
    x[:, 0] += 4 * y
    ref = linear_probe(x, y, x, y, Cs=[1.0], refine_steps=0)
    got = linear_probe(x.numpy(), y.numpy(), x.numpy(), y.numpy(), Cs=[np.float32(1.0)], refine_steps=0)
    assert got.accuracy == ref.accuracy and got.C == ref.C
    with pytest.raises(TypeError, match="train_labels must be integer class indices.*'cat'.*indices first"):
        linear_probe(x, ["cat", "dog"] * 20, x, y)
    with pytest.raises(TypeError, match="test_features must be a tensor"):
        linear_probe(x, y, "features", y)
    with pytest.raises(ValueError, match="Cs must be finite positive"):
        linear_probe(x, y, x, y, Cs=[True])


def test_a_single_class_is_refused():
    """With one class every test prediction is right: accuracy 1.0 whatever the features."""
    x, y = _blobs(40, k=2)
    with pytest.raises(ValueError, match=r"train_labels hold a single class \(0\): a probe needs at least 2"):
        linear_probe(x, torch.zeros(40, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match=r"train_labels/val_labels hold a single class \(1\)"):
        linear_probe(x[:20], torch.ones(20, dtype=torch.long), x, y, val_features=x[20:],
                     val_labels=torch.ones(20, dtype=torch.long))
    # One class in the training part, the other in the validation part: two classes fitted.
    yy = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    assert 0 <= linear_probe(x[:20], yy[:20], x, y, val_features=x[20:], val_labels=yy[20:]).accuracy <= 1


def test_the_grid_is_sorted_and_deduplicated_before_refining():
    """The refinement step came from the first two entries as given: [0.01, 1, 100] and
    [100, 0.01, 1] searched differently."""
    x, y = _blobs(200, k=3, sep=1.5, seed=2)
    a = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=[0.01, 1, 100], refine_steps=2)
    b = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=[100, 0.01, 1, 1.0, np.float64(100)], refine_steps=2)
    assert [c for c, _ in a.search][:3] == pytest.approx([0.01, 1, 100])
    assert a.search == b.search and a.C == b.C and a.accuracy == b.accuracy


def test_an_uneven_grid_refines_by_half_the_nearer_gap():
    """On the sorted grid log10 C = -1, 2, 3, 6 the first step is half the smaller gap beside the
    best value (1.5 at -1 or 6, 0.5 at 2 or 3), not one taken from the order the grid came in."""
    x, y = _blobs(200, k=3, sep=1.5, seed=2)
    res = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=[1e3, 1e-1, 1e2, 1e6], refine_steps=1)
    logs = [math.log10(c) for c, _ in res.search]
    assert logs[:4] == pytest.approx([-1, 2, 3, 6]) and len(logs) == 6
    lo, hi = sorted(logs[4:])
    best, step = (lo + hi) / 2, (hi - lo) / 2
    grid = [-1, 2, 3, 6]
    k = min(range(4), key=lambda j: abs(grid[j] - best))
    assert best == pytest.approx(grid[k])
    gaps = [grid[j + 1] - grid[j] for j in (k - 1, k) if 0 <= j < 3]
    assert step == pytest.approx(min(gaps) / 2)


def test_invalid_probe_arguments_are_refused():
    """val_labels without val_features was ignored, max_iter=0 fitted nothing (chance accuracy)
    and refine_steps=-1 was taken as 0."""
    x, y = _blobs(60, k=2)
    with pytest.raises(ValueError, match="val_labels was given without val_features"):
        linear_probe(x, y, x, y, val_labels=y)
    with pytest.raises(ValueError, match="max_iter must be a positive int, got 0"):
        linear_probe(x, y, x, y, max_iter=0)
    with pytest.raises(TypeError, match="max_iter must be a positive int, got float 10.0"):
        linear_probe(x, y, x, y, max_iter=10.0)
    with pytest.raises(ValueError, match="refine_steps must be an int >= 0, got -1"):
        linear_probe(x, y, x, y, refine_steps=-1)
    with pytest.raises(TypeError, match="refine_steps must be an int >= 0, got bool True"):
        linear_probe(x, y, x, y, refine_steps=True)
    with pytest.raises(ValueError, match="max_iter must be a positive int, got 0"):
        fit_logistic(x, y, 2, 1.0, max_iter=0)
    # torch's words ("manual_seed expected a long", "'<' not supported") named neither
    for kw, kind, text in ((dict(seed=0.5), TypeError, "seed must be an int >= 0, got float 0.5"),
                           (dict(seed=None), TypeError, "seed must be an int >= 0, got NoneType None"),
                           (dict(val_fraction="0.2"), TypeError, r"val_fraction must be a number in \(0, 1\), got str"),
                           (dict(val_fraction=1.0), ValueError, "val_fraction must be in \\(0, 1\\), got 1.0")):
        with pytest.raises(kind, match=text):
            linear_probe(x, y, x, y, **kw)
    assert linear_probe(x, y, x, y, Cs=[1.0], refine_steps=0, max_iter=np.int64(50)).accuracy > 0.9


def test_two_classes_match_sklearn_at_the_same_C():
    """scikit-learn fits one weight vector for two classes: our C was its 2C (probabilities
    0.07 apart at C = 1) until the softmax's two vectors took a doubled penalty."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(240, d=5, k=2, sep=1.0, seed=11)
    x64 = x.numpy().astype(np.float64)
    for C in (0.1, 1.0):
        clf = fit_logistic(x.double(), y, 2, C)
        ref = sklearn.LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x64, y.numpy())
        p = torch.softmax(clf(x.double()), 1).numpy()
        np.testing.assert_allclose(p, ref.predict_proba(x64), atol=2e-4)


def test_features_that_carry_the_models_graph_leave_the_model_alone():
    """Features straight from a model's forward (no no_grad): the fit backpropagated into the
    model (its .grad filled), then failed with autograd's "backward through the graph a second
    time"."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(6, 8)
    x, y = _blobs(120, d=6, k=3, seed=2)
    feats = enc(x)
    assert feats.requires_grad
    res = linear_probe(feats[:80], y[:80], feats[80:], y[80:], Cs=[1.0], refine_steps=0)
    assert 0 <= res.accuracy <= 1
    assert enc.weight.grad is None and enc.bias.grad is None
    leaf = x.clone().requires_grad_(True)
    linear_probe(leaf[:80], y[:80], leaf[80:], y[80:], Cs=[1.0], refine_steps=0)
    assert leaf.grad is None


def test_probe_fits_inside_inference_mode():
    """The usual evaluation context: the fit's backward raised "element 0 of tensors does not
    require grad" (enable_grad does not lift inference_mode)."""
    x, y = _blobs(200, seed=4)
    ref = linear_probe(x[:150], y[:150], x[150:], y[150:], Cs=[0.1, 10.0], refine_steps=1)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        got = linear_probe(xi[:150], yi[:150], xi[150:], yi[150:], Cs=[0.1, 10.0], refine_steps=1)
    assert got.C == ref.C and got.accuracy == ref.accuracy
    assert torch.equal(got.classifier.weight, ref.classifier.weight)


def test_refinement_stays_inside_the_grid_and_cs_may_be_a_generator():
    """A best C at the grid's edge was refined outwards (Cs=[0.1, 1, 10] chose 86.6), and a
    generator for Cs was used up by its check ("got []")."""
    x, y = _blobs(200, k=3, sep=4.0, seed=int(torch.randint(0, 2**31, (1,))))
    for grid in ([0.1, 1, 10], [1e-6, 1e-5]):
        res = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=grid, refine_steps=4)
        assert all(grid[0] * (1 - 1e-9) <= c <= grid[-1] * (1 + 1e-9) for c, _ in res.search), res.search
        assert grid[0] * (1 - 1e-9) <= res.C <= grid[-1] * (1 + 1e-9)
    gen = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=(c for c in [0.1, 1, 10]), refine_steps=1)
    lst = linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=[0.1, 1, 10], refine_steps=1)
    assert gen.search == lst.search and gen.C == lst.C
    with pytest.raises(TypeError, match="Cs must be a sequence of positive numbers, got float"):
        linear_probe(x[:120], y[:120], x[120:], y[120:], Cs=1.0)


def test_large_finite_features_fit_the_same_objective():
    """Features of 1e12 overflowed LBFGS's fp32 step (a RuntimeError from inside torch), those
    of 1e20 gave NaN weights at chance accuracy. Scaling features by s and C by 1 / s^2 is the
    same problem (logits W x, penalty ||W||^2 / 2C, in W' = W / s): the same probabilities,
    judged in float64 at a tight tolerance (LBFGS's stopping point in fp32 alone moves them by
    up to 4e-4; in float64 the scaled fits were within 3.4e-5 of the unscaled one)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = ((x[:, 0] + 0.8 * torch.randn(200, generator=g, dtype=torch.float64)) > 0).long() \
        + 2 * (x[:, 1] > 0.3).long()                                                   # 4 noisy classes
    ref = torch.softmax(fit_logistic(x, y, 4, 1.0, max_iter=5000, tol=1e-12)(x), 1)
    for scale in (1e6, 1e12, 1e20):
        clf = fit_logistic(x * scale, y, 4, 1.0 / scale ** 2, max_iter=5000, tol=1e-12)
        torch.testing.assert_close(torch.softmax(clf(x * scale), 1), ref, atol=1e-4, rtol=0)
        x32 = (x * scale).float()            # fp32, as linear_probe fits: finite, the same predictions
        clf32 = fit_logistic(x32, y, 4, 1.0 / scale ** 2)
        assert torch.isfinite(clf32.weight).all()
        assert (clf32(x32).argmax(1) != ref.argmax(1)).sum() <= 2
    r = linear_probe((x * 1e12).float(), y, (x * 1e12).float(), y)
    assert r.accuracy > 0.6 and math.isfinite(r.C)


def test_large_C_reaches_sklearns_optimum_on_the_cpu(monkeypatch):
    """In float32 a fit at C = 1e4 stopped where the objective's last digits no longer moved:
    one test probability 0.83 from scikit-learn's optimum (3 Gaussian classes, N = 100; 0.022
    on the 80 rows the split below keeps). On the CPU linear_probe fits in float64 by default
    and reaches it; float32 stays on request (and stops where it did)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    for _ in range(3):     # the third draw is the one float32 missed
        means = rng.normal(size=(3, 6))
        y = rng.integers(0, 3, 150)
        x = (means[y] + rng.normal(size=(150, 6))).astype(np.float32)
    r = linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=[1e4], refine_steps=0, refit=False)
    # refit=False: the classifier is the one fitted on the training part of the split
    g = torch.Generator().manual_seed(0)
    nv = round(0.2 * 100)
    keep = torch.randperm(100, generator=g)[nv:].numpy()
    ref = sklearn.LogisticRegression(C=1e4, max_iter=100000, tol=1e-12).fit(x[keep].astype(np.float64), y[keep])
    assert r.classifier.weight.dtype == torch.float32
    got = torch.softmax(r.classifier.double()(torch.tensor(x[100:]).double()), 1).numpy()
    np.testing.assert_allclose(got, ref.predict_proba(x[100:].astype(np.float64)), atol=2e-3, rtol=0)
    import importlib
    lp = importlib.import_module("fastclip.eval.linear_probe")   # (fastclip.eval.linear_probe: the function)
    seen, real = [], lp.fit_logistic
    monkeypatch.setattr(lp, "fit_logistic", lambda x, *a, **k: seen.append(x.dtype) or real(x, *a, **k))
    lp.linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=[1e4], refine_steps=0, dtype=torch.float32)
    lp.linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=[1e4], refine_steps=0)
    assert seen == [torch.float32] * 2 + [torch.float64] * 2    # (the search's fit, the refit)


def test_probe_flags_and_fit_logistic_arguments_are_checked():
    """refit="no" refitted (its truthiness was read); fit_logistic's C=nan and a num_classes
    below the labels failed inside torch with messages naming neither."""
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(TypeError, match="refit must be a bool, got str 'no'"):
        linear_probe(x, y, x, y, refit="no")
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.float64 or None"):
        linear_probe(x, y, x, y, dtype=torch.float16)
    for C, err in ((float("nan"), ValueError), (0.0, ValueError), (float("inf"), ValueError),
                   ("1", TypeError), (None, TypeError), (True, TypeError)):
        with pytest.raises(err, match="C must be a finite positive number"):
            fit_logistic(x, y, 2, C)
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, num_classes=1\), got values from 0 to 1"):
        fit_logistic(x, y, 1, 1.0)
    with pytest.raises(TypeError, match="num_classes must be a positive int"):
        fit_logistic(x, y, 2.0, 1.0)
    with pytest.raises(ValueError, match=r"x must be \[N, D\] with N >= 1 and y \[N\], got \(0, 3\)"):
        fit_logistic(x[:0], y[:0], 2, 1.0)      # (a ZeroDivisionError from the penalty's 1 / N)
    with pytest.raises(ValueError, match=r"got \(20, 3\) and \(19,\)"):
        fit_logistic(x, y[:19], 2, 1.0)
