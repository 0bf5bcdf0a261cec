"""The CLIP model: an image encoder (ViT or ModifiedResNet) and a causal text transformer."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .configs import CLIPConfig
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vit import VisionTransformer


class CLIP(TextTransformer):
    """CLIP with OpenAI's parameter names (``visual.*``, ``transformer.*``, ``token_embedding``,
    ``positional_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``).

    ``config``: the ``CLIPConfig`` it was built from. ``logit_scale`` (a log) is initialised to
    ``ln(config.init_logit_scale)``: ``ln(1/0.07)`` by default. With ``config.init_logit_bias``
    set (SigLIP) the model also has a learnable ``logit_bias``, returned as a fourth output.
    """

    def __init__(self, config: CLIPConfig):
        c = config
        super().__init__(c.context_length, c.vocab_size, c.text_width, c.text_num_heads, c.text_layers, c.embed_dim,
                         c.quick_gelu, c.text_mlp_width, c.text_eos_id)
        self.config = c
        if c.is_resnet:
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.vision_num_heads, c.image_size, c.vision_width)
        else:
            self.visual = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                            c.vision_num_heads, c.embed_dim, c.quick_gelu, c.vision_mlp_width)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(c.init_logit_scale))
        self.logit_bias = (nn.Parameter(torch.ones([]) * float(c.init_logit_bias))
                           if c.init_logit_bias is not None else None)
        if not any(p.is_meta for p in self.parameters()):
            self._openai_init()   # on top of what each layer's constructor drew

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def has_batchnorm(self) -> bool:
        """Whether a tower normalises by batch statistics (the ResNets): a training forward
        then needs at least two samples."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def init_weights(self) -> None:
        """Re-draw every weight and buffer as a freshly built model has them: each layer's
        PyTorch default (Linear, Conv2d, LayerNorm, Embedding; BatchNorm with its running
        statistics), the towers' embeddings and projections, then OpenAI's scheme on top, and
        the logit scale (and bias) from the config. Also what a model built on the meta device
        needs after ``to_empty``."""
        with torch.no_grad():
            for m in self.modules():
                if m is not self and callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()      # BatchNorm's also resets its running statistics
            self.visual.reset_embeddings()
        self._openai_init()

    def _openai_init(self) -> None:
        """OpenAI's initialisation scheme (the towers' ``init_weights``), the logit scale and bias."""
        super().init_weights()
        self.visual.init_weights()
        with torch.no_grad():
            self.logit_scale.fill_(math.log(self.config.init_logit_scale))
            if self.logit_bias is not None:
                self.logit_bias.fill_(float(self.config.init_logit_bias))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks (text and ViT) in backward to save memory."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float -> unnormalised ``[B, embed_dim]`` in the model dtype."""
        return self.visual(image)

    # encode_text is inherited: LongTensor [B, L] -> unnormalised [B, embed_dim]

    def forward(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor], normalize: bool = True
                ) -> Tuple[Optional[torch.Tensor], ...]:
        """Returns ``(image_features [B, D], text_features [B, D], logit_scale.exp().clamp(max=100))``,
        and ``logit_bias`` as a fourth element when the model has one (SigLIP), as open_clip's
        models do: what ``ClipLoss`` / ``SigLipLoss`` take after the features.

        Features are L2-normalised when ``normalize`` (default True, as open_clip); pass
        ``normalize=False`` to get the raw projections (e.g. for a fused normalise+loss). Either
        input may be None, giving None for its features.
        """
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(tokens) if tokens is not None else None
        if normalize:
            img = F.normalize(img, dim=-1) if img is not None else None
            txt = F.normalize(txt, dim=-1) if txt is not None else None
        return (img, txt, *self.loss_params())

    def loss_params(self) -> Tuple[torch.Tensor, ...]:
        """The loss's scalar parameters: ``(logit_scale.exp().clamp(max=100),)`` and the bias
        when the model has one (the order of ``LossSpec.params``)."""
        scale = self.logit_scale.exp().clamp(max=100)
        return (scale,) if self.logit_bias is None else (scale, self.logit_bias)
