"""fastclip.loss.ClipLoss against open_clip's ClipLoss formula (single process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.loss import ClipLoss, SigLipLoss

from .ops._helpers import rel_err


def open_clip_loss(image_features, text_features, logit_scale):
    """open_clip's ClipLoss.forward at world_size=1, written out: logits both ways, two CEs."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _features(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (130, 33)])
@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, True)])
def test_values_and_gradients_equal_open_clip(n, d, local_loss, gather_with_grad):
    x, y = _features(n, d)
    log_scale = torch.tensor(2.659, dtype=torch.float64, requires_grad=True)
    ours = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)(x, y, log_scale.exp())
    g_ours = torch.autograd.grad(ours, (x, y, log_scale))
    ref = open_clip_loss(x, y, log_scale.exp())
    g_ref = torch.autograd.grad(ref, (x, y, log_scale))
    assert rel_err(ours, ref) <= 1e-12 or abs(ours.item() - ref.item()) <= 1e-12
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max().item() <= 1e-12 + 1e-10 * b.abs().max().item()


def test_fp32_matches_within_design_tolerance():
    x, y = _features(200, 64, dtype=torch.float32, seed=3)
    scale = torch.tensor(14.0, requires_grad=True)
    loss = ClipLoss()(x, y, scale)
    ref = open_clip_loss(x.detach().double(), y.detach().double(), 14.0)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5


def test_output_dict_and_logit_bias():
    x, y = _features(16, 8)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    out = ClipLoss()(x, y, 10.0, logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    plain = ClipLoss()(x, y, 10.0)
    # A constant added to every logit cancels in both softmaxes: same value, zero gradient.
    assert torch.allclose(out["contrastive_loss"], plain)
    out["contrastive_loss"].backward()
    assert bias.grad is not None and bias.grad.item() == 0.0
    # The unused bias is still checked as logit_scale is: another device is an error (the
    # loss came back on the bias's device), a CPU scalar follows the features.
    with pytest.raises(ValueError, match=r"logit_bias is on meta but the features are on cpu"):
        ClipLoss()(x, y, 10.0, logit_bias=torch.tensor(1.0, device="meta"))
    assert ClipLoss()(x, y, 10.0, logit_bias=torch.tensor([2.0])).device == x.device


def test_normalize_inside_the_kernel_equals_normalised_inputs():
    g = torch.Generator().manual_seed(1)
    raw_x, raw_y = torch.randn(40, 16, generator=g) * 3, torch.randn(40, 16, generator=g) * 0.2
    fused = ClipLoss(normalize=True)(raw_x, raw_y, 20.0)
    plain = ClipLoss()(F.normalize(raw_x, dim=-1), F.normalize(raw_y, dim=-1), 20.0)
    assert rel_err(fused, plain) <= 1e-6


def test_constructor_errors():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True, rank=0, world_size=2)
    # One process: open_clip reads neither the rank nor horovod, nor do we.
    x, y = _features(7, 4)
    for kw in ({"use_horovod": True}, {"rank": -1}, {"rank": 5, "world_size": 1}):
        assert torch.equal(ClipLoss(**kw)(x, y, 10.0), ClipLoss()(x, y, 10.0)), kw
        assert torch.equal(SigLipLoss(**{k: v for k, v in kw.items() if k != "use_horovod"})(
            x, y, 10.0, -10.0), SigLipLoss()(x, y, 10.0, -10.0)), kw
    with pytest.raises(ValueError, match="rank must be in"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="dist_impl"):
        ClipLoss(dist_impl="tree")


