"""What fine-tuning trains, per backend: a Duet checkpoint or a local Stable Diffusion pipeline, behind one interface.

Both expose the denoiser (`unet`), the text model LoRA may adapt (`text_encoder`), the diffusion loss of a caption
batch on latents from the frozen image encoder (the recipe of diffusers' train_text_to_image_lora.py), generation
from fixed seeds, and a way to write the whole (merged or fully tuned) model in its usual format.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from configs.schema import SampleConfig

MEMO_BYTES = 512 * 2**20  # memoised latents and text states stop growing past this



class Tunable:
    """The interface; images are (B, 3, H, W) in [-1, 1], captions are input_ids / attention_mask (B, T)."""

    name = "tunable"
    unet: nn.Module
    text_encoder: nn.Module          # the HF text model (BERT / CLIPTextModel) LoRA goes on
    tokenizer = None
    image_size: int
    max_caption_len: int
    source: str                      # the base model's folder, recorded with the adapter

    def full_text_modules(self) -> list[nn.Module]:
        """What trains in full fine-tuning with --train-text-encoder."""
        return [self.text_encoder]

    def frozen_modules(self) -> list[nn.Module]:
        """Every module; the trainer unfreezes what it trains."""
        raise NotImplementedError

    def loss(self, batch: dict, train_text: bool, train_decoder: bool = False) -> torch.Tensor:
        """The denoising MSE of one batch; gradients reach the text model only when train_text. With train_decoder
        (Duet only) plus the image decoder's reconstruction MSE on the frozen encoder's latents."""
        raise NotImplementedError

    sample = SampleConfig()          # the sampling defaults generate() falls back on

    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance_scale: float | None = None, scheduler: str | None = None) -> torch.Tensor:
        """One image per (prompt, seed) -> (B, 3, H, W) in [-1, 1]; None: self.sample's defaults."""
        raise NotImplementedError

    def save_model(self, folder: Path) -> Path:
        """The whole model (adapters merged beforehand) in the backend's own loadable format."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "Tunable":
        for module in self.frozen_modules():
            module.to(device)
        self.device = device
        return self


class DuetTunable(Tunable):
    """A DuetModel: latents from its CNN encoder, conditioning from BERT -> to_states, its LatentDiffusion loss
    (which keeps the classifier-free condition dropout of training)."""

    name = "duet"

    def __init__(self, model, source: str | Path):
        self.model = model
        self.unet = model.diffusion.unet
        self.text_encoder = model.text_encoder.bert
        self.tokenizer = model.tokenizer
        self.image_size = model.config.model.image_size
        self.max_caption_len = model.config.model.max_caption_len
        self.sample = model.config.sample
        self.source = str(source)
        self.device = model.logit_scale.device
        # The image encoder is frozen and images are not augmented, so an image's latent never changes; nor do a
        # frozen text encoder's states for a caption (the fashion captions repeat). Both are computed once.
        self.latent_memo: dict[int, torch.Tensor] = {}
        self.state_memo: dict[str, torch.Tensor] = {}
        self.pooled_memo: dict[str, torch.Tensor] = {}
        self.memo_bytes = 0

    def full_text_modules(self):
        return [self.model.text_encoder]  # BERT and its projection to the UNet's conditioning width

    def frozen_modules(self):
        return [self.model]

    @torch.no_grad()
    def _memoised(self, memo: dict, keys: list, compute) -> torch.Tensor:
        """Rows for keys, calling compute(rows) only for the rows not memoised yet; (B, ...)."""
        missing = [i for i, key in enumerate(keys) if key not in memo]
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        for i, row in fresh.items():
            if self.memo_bytes < MEMO_BYTES:
                memo[keys[i]] = row
                self.memo_bytes += row.numel() * row.element_size()
        return torch.stack([fresh[i] if i in fresh else memo[key] for i, key in enumerate(keys)])

    def loss(self, batch, train_text, train_decoder=False):
        images, input_ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        latents = self._memoised(self.latent_memo, batch["image_id"].tolist(),
                                 lambda rows: self.model.encode_latents(images[rows]))  # (B, Lc, h, w)
        if train_text:
            states, pooled = self.model.text_condition(input_ids, mask)                  # (B, T, D), (B, E)
        else:
            states = self._memoised(self.state_memo, list(batch["caption"]),
                                    lambda rows: self.model.text_states(input_ids[rows], mask[rows]))
            pooled = None
            if self.model.diffusion.uses_pooled:
                pooled = self._memoised(self.pooled_memo, list(batch["caption"]),
                                        lambda rows: self.model.text_condition(input_ids[rows], mask[rows])[1])
        loss = self.model.diffusion.training_loss(latents, states, mask, pooled)
        if train_decoder:
            # The encoder stays frozen, so the latents the UNet learns keep their meaning (as sd-vae-ft-mse tuned
            # only SD's VAE decoder); the decoder learns to draw the domain from them.
            loss = loss + F.mse_loss(self.model.decode_latents(latents), images)
        return loss

    def generate(self, prompts, seeds, steps=None, guidance_scale=None, scheduler=None):
        return self.model.generate_images(list(prompts), list(seeds), steps, guidance_scale, scheduler)

    def save_model(self, folder):
        from models.checkpoint import save_checkpoint

        return save_checkpoint(self.model, folder)


class StableDiffusionTunable(Tunable):
    """A diffusers StableDiffusionPipeline: VAE latents times scaling_factor, CLIP text states, epsilon or
    v-prediction as its scheduler says (diffusers' train_text_to_image_lora.py)."""

    name = "sd"

    def __init__(self, pipe, source: str | Path):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.tokenizer = pipe.tokenizer
        self.image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.max_caption_len = pipe.tokenizer.model_max_length
        self.sample = SampleConfig(scheduler=type(pipe.scheduler).__name__)  # the pipeline samples its own way
        self.source = str(source)
        self.device = pipe.unet.device

    def frozen_modules(self):
        return [self.unet, self.text_encoder, self.vae]

    def loss(self, batch, train_text, train_decoder=False):
        assert not train_decoder, "settings_from_args refuses --train-decoder for Stable Diffusion"
        with torch.no_grad():
            latents = self.vae.encode(batch["images"]).latent_dist.sample() * self.vae.config.scaling_factor
        with torch.set_grad_enabled(train_text):
            states = self.text_encoder(batch["input_ids"], return_dict=False)[0]      # (B, 77, D)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, encoder_hidden_states=states, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    def generate(self, prompts, seeds, steps=None, guidance_scale=None, scheduler=None):
        from models.diffusion import sampling_scheduler
        from specialize.backends import sd_generate

        # The pipeline's own sampler unless one is named; same seeds -> same images for base and tuned.
        if scheduler:
            self.pipe.scheduler = sampling_scheduler(scheduler, self.noise_scheduler)
        return sd_generate(self.pipe, prompts, seeds, steps, guidance_scale)

    def save_model(self, folder):
        from common.files import atomic_dir

        return atomic_dir(folder, lambda tmp: self.pipe.save_pretrained(tmp, safe_serialization=True))


def load_tunable(args, device: torch.device) -> Tunable:
    """The base model the launcher's flags name: --backend duet (--checkpoint, default the newest under outputs/)
    or --backend sd (--model-path, a local diffusers folder)."""
    if args.backend == "sd":
        from specialize.backends import load_sd_pipeline

        if not args.model_path:
            raise UserError("--backend sd needs --model-path, a local Stable Diffusion diffusers folder")
        pipe = load_sd_pipeline(args.model_path, device)
        return StableDiffusionTunable(pipe, args.model_path)
    if args.backend != "duet":
        raise UserError(f"unknown --backend '{args.backend}'; choose duet or sd")
    from models.checkpoint import find_latest_checkpoint, load_checkpoint

    folder = Path(args.checkpoint) if args.checkpoint else find_latest_checkpoint("outputs")
    if not folder.is_dir():
        raise UserError(f"base checkpoint {folder} does not exist; pass --checkpoint with a folder written by main.py")
    # use_ema: start from the weights sampling uses, so the adapter is applied where it was trained.
    return DuetTunable(load_checkpoint(folder, device=device, use_ema=True), folder)
