"""Image encoders: SimpleCNN or a torchvision ResNet50 trunk, each giving a spatial latent, tokens and an embedding."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from configs.schema import ModelConfig

TOKEN_GRID = 4  # image tokens for the caption decoder: a TOKEN_GRID x TOKEN_GRID pooled map


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Pre-norm residual block: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
                                   group_norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


def stage_width(widths: list[int], stage: int) -> int:
    return widths[min(stage, len(widths) - 1)]


class SimpleCNN(nn.Module):
    """Strided residual CNN. The latent keeps the map at stride latent_downsample; the embedding flattens a 4x4
    pooled map so it keeps where things are (the captions say left/right/top/bottom)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths, n_down = cfg.encoder_widths, int(math.log2(cfg.latent_downsample))
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        layers, ch = [], widths[0]
        for i in range(n_down):
            out = stage_width(widths, i + 1)
            layers += [ResBlock(ch, ch), nn.Conv2d(ch, out, 3, stride=2, padding=1)]
            ch = out
        self.down = nn.Sequential(*layers, ResBlock(ch, ch))
        self.to_latent = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.latent_channels, 1))
        # Further stride-2 stages until the map is at most TOKEN_GRID wide, then pool to exactly that grid.
        side, head = cfg.image_size // cfg.latent_downsample, []
        while side > TOKEN_GRID:
            head += [nn.Conv2d(ch, ch, 3, stride=2, padding=1), ResBlock(ch, ch)]
            side //= 2
        self.head = nn.Sequential(*head, group_norm(ch), nn.SiLU())
        self.token_dim = ch
        self.embed = nn.Linear(ch * TOKEN_GRID * TOKEN_GRID, cfg.embed_dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.down(self.stem(images))                             # (B, C, h, w)
        tokens = F.adaptive_avg_pool2d(self.head(features), TOKEN_GRID)     # (B, C, 4, 4)
        return {"latents": self.to_latent(features),                        # (B, Lc, h, w)
                "tokens": tokens.flatten(2).transpose(1, 2),                # (B, 16, C)
                "embeds": self.embed(tokens.flatten(1))}                    # (B, E)


def _cached_resnet50_state() -> dict:
    """ImageNet weights from the local torch hub cache only; this product never downloads at run time."""
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V2.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise UserError(f"ResNet50 pretrained weights not found at {path}; copy them there from a machine with "
                        f"internet ({url}) or set model.resnet_pretrained=false")
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNet50Encoder(nn.Module):
    """torchvision ResNet50: the latent from the stage at stride latent_downsample, tokens and embedding from layer4."""

    _STAGE_AT_STRIDE = {4: ("layer1", 256), 8: ("layer2", 512), 16: ("layer3", 1024), 32: ("layer4", 2048)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from torchvision.models import resnet50

        trunk = resnet50(weights=None)
        if cfg.resnet_pretrained:
            trunk.load_state_dict(_cached_resnet50_state())
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.stages = nn.ModuleDict({name: getattr(trunk, name) for name in ("layer1", "layer2", "layer3", "layer4")})
        self.latent_stage, latent_ch = self._STAGE_AT_STRIDE[cfg.latent_downsample]
        self.to_latent = nn.Conv2d(latent_ch, cfg.latent_channels, 1)
        self.token_dim = 2048
        self.embed = nn.Linear(2048, cfg.embed_dim)
        # torchvision's ImageNet statistics, applied to our [-1, 1] images.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(((images + 1) / 2 - self.mean) / self.std)
        latents = None
        for name, stage in self.stages.items():
            x = stage(x)
            if name == self.latent_stage:
                latents = self.to_latent(x)                                 # (B, Lc, h, w)
        tokens = F.adaptive_avg_pool2d(x, TOKEN_GRID).flatten(2).transpose(1, 2)  # (B, 16, 2048)
        return {"latents": latents, "tokens": tokens, "embeds": self.embed(x.mean(dim=(2, 3)))}


def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    return SimpleCNN(cfg) if cfg.use_simple_cnn else ResNet50Encoder(cfg)
