"""Symmetric InfoNCE (CLIP) and in-batch retrieval accuracy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor):
    """Normalised (B, E) embeddings -> (loss, i2t accuracy, t2i accuracy); pair i is the positive of row i."""
    logits_per_image = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image_embeds @ text_embeds.t()  # (B, B)
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
    with torch.no_grad():
        i2t = (logits_per_image.argmax(1) == labels).float().mean()
        t2i = (logits_per_image.argmax(0) == labels).float().mean()
    return loss, i2t, t2i
