"""Latent diffusion: a diffusers UNet2DConditionModel denoiser + a diffusers scheduler; the UNet never sees betas.

Objectives (model.diffusion_objective): "epsilon" (DDPM's) or "v_prediction" (Salimans & Ho), on the cosine schedule.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, UNet2DConditionModel)
from diffusers.utils.torch_utils import randn_tensor

from configs.errors import UserError
from configs.schema import ModelConfig

OBJECTIVES = ("epsilon", "v_prediction")
SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "dpm-solver++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler}
COORD_CHANNELS = 2   # x and y in [-1, 1], concatenated to the UNet's input when model.unet_coord_channels


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """Cross-attention at every resolution: the captions' words are all about where and what.

    unet_pooled_embedding adds the aligned text embedding to the time embedding, so every ResNet block sees the
    prompt, not only the attention layers; unet_coord_channels gives each position its coordinates (CoordConv), so
    "left" and "top" have somewhere to bind.
    """
    levels = len(cfg.unet_block_out_channels)
    extra = {}
    if cfg.unet_pooled_embedding:
        # the text encoder's aligned embedding (B, embed_dim), through an MLP, added to the time embedding
        extra.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.embed_dim)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // cfg.latent_downsample,
        in_channels=cfg.latent_channels + (COORD_CHANNELS if cfg.unet_coord_channels else 0),
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cfg.cond_dim,
        attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=math.gcd(32, *cfg.unet_block_out_channels),
        **extra,
    )


def build_noise_scheduler(timesteps: int, objective: str = "epsilon"):
    if objective not in OBJECTIVES:
        raise UserError(f"unknown model.diffusion_objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    # The cosine schedule (Nichol & Dhariwal) suits small latents better than SD's scaled_linear.
    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=objective, clip_sample=False)


SPACINGS = ("leading", "trailing", "linspace")


def null_condition(states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None) -> tuple:
    """The condition training drops prompts to (classifier-free guidance's unconditional branch): all-zero states
    and pooled embedding, with the prompt's own mask."""
    return torch.zeros_like(states), mask, None if pooled is None else torch.zeros_like(pooled)


def sampling_scheduler(name: str, noise_scheduler, timestep_spacing: str = "trailing"):
    """A sampler by name, sharing the training schedule (diffusers' from_config). "trailing" spacing starts at the
    last training timestep, where the training noise is pure, as the sampler's starting noise is (Lin et al.)."""
    key = name.lower()
    if timestep_spacing not in SPACINGS:
        raise UserError(f"unknown timestep spacing '{timestep_spacing}'; choose one of {', '.join(SPACINGS)}")
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if SCHEDULERS[key] is DPMSolverMultistepScheduler else {}
    return SCHEDULERS[key].from_config(noise_scheduler.config, timestep_spacing=timestep_spacing, **extra)


class LatentDiffusion(nn.Module):
    """The denoiser on normalised latents (B, Lc, h, w), conditioned on text_states (B, T, cond_dim)."""

    def __init__(self, cfg: ModelConfig, timesteps: int, unet: UNet2DConditionModel | None = None,
                 noise_scheduler=None):
        super().__init__()
        self.unet = unet if unet is not None else build_unet(cfg)
        self.noise_scheduler = noise_scheduler or build_noise_scheduler(timesteps, cfg.diffusion_objective)
        self.cond_drop_prob = cfg.cond_drop_prob
        self.coord_channels = self.unet.config.in_channels - self.unet.config.out_channels

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, Lc, h, w) -> what the UNet takes: the latents, plus coordinate channels if it has them."""
        if not self.coord_channels:
            return latents
        B, _, h, w = latents.shape
        ys = torch.linspace(-1, 1, h, device=latents.device, dtype=latents.dtype)
        xs = torch.linspace(-1, 1, w, device=latents.device, dtype=latents.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).flip(0)      # (2, h, w): x, then y
        return torch.cat([latents, grid.expand(B, -1, -1, -1)], dim=1)

    @property
    def uses_pooled(self) -> bool:
        return self.unet.config.class_embed_type == "projection"

    def denoise(self, noisy: torch.Tensor, timesteps, text_states: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet evaluation: (B, Lc, h, w) noisy latents -> the objective's prediction, same shape.
        pooled (B, embed_dim): the text embedding, for a UNet built with model.unet_pooled_embedding."""
        return self.unet(self.unet_input(noisy), timesteps, encoder_hidden_states=text_states,
                         encoder_attention_mask=text_mask, class_labels=pooled if self.uses_pooled else None).sample

    def training_loss(self, latents: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                      pooled: torch.Tensor | None = None) -> torch.Tensor:
        B, device = latents.shape[0], latents.device
        noise = torch.randn_like(latents)
        # Classifier-free guidance: the null condition is all-zero states (and embedding), the same at sampling.
        keep = (torch.rand(B, 1, 1, device=device) >= self.cond_drop_prob).to(text_states.dtype)
        states = text_states * keep
        if pooled is not None:
            pooled = pooled * keep[:, 0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (B,), device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self.denoise(noisy, timesteps, states, text_mask, pooled)
        objective = self.noise_scheduler.config.prediction_type
        target = noise if objective == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(self, text_states: torch.Tensor, text_mask: torch.Tensor, latent_shape: tuple[int, ...],
               scheduler, num_inference_steps: int, guidance_scale: float,
               generator: torch.Generator | list[torch.Generator] | None = None, pooled: torch.Tensor | None = None,
               uncond: tuple | None = None) -> torch.Tensor:
        """Denoises from Gaussian noise; returns normalised latents (B, Lc, h, w). guidance_scale 1 skips the
        unconditional pass. uncond: (states, mask, pooled) of the unconditional branch (a negative prompt); None
        is the null condition of training, all-zero states with the prompt's mask."""
        B, device = text_states.shape[0], text_states.device
        # One generator per image keeps batched output equal to one-by-one; CPU generators (drawn on the CPU, then
        # moved) make a seed's image the same on a GPU as on the CPU.
        per_image = isinstance(generator, list)
        latents = randn_tensor((B, *latent_shape), generator=generator, device=device)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        guided = guidance_scale != 1.0
        if guided:
            uncond_states, uncond_mask, uncond_pooled = uncond or null_condition(text_states, text_mask, pooled)
            states, mask = torch.cat([uncond_states, text_states]), torch.cat([uncond_mask, text_mask])
            pooled = None if pooled is None else torch.cat([uncond_pooled, pooled])
        else:
            states, mask = text_states, text_mask
        # Stochastic samplers (ddpm) draw their step noise from the same generators, so that stays per image too.
        step_kwargs = {"generator": generator} if per_image else {}
        for t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if guided else latents
            if hasattr(scheduler, "scale_model_input"):
                model_in = scheduler.scale_model_input(model_in, t)
            pred = self.denoise(model_in, t, states, mask, pooled)
            if guided:
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        return latents
