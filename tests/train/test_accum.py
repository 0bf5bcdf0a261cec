"""Micro-batched large batches (``accum_micro_batch``): the same loss and parameter gradients as
one pass over the whole batch."""
import pytest
import torch

from fastclip.train import TrainConfig, Trainer


def _grads(trainer, images, tokens):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.forward_backward(images, tokens)
    return loss, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("micro", [5, 8])
def test_micro_batch_gradients_equal_full_batch(tmp_path, micro):
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-vit", output=str(tmp_path), steps=1, batch_size=16, demo_train_samples=64,
                      progress="none", plot=False)
    t = Trainer(cfg)
    # a partly trained model (less symmetric gradients than at initialisation)
    images, tokens, _ = next(t._train_batches())
    t.forward_backward(images, tokens)
    t.optimizer_step()
    loss_full, g_full = _grads(t, images, tokens)
    t.cfg.accum_micro_batch = micro
    loss_micro, g_micro = _grads(t, images, tokens)
    assert torch.allclose(loss_full, loss_micro, rtol=1e-6, atol=0)
    assert g_full.keys() == g_micro.keys()
    for name in g_full:
        a, b = g_micro[name].double(), g_full[name].double()
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 2e-5, f"{name}: relative gradient error {err:.2e}"
    assert g_full["logit_scale"].abs().item() > 0


def test_batchnorm_towers_take_micro_batches(tmp_path):
    # A ResNet tower: 9 samples in micro-batches of 4 would leave a lone sample, which
    # BatchNorm refuses in training; it joins the micro-batch before (4 + 5). The running
    # statistics are updated once per micro-batch (by the re-run), not twice.
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-rn", output=str(tmp_path), steps=1, batch_size=9, demo_train_samples=64,
                      progress="none", plot=False, accum_micro_batch=4)
    t = Trainer(cfg)
    bns = [m for m in t.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and t.min_batch == 2
    images, tokens, _ = next(t._train_batches())
    assert images.shape[0] == 9
    before = [int(m.num_batches_tracked) for m in bns]
    loss = t.forward_backward(images, tokens)
    assert torch.isfinite(loss)
    assert [int(m.num_batches_tracked) - b for m, b in zip(bns, before)] == [2] * len(bns)


def test_a_short_batch_takes_the_micro_batch_path_of_its_peers(tmp_path, monkeypatch):
    """The path was chosen by this batch's size: a rank whose batch lost samples to unreadable
    images (k or fewer left) went through DDP's forward while its peers, micro-batching, waited
    in the loss's collective: a hang. Every batch now takes the path of the configured size."""
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-vit", output=str(tmp_path), steps=1, batch_size=8, demo_train_samples=64,
                      progress="none", plot=False, accum_micro_batch=4)
    t = Trainer(cfg)
    images, tokens, _ = next(t._train_batches())
    calls = []
    micro = Trainer._forward_backward_micro
    monkeypatch.setattr(Trainer, "_forward_backward_micro",
                        lambda self, i, tk, k: calls.append(i.shape[0]) or micro(self, i, tk, k))
    for n in (3, 4, 8):
        assert torch.isfinite(t.forward_backward(images[:n], tokens[:n]))
    assert calls == [3, 4, 8]
