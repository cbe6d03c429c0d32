"""Latent diffusion: diffusers UNet2DConditionModel denoiser + a diffusers scheduler; the UNet never sees betas."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel)

from configs.errors import UserError
from configs.schema import ModelConfig

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "dpm-solver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """Cross-attention at every resolution: the captions' words are all about where and what."""
    levels = len(cfg.unet_block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.latent_downsample,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cfg.cond_dim,
        attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=math.gcd(32, *cfg.unet_block_out_channels),
    )


def build_noise_scheduler(timesteps: int) -> DDPMScheduler:
    # The cosine schedule (Nichol & Dhariwal) suits small latents better than SD's scaled_linear.
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False)


def sampling_scheduler(name: str, noise_scheduler: DDPMScheduler):
    """A sampler by name, sharing the training schedule's betas (diffusers' from_config)."""
    key = name.lower()
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if SCHEDULERS[key] is DPMSolverMultistepScheduler else {}
    return SCHEDULERS[key].from_config(noise_scheduler.config, **extra)


class LatentDiffusion(nn.Module):
    """Epsilon-prediction on normalised latents (B, Lc, h, w), conditioned on text_states (B, T, cond_dim)."""

    def __init__(self, cfg: ModelConfig, timesteps: int, unet: UNet2DConditionModel | None = None,
                 noise_scheduler: DDPMScheduler | None = None):
        super().__init__()
        self.unet = unet if unet is not None else build_unet(cfg)
        self.noise_scheduler = noise_scheduler or build_noise_scheduler(timesteps)
        self.cond_drop_prob = cfg.cond_drop_prob

    def training_loss(self, latents: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B = latents.shape[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        # Classifier-free guidance: the null condition is all-zero states, the same at sampling time.
        keep = (torch.rand(B, 1, 1, device=latents.device) >= self.cond_drop_prob).to(text_states.dtype)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text_states * keep,
                         encoder_attention_mask=text_mask).sample
        return F.mse_loss(pred.float(), noise.float())

    @torch.no_grad()
    def sample(self, text_states: torch.Tensor, text_mask: torch.Tensor, latent_shape: tuple[int, ...],
               scheduler, num_inference_steps: int, guidance_scale: float,
               generator: torch.Generator | list[torch.Generator] | None = None,
               unet: UNet2DConditionModel | None = None) -> torch.Tensor:
        """Denoises from Gaussian noise; returns normalised latents (B, Lc, h, w). guidance_scale 1 skips the
        unconditional pass."""
        unet = unet or self.unet
        B, device = text_states.shape[0], text_states.device
        if isinstance(generator, list):  # one generator per image keeps batched output equal to one-by-one
            latents = torch.cat([torch.randn((1, *latent_shape), generator=g, device=device) for g in generator])
        else:
            latents = torch.randn((B, *latent_shape), generator=generator, device=device)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0
        states = torch.cat([torch.zeros_like(text_states), text_states]) if guided else text_states
        mask = torch.cat([text_mask, text_mask]) if guided else text_mask
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            eps = unet(model_in, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        return latents
