"""Transposed-CNN decoder: spatial latent -> image; the autoencoder's second half."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from configs.schema import ModelConfig
from models.image_encoder import ResBlock, group_norm, stage_width


class ImageDecoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, 3, h * latent_downsample, w * latent_downsample) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths, n_up = cfg.encoder_widths, int(math.log2(cfg.latent_downsample))
        ch = stage_width(widths, n_up)
        layers = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), ResBlock(ch, ch)]
        for i in reversed(range(n_up)):
            out = stage_width(widths, i)
            layers += [nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1), ResBlock(out, out)]
            ch = out
        layers += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(latents))
