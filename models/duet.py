"""DuetModel: owns the components; forward(batch) -> the losses and metrics the progress bar shows."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import DuetConfig
from models.caption_decoder import CaptionDecoder
from models.caption_search import CaptionOptions, decode_captions
from models.diffusion import LatentDiffusion, null_condition, sampling_scheduler
from models.image_decoder import ImageDecoder
from models.image_encoder import build_image_encoder
from models.losses import contrastive_loss
from models.text_encoder import TextEncoder, load_text_backbone

LATENT_SCALE_MOMENTUM = 0.01  # running 1/std of the latents; a cumulative mean over the first 100 batches


class DuetModel(nn.Module):
    """Image encoder + decoder (autoencoder), BERT text encoder, caption decoder and latent diffusion."""

    def __init__(self, cfg: DuetConfig, bert: nn.Module, tokenizer, unet=None, noise_scheduler=None):
        super().__init__()
        m = cfg.model
        self.config = cfg
        self.tokenizer = tokenizer
        self.image_encoder = build_image_encoder(m)
        self.image_decoder = ImageDecoder(m)
        self.text_encoder = TextEncoder(m, bert)
        self.caption_decoder = CaptionDecoder(
            m, self.image_encoder.token_dim, bert.config.vocab_size, bos_id=tokenizer.cls_token_id,
            eos_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id, unk_id=tokenizer.unk_token_id)
        self.diffusion = LatentDiffusion(m, cfg.train.diffusion_timesteps, unet, noise_scheduler)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        # Diffusion runs on latents * latent_scale (about unit variance); decoding divides it back out.
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_scale_updates", torch.tensor(0, dtype=torch.long))

    @classmethod
    def build(cls, cfg: DuetConfig) -> "DuetModel":
        """A fresh model; BERT (and its tokenizer) come pretrained from cfg.model.text_encoder."""
        bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
        return cls(cfg, bert, tokenizer)

    def enable_gradient_checkpointing(self) -> None:
        """Recomputes the UNet's blocks (and a trained BERT's layers) in the backward pass instead of keeping their
        activations: less memory for more compute, the same gradients."""
        self.diffusion.unet.enable_gradient_checkpointing()
        if not self.text_encoder.frozen:
            self.text_encoder.bert.gradient_checkpointing_enable()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        side = m.image_size // m.latent_downsample
        return (m.latent_channels, side, side)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Padded input_ids and attention_mask (B, T) on the model's device; long texts are truncated."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt",
                               max_length=max_length or self.config.model.max_caption_len)
        device = self.logit_scale.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> embeds (B, E)."""
        embeds = self.image_encoder(images)["embeds"]
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True):
        """(B, T) -> embeds (B, E)."""
        embeds, _ = self.text_encoder(input_ids, attention_mask)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> the states (B, T, cond_dim) the UNet cross-attends to."""
        return self.text_condition(input_ids, attention_mask)[0]

    def text_condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(B, T) -> what the UNet is conditioned on: the states (B, T, cond_dim) it cross-attends to and, when it
        was built with model.unet_pooled_embedding, the normalised text embedding (B, E) (else None)."""
        embeds, states = self.text_encoder(input_ids, attention_mask)
        return states, self.pooled_embedding(embeds)

    def pooled_embedding(self, text_embeds: torch.Tensor) -> torch.Tensor | None:
        # detached: the diffusion loss must not move the aligned space (as with the latents below)
        return F.normalize(text_embeds, dim=-1).detach() if self.diffusion.uses_pooled else None

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> normalised latents (B, Lc, h, w), the diffusion model's space."""
        return self.image_encoder(images)["latents"] * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents -> images (B, 3, H, W) in [-1, 1]."""
        return self.image_decoder(latents / self.latent_scale)

    @torch.no_grad()
    def _track_latent_scale(self, latents: torch.Tensor) -> None:
        self.latent_scale_updates += 1
        momentum = max(LATENT_SCALE_MOMENTUM, 1.0 / float(self.latent_scale_updates))
        self.latent_scale.lerp_(1.0 / latents.float().std().clamp(min=1e-4), momentum)

    def forward(self, batch: dict, with_diffusion: bool = True) -> dict[str, torch.Tensor]:
        """batch: images (B, 3, H, W), input_ids and attention_mask (B, T) -> loss, cont, rec, diff, i2t, t2i
        (plus the two halves of rec: img_rec and cap). with_diffusion=False leaves the UNet out (diff is 0): the
        joint phase of a run whose UNet trains afterwards on frozen features (train.joint_steps)."""
        t = self.config.train
        images, input_ids, attention_mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        # Captions are padded to max_caption_len; the columns past the longest one only cost BERT time.
        longest = int(attention_mask.sum(1).max())
        input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        encoded = self.image_encoder(images)
        text_embeds, text_states = self.text_encoder(input_ids, attention_mask)
        cont, i2t, t2i = contrastive_loss(F.normalize(encoded["embeds"], dim=-1), F.normalize(text_embeds, dim=-1),
                                          self.logit_scale)
        img_rec = F.mse_loss(self.image_decoder(encoded["latents"]), images)
        cap = self.caption_decoder.loss(input_ids, attention_mask, encoded["tokens"])
        if self.training:
            self._track_latent_scale(encoded["latents"])
        # detach: the diffusion loss must not pull the autoencoder's latent towards what is easy to denoise.
        if with_diffusion:
            diff = self.diffusion.training_loss(encoded["latents"].detach() * self.latent_scale, text_states,
                                                attention_mask, self.pooled_embedding(text_embeds))
        else:
            diff = torch.zeros((), device=images.device)
        rec = img_rec + cap
        loss = t.contrastive_weight * cont + t.recon_weight * rec + t.diffusion_weight * diff
        return {"loss": loss, "cont": cont, "rec": rec, "diff": diff, "i2t": i2t, "t2i": t2i,
                "img_rec": img_rec, "cap": cap}

    @torch.no_grad()
    def caption(self, images: torch.Tensor, options: CaptionOptions | None = None,
                generators: list[torch.Generator] | None = None) -> list[str]:
        """Captions for images (B, 3, H, W): greedy unless options say beam search or sampling (which needs
        `generators`, one per image)."""
        token_ids, _ = decode_captions(self.caption_decoder, self.image_encoder(images)["tokens"],
                                       options or CaptionOptions(), generators)
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def sampler(self, name: str | None = None):
        """A diffusers sampler by name (default: the config's sample.scheduler) with the config's spacing."""
        sample = self.config.sample
        return sampling_scheduler(name or sample.scheduler, self.diffusion.noise_scheduler, sample.timestep_spacing)

    @torch.no_grad()
    def generate_images(self, texts: list[str], seeds: list[int], steps: int | None = None,
                        guidance_scale: float | None = None, scheduler: str | None = None,
                        negative_prompt: str | list[str] = "", batch_size: int | None = None) -> torch.Tensor:
        """The text-to-image path: texts -> images (N, 3, H, W) in [-1, 1], float32 on the CPU.

        Image i depends only on texts[i], seeds[i] and negative_prompt[i]: its noise comes from its own generator,
        so it is the same alone, in any batch and at any batch_size (None: all at once). negative_prompt: the text
        of classifier-free guidance's unconditional branch, one for all or one per text; "" keeps the null
        condition of training. scheduler (a name), steps and guidance_scale: None takes the config's sample
        section, the one place these defaults live."""
        assert len(seeds) == len(texts), "one seed per text"
        negatives = [negative_prompt] * len(texts) if isinstance(negative_prompt, str) else list(negative_prompt)
        assert len(negatives) == len(texts), "one negative prompt per text"
        sample = self.config.sample
        steps = steps or sample.steps
        guidance_scale = sample.guidance_scale if guidance_scale is None else guidance_scale
        batch_size = batch_size or max(len(texts), 1)
        images, sampler = [], self.sampler(scheduler)     # sample() resets its timesteps for each batch
        for start in range(0, len(texts), batch_size):
            rows = slice(start, start + batch_size)
            images.append(self._generate_batch(texts[rows], seeds[rows], negatives[rows], sampler,
                                               steps, guidance_scale).float().cpu())
        side = self.config.model.image_size
        return torch.cat(images) if images else torch.zeros(0, 3, side, side)

    def _generate_batch(self, texts, seeds, negatives, scheduler, steps, guidance_scale) -> torch.Tensor:
        device = self.logit_scale.device
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]   # CPU: the same noise on any device
        tokens = self.tokenize(texts)
        states, pooled = self.text_condition(tokens["input_ids"], tokens["attention_mask"])
        uncond = None
        if any(negatives) and guidance_scale != 1.0:
            negative = self.tokenize(negatives)
            uncond_states, uncond_pooled = self.text_condition(negative["input_ids"], negative["attention_mask"])
            # rows without a negative prompt keep the null condition of training
            has = torch.tensor([bool(n) for n in negatives], device=device)
            null_states, null_mask, null_pooled = null_condition(states, tokens["attention_mask"], pooled)
            uncond = (torch.where(has[:, None, None], uncond_states, null_states),
                      torch.where(has[:, None], negative["attention_mask"], null_mask),
                      None if pooled is None else torch.where(has[:, None], uncond_pooled, null_pooled))
        latents = self.diffusion.sample(states, tokens["attention_mask"], self.latent_shape, scheduler, steps,
                                        guidance_scale, generators, pooled, uncond)
        return self.decode_latents(latents).clamp(-1, 1)
