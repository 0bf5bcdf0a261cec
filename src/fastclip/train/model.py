"""The run's model (``fastclip train``): built from ``--model`` and ``--model-overrides``, or
read from ``--pretrained`` and fitted to the run's loss."""
from __future__ import annotations

import dataclasses

from . import checkpoint as ckpt
from .config import TrainConfig, model_kwargs


def build_model(cfg: TrainConfig):
    """The run's model, in training mode on the CPU: ``cfg.model`` with ``model_kwargs``, or the
    weights of ``cfg.pretrained`` (its own architecture; ``cfg.model_overrides`` may set only
    what no weight records, ``load_model``'s ``architecture``). The sigmoid loss gives a pretrained
    model without a ``logit_bias`` one at the loss's initial value, its scale kept; a model with a
    bias is refused for a loss without one (it would be dropped). Raises ``CheckpointError``
    naming the file when it cannot be used."""
    from ..models import CLIP, create_model
    per_forward = min(cfg.batch_size, cfg.accum_micro_batch or cfg.batch_size)
    if cfg.pretrained is None:
        model = create_model(cfg.model, **model_kwargs(cfg.loss, cfg.model_overrides))
        if model.has_batchnorm and per_forward < 2:
            # as the CLI refuses it: every batch of one image was skipped, and the trainer drew
            # batches until it gave up with a message about the data
            name = "accum_micro_batch" if cfg.accum_micro_batch == 1 else "batch_size"
            raise ValueError(f"TrainConfig.{name} 1: model {cfg.model!r} has BatchNorm layers (a ResNet tower), "
                             f"which need at least 2 images per forward pass in training; use 2 or more")
        return model
    from ..eval.evaluate import check_vocab, load_model
    from ..ops.losses import get_loss
    try:
        model = load_model(cfg.pretrained, "cpu", architecture=cfg.model_overrides)
        check_vocab(model, cfg.pretrained)
    except ValueError as e:
        raise ckpt.CheckpointError(f"--pretrained: {e}") from None
    if model.has_batchnorm and per_forward < 2:
        raise ckpt.CheckpointError(f"--pretrained {cfg.pretrained}: the model has BatchNorm layers (a ResNet "
                                   f"tower), which need at least 2 images per forward pass in training; "
                                   f"--batch-size/--accum-micro-batch {per_forward} is too small")
    spec = get_loss(cfg.loss)
    if "logit_bias" in spec.params and model.logit_bias is None:
        bias = spec.init[spec.params.index("logit_bias")]
        with_bias = CLIP(dataclasses.replace(model.config, init_logit_bias=bias))
        missing, unexpected = with_bias.load_state_dict(model.state_dict(), strict=False)
        assert missing == ["logit_bias"] and not unexpected, (missing, unexpected)
        model = with_bias
    elif "logit_bias" not in spec.params and model.logit_bias is not None:
        raise ckpt.CheckpointError(f"--pretrained {cfg.pretrained}: the model has a logit_bias (it was trained "
                                   f"with the sigmoid loss), which the {cfg.loss} loss does not use: fine-tune it "
                                   f"with --loss siglip")
    return model.train()


__all__ = ["build_model"]