def test_world_size_without_process_group_is_a_clear_error():
    x, y = _features(4, 4)
    with pytest.raises((RuntimeError, ValueError), match="(?i)process group|init_process_group"):
        ClipLoss(rank=0, world_size=2)(x, y, 10.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_features_give_a_meta_loss_and_gradients(dtype):
    # Shape tracing and FLOP counting run a model on the meta device; open_clip's losses give a
    # meta loss there, so ours must too (the reference backend declares the meta device).
    n, d = 6, 5
    x = torch.empty(n, d, device="meta", dtype=dtype, requires_grad=True)
    y = torch.empty(n, d, device="meta", dtype=dtype, requires_grad=True)
    scale = torch.empty((), device="meta", requires_grad=True)
    bias = torch.empty((), device="meta", requires_grad=True)
    for loss in (ClipLoss()(x, y, scale), SigLipLoss()(x, y, scale, bias),
                 fastclip.clip_loss(x, y, 10.0, normalize=True)):
        assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
        loss.backward()
    assert x.grad.device.type == "meta" and x.grad.shape == (n, d) and x.grad.dtype == dtype
    assert y.grad.shape == (n, d) and scale.grad.shape == () and bias.grad.shape == ()
    assert fastclip.available_backends("meta") == ["reference"]
    # FLOP counting without data: the op's registered count, 8·N²·D for CLIP's two passes.
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
    with FlopCounterMode(display=False) as counter:
        ClipLoss()(x, y, scale).backward()
    assert counter.get_total_flops() == 8 * n * n * d
    with pytest.raises(fastclip.BackendUnavailableError, match="features are on meta"):
        fastclip.clip_loss(x, y, 10.0, backend="cpu")


def test_exported_names():
    assert fastclip.ClipLoss is ClipLoss
    assert callable(fastclip.clip_loss)


# ------------------------------------------------------------------------- SigLipLoss
def _open_clip(name: str):
    """open_clip's own class from its loss.py (not its __init__, which needs torchvision)."""
    from fastclip.bench.methods import load_open_clip
    cls, why = load_open_clip(name)
    if cls is None:
        pytest.skip(f"open_clip is not importable here ({why}); pip install open_clip_torch")
    return cls


@pytest.mark.parametrize("n,d", [(1, 3), (5, 8), (130, 33)])
@pytest.mark.parametrize("bias", [-10.0, 0.0, 3.0])
def test_siglip_values_and_gradients_equal_open_clip(n, d, bias):
    from fastclip.loss import SigLipLoss
    OpenSigLip = _open_clip("SigLipLoss")
    x, y = _features(n, d, seed=n + d)
    log_t = torch.tensor(2.302585, dtype=torch.float64, requires_grad=True)    # t = 10
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    ours = SigLipLoss()(x, y, log_t.exp(), b)
    g_ours = torch.autograd.grad(ours, (x, y, log_t, b))
    ref = OpenSigLip()(x, y, log_t.exp(), b)
    g_ref = torch.autograd.grad(ref, (x, y, log_t, b))
    assert rel_err(ours, ref) <= 1e-12
    for a, r in zip(g_ours, g_ref):
        assert rel_err(a, r) <= 1e-10


def test_siglip_fp32_and_output_dict():
    from fastclip.loss import SigLipLoss
    OpenSigLip = _open_clip("SigLipLoss")
    x, y = _features(200, 64, dtype=torch.float32, seed=3)
    t = torch.tensor(10.0, requires_grad=True)
    out = SigLipLoss()(x, y, t, -10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dtype == torch.float32
    ref = OpenSigLip()(x.detach().double(), y.detach().double(), torch.tensor(10.0,
                       dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    assert rel_err(out["contrastive_loss"], ref) <= 1e-5


def test_siglip_bias_none_is_no_bias():
    from fastclip.loss import SigLipLoss
    x, y = _features(12, 8)
    assert torch.allclose(SigLipLoss()(x, y, 10.0, None), SigLipLoss()(x, y, 10.0, 0.0))


def test_siglip_constructor():
    from fastclip.loss import SigLipLoss
    for impl in (None, "bidir", "shift", "reduce", "gather", "ring"):
        SigLipLoss(dist_impl=impl)
    assert SigLipLoss().dist_impl == "bidir"      # open_clip's default, kept as given
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="tree")
    with pytest.raises(ValueError, match="rank must be in"):
        SigLipLoss(rank=3, world_size=2)
    assert fastclip.SigLipLoss is SigLipLoss and callable(fastclip.siglip_loss)


# ------------------------------------------------------------- open_clip's helper methods
def test_clip_helpers_serve_open_clips_subclasses():
    # A subclass written against open_clip's ClipLoss (its DistillClipLoss: forward built on
    # get_logits and get_ground_truth), rebased on fastclip's ClipLoss, gives open_clip's
    # values and gradients.
    OpenDistill = _open_clip("DistillClipLoss")
    OpenClip = _open_clip("ClipLoss")
    Rebased = type("Rebased", (ClipLoss,), {"forward": OpenDistill.forward,
                                             "dist_loss": OpenDistill.dist_loss})
    x, y = _features(9, 6, seed=11)
    tx, ty = _features(9, 6, seed=12)
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    ours = Rebased(cache_labels=True)(x, y, s, tx, ty, 5.0)
    ref = OpenDistill(cache_labels=True)(x, y, s, tx, ty, 5.0)
    for a, r in zip(ours, ref):
        assert rel_err(a, r) <= 1e-12
    g_ours = torch.autograd.grad(sum(ours), (x, y, s))
    g_ref = torch.autograd.grad(sum(ref), (x, y, s))
    for a, r in zip(g_ours, g_ref):
        assert rel_err(a, r) <= 1e-10
    mine, theirs = ClipLoss(cache_labels=True), OpenClip(cache_labels=True)
    for k in (4, 4, 6):
        assert torch.equal(mine.get_ground_truth("cpu", k), theirs.get_ground_truth("cpu", k))
    assert mine.prev_num_logits == theirs.prev_num_logits == 6
    for a, r in zip(mine.get_logits(x, y, s, 0.5), theirs.get_logits(x, y, s, 0.5)):
        assert torch.allclose(a, r)


def test_siglip_helpers_equal_open_clips():
    from fastclip.loss import SigLipLoss
    OpenSigLip = _open_clip("SigLipLoss")
    x, y = _features(10, 7, seed=5)
    mine, theirs = SigLipLoss(), OpenSigLip()
    t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(mine.get_logits(x, y, t, b), theirs.get_logits(x, y, t, b))
    for neg in (False, True):
        assert torch.equal(mine.get_ground_truth("cpu", torch.float32, 5, negative_only=neg),
                           theirs.get_ground_truth("cpu", torch.float32, 5, negative_only=neg))
        # _loss: one block, the fused kernel (negative_only: another rank's texts).
        ours = mine._loss(x, y, t, b, negative_only=neg)
        ref = theirs._loss(x, y, t, b, negative_only=neg)
        assert rel_err(ours, ref) <= 1e-12, neg
        for a, r in zip(torch.autograd.grad(ours, (x, y, t, b)),
                        torch.autograd.grad(ref, (x, y, t, b))):
            assert rel_err(a, r) <= 1e-10, neg


def test_ranks_may_be_numpy_integers():
    import numpy as np

    from fastclip.loss import SigLipLoss
    assert ClipLoss(rank=np.int64(0), world_size=np.int32(1)).rank == 0
    assert SigLipLoss(rank=np.int64(1), world_size=np.int64(2)).world_size == 2
    with pytest.raises(ValueError, match=r"rank must be an int, got 0.0 \(float\)"):
        ClipLoss(rank=0.0, world_size=1)     # world size 1 keeps any int: no range named


def test_ranks_as_open_clip_takes_them_at_world_size_one():
    """open_clip never reads the rank of one process: rank=None and a 0-dim integer tensor
    were refused; a float or bool rank or world size still is."""
    from fastclip.loss import SigLipLoss
    for cls in (ClipLoss, SigLipLoss):
        assert cls(rank=None).rank == 0
        assert cls(rank=torch.tensor(0), world_size=torch.tensor(1)).world_size == 1
        with pytest.raises(ValueError, match="rank must be an int in"):
            cls(rank=None, world_size=2)
        with pytest.raises(ValueError, match="rank must be an int, got True"):
            cls(rank=True)
        with pytest.raises(ValueError, match="world_size must be a positive int"):
            cls(world_size=1.0)
        with pytest.raises(ValueError, match="world_size must be a positive int"):
            cls(world_size=torch.tensor(1.0))


# ------------------------------------------------------------------------- create_loss
def _train_args(**kw):
    """open_clip_train's argument namespace: the fields its create_loss reads, its defaults."""
    import argparse
    base = dict(distill=False, model="ViT-B-32", siglip=False, loss_dist_impl=None,
                local_loss=False, gather_with_grad=False, rank=0, world_size=1, horovod=False)
    return argparse.Namespace(**(base | kw))


def test_create_loss_builds_open_clips_choice():
    from fastclip.loss import SigLipLoss, create_loss
    clip = create_loss(_train_args(local_loss=True, gather_with_grad=True))
    assert type(clip) is ClipLoss and clip.cache_labels and clip.local_loss
    sig = create_loss(_train_args(siglip=True, loss_dist_impl="gather"))
    assert type(sig) is SigLipLoss and sig.fused_dist_impl == "gather"
    assert create_loss(_train_args(siglip=True)).dist_impl == "bidir"
    older = _train_args(siglip=True)      # an open_clip_train without --loss-dist-impl
    del older.loss_dist_impl
    assert type(create_loss(older)) is SigLipLoss
    x, y = _features(9, 5)
    assert torch.allclose(clip(x, y, 10.0), ClipLoss()(x, y, 10.0))
    with pytest.raises(ValueError, match="horovod"):
        create_loss(_train_args(horovod=True, world_size=2))
    with pytest.raises(ValueError, match="horovod"):
        create_loss(_train_args(siglip=True, horovod=True, world_size=2))
    assert type(create_loss(_train_args(horovod=True))) is ClipLoss       # one process
    with pytest.raises(ValueError, match="rank must be in"):
        create_loss(_train_args(rank=2, world_size=2))


@pytest.mark.parametrize("kw,what", [({"distill": True}, "DistillClipLoss"),
                                     ({"model": "coca_ViT-B-32"}, "CoCaLoss")])
def test_create_loss_hands_unfused_losses_to_open_clip(monkeypatch, kw, what):
    import sys
    import types

    from fastclip.loss import create_loss
    seen = []
    fake = types.ModuleType("open_clip")
    fake.create_loss = lambda args: seen.append(args) or what
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    args = _train_args(**kw)
    with pytest.warns(UserWarning, match=f"open_clip's own {what}"):
        assert create_loss(args) == what
    assert seen == [args]
    monkeypatch.setitem(sys.modules, "open_clip", None)      # open_clip not importable
    with pytest.raises(ImportError, match=f"open_clip's {what}, which fastclip does not fuse"):
        create_loss(args)


def test_constructor_and_bias_arguments_are_checked_where_they_are_given():
    """normalize/eps/backend were checked only at the first training step; a ClipLoss bias
    that was not a grad-requiring tensor was dropped unchecked (an [N, N] bias gave 4.9 where
    open_clip gives 105, a NaN bias a finite loss); SigLipLoss(dist_impl=[...]) raised
    "unhashable type"."""
    for kw, exc, msg in (({"normalize": "yes"}, TypeError, "normalize must be a bool"),
                         ({"eps": 0.0}, ValueError, "eps must be a finite positive float"),
                         ({"backend": "nope"}, ValueError, "backend='nope' is not a fastclip backend"),
                         ({"backend": None}, TypeError, "backend must be a backend name")):
        for cls in (ClipLoss, SigLipLoss):
            with pytest.raises(exc, match=msg):
                cls(**kw)
    with pytest.raises(ValueError, match=r"dist_impl must be one of .* got \['bidir'\]"):
        SigLipLoss(dist_impl=["bidir"])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    base = ClipLoss()(x, y, 10.0)
    assert ClipLoss()(x, y, 10.0, logit_bias=-3.0) == base
    assert ClipLoss()(x, y, 10.0, logit_bias=torch.tensor([2.0])) == base
    assert ClipLoss()(x, y, 10.0, logit_bias=torch.tensor(2)) == base    # as the scale
    with pytest.raises(ValueError, match=r"logit_bias must be a float .* torch.bool"):
        ClipLoss()(x, y, 10.0, logit_bias=torch.tensor(True))
    assert torch.isnan(ClipLoss()(x, y, 10.0, logit_bias=float("nan")))
    with pytest.raises(ValueError, match=r"logit_bias must be a float .* shape \(4, 4\)"):
        ClipLoss()(x, y, 10.0, logit_bias=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="logit_bias must be a float"):
        ClipLoss()(x, y, 10.0, logit_bias="oops")


def test_clip_loss_bias_is_checked_before_the_kernel(monkeypatch):
    # A sparse bias gets the argument's name, not torch's "reshape is not implemented for
    # sparse tensors"; and a bad bias is refused before the fused loss runs.
    import fastclip.loss as fl
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match=r"logit_bias must be a dense \(strided\) tensor, got a "
                                        r"sparse_coo tensor"):
        ClipLoss()(x, y, 10.0, logit_bias=torch.tensor([1.0]).to_sparse())

    def ran(*a, **k):
        raise AssertionError("the fused loss ran before the bias was checked")
    monkeypatch.setattr(fl, "fused_loss", ran)
    with pytest.raises(ValueError, match=r"logit_bias must be a float .* shape \(5, 5\)"):
        ClipLoss()(x, y, 10.0, logit_bias=torch.zeros(5, 5))


def test_create_loss_wants_the_argument_namespace():
    from fastclip.loss import create_loss
    for bad in (None, {"siglip": True}):
        with pytest.raises(TypeError, match="args must be open_clip_train's argument namespace"):
            create_loss(bad)


def test_a_bad_backend_in_the_environment_is_named_as_such(monkeypatch):
    import fastclip
    monkeypatch.setenv("FASTCLIP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTCLIP_BACKEND='nonsense' .*backend='auto' honours it"):
        fastclip.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 10.0)
