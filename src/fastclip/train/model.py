"""The run's model (``fastclip train``): built from ``--model`` and ``--model-overrides``, or
read from ``--pretrained`` and fitted to the run's loss."""
from __future__ import annotations

import dataclasses

from . import checkpoint as ckpt
from .config import TrainConfig, model_kwargs


def batchnorm_batch_problem(model, batch_size: int, accum_micro_batch) -> str:
    """Why a training batch of ``batch_size`` (micro-batches of ``accum_micro_batch``) cannot train
    ``model``'s BatchNorm layers, or "". A batch of one is skipped by the trainer whatever the
    image size (BatchNorm in training takes two); a micro-batch of one works where the last
    ResNet stage is larger than 1x1 (image_size >= 64: 49 values per channel at 224), and fails
    where it is 1x1 (the demo's 32 px)."""
    if not model.has_batchnorm:
        return ""
    if batch_size == 1:
        return ("has BatchNorm layers (a ResNet tower), which need at least 2 images per batch in training; "
                "use 2 or more")
    if accum_micro_batch == 1 and model.config.image_size // 32 <= 1:
        return (f"has BatchNorm layers (a ResNet tower) whose last stage is 1x1 at image_size "
                f"{model.config.image_size}: they need at least 2 images per forward pass in training; use 2 or more")
    return ""


def build_model(cfg: TrainConfig):
    """The run's model, in training mode on the CPU: ``cfg.model`` with ``model_kwargs``, or the
    weights of ``cfg.pretrained`` (its own architecture; ``cfg.model_overrides`` may set only
    what no weight records, ``load_model``'s ``architecture``). The sigmoid loss gives a pretrained
    model without a ``logit_bias`` one at the loss's initial value, its scale kept; a model with a
    bias is refused for a loss without one (it would be dropped). Raises ``CheckpointError``
    naming the file when it cannot be used."""
    from ..models import CLIP, create_model
    if cfg.pretrained is None:
        model = create_model(cfg.model, **model_kwargs(cfg.loss, cfg.model_overrides))
        why = batchnorm_batch_problem(model, cfg.batch_size, cfg.accum_micro_batch)
        if why:
            # as the CLI refuses it: every batch of one image was skipped, and the trainer drew
            # batches until it gave up with a message about the data
            name = "batch_size" if cfg.batch_size == 1 else "accum_micro_batch"
            raise ValueError(f"TrainConfig.{name} 1: model {cfg.model!r} {why}")
        return model
    from ..eval.evaluate import check_vocab, load_model
    from ..ops.losses import get_loss
    try:
        model = load_model(cfg.pretrained, "cpu", architecture=cfg.model_overrides)
        check_vocab(model, cfg.pretrained)
    except ValueError as e:
        raise ckpt.CheckpointError(f"--pretrained: {e}") from None
    why = batchnorm_batch_problem(model, cfg.batch_size, cfg.accum_micro_batch)
    if why:
        per_forward = min(cfg.batch_size, cfg.accum_micro_batch or cfg.batch_size)
        raise ckpt.CheckpointError(f"--pretrained {cfg.pretrained}: the model {why} "
                                   f"(--batch-size/--accum-micro-batch {per_forward})")
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


__all__ = ["batchnorm_batch_problem", "build_model"]
