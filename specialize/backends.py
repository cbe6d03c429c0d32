"""Text-to-image backends for prompt optimisation: our Duet checkpoint, or Stable Diffusion + a CLIP model.

Both offer the same verbs: encode_images / encode_texts (the aligned space, normalised), generate (fixed seeds),
caption (Duet only), and token-level access for PEZ (token_embedding, wrap_prompt_ids, encode_token_ids).
Everything loads from local folders; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import UserError
from configs.schema import SampleConfig
from models.device import resolve_device

_WORD_PIECE = re.compile(r"^[a-z]+$")          # BERT whole-word tokens ("##ing", "[unused3]", "," excluded)
_CLIP_WORD = re.compile(r"^[a-z]+</w>$")       # CLIP BPE tokens that end a word


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, size, size), antialiased; unchanged when it already fits."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def files_identity(paths: list[Path]) -> str:
    """A cache key for weights on disk: resolved paths, sizes and modification times (cheap, no hashing)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def weights_checksum(modules: dict[str, nn.Module]) -> str:
    """sha256 over every parameter and buffer: proves that optimisation left the weights as they were."""
    digest = hashlib.sha256()
    for name, module in sorted(modules.items()):
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def word_token_ids(tokenizer, pattern: re.Pattern, candidates: list[int] | None = None) -> torch.Tensor:
    """Token ids whose vocabulary string matches pattern (whole alphabetic words): PEZ's search space (V',)."""
    ids = candidates if candidates is not None else list(range(len(tokenizer)))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    specials = set(tokenizer.all_special_ids)
    keep = [i for i, tok in zip(ids, tokens) if tok and pattern.match(tok) and i not in specials]
    if not keep:
        raise UserError("the tokenizer has no whole-word tokens for the PEZ search; drop pez from --strategies")
    return torch.tensor(keep, dtype=torch.long)


class Backend:
    """The interface prompt optimisation uses. Images are (B, 3, H, W) float in [-1, 1]; embeddings normalised."""

    name = "backend"
    source = ""                        # where the weights came from, for the reports
    image_size: int
    tokenizer = None
    logit_scale: float = 100.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E)."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, E)."""
        raise NotImplementedError

    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance_scale: float | None = None) -> torch.Tensor:
        """One image per (prompt, seed) pair, both lists of length B -> (B, 3, H, W); None: the model's defaults."""
        raise NotImplementedError

    def caption(self, images: torch.Tensor) -> list[str] | None:
        """Captions of images, or None when the backend has no captioner."""
        return None

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text encoder's input token embedding (V, D), for PEZ."""
        raise NotImplementedError

    def wrap_prompt_ids(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompt token ids -> (input_ids (1, T), attention_mask (1, T), offset of the first prompt token)."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        input_ids = torch.tensor([[start, *token_ids, end]], device=self.device)
        return input_ids, torch.ones_like(input_ids), 1

    def encode_token_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, E) normalised, with autograd (PEZ swaps the token embeddings in through a hook)."""
        raise NotImplementedError

    def vocabulary_ids(self) -> torch.Tensor:
        """Token ids PEZ may choose from (V',)."""
        raise NotImplementedError

    def identity(self) -> str:
        """A string that changes when the weights change (the text-embedding cache key)."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose weights the optimisation must leave untouched."""
        raise NotImplementedError


class DuetBackend(Backend):
    """A Duet checkpoint: its image/text encoders are the aligned space, its latent diffusion the generator."""

    name = "duet"

    def __init__(self, model, checkpoint: Path | None = None, scheduler: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.checkpoint = checkpoint
        self.source = str(checkpoint) if checkpoint else "in-memory model"
        self.tokenizer = model.tokenizer
        self.device = model.logit_scale.device
        self.image_size = model.config.model.image_size
        model.sampler(scheduler)                     # an unknown name fails here, before any work
        self.scheduler = scheduler                   # None: the checkpoint's sample.scheduler
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=100))

    @torch.no_grad()
    def encode_images(self, images):
        return self.model.encode_image(fit_images(images.to(self.device), self.image_size))

    @torch.no_grad()
    def encode_texts(self, texts):
        tokens = self.model.tokenize(list(texts))
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"])

    def generate(self, prompts, seeds, steps=None, guidance_scale=None):
        return self.model.generate_images(list(prompts), list(seeds), steps, guidance_scale, self.scheduler)

    @torch.no_grad()
    def caption(self, images):
        return self.model.caption(fit_images(images.to(self.device), self.image_size))

    @property
    def token_embedding(self):
        return self.model.text_encoder.bert.get_input_embeddings()

    def encode_token_ids(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)

    def vocabulary_ids(self):
        vocab = self.model.caption_decoder.vocab_ids
        # A reduced caption vocabulary lists the tokens the training captions used: the words the model knows.
        candidates = vocab.tolist() if self.model.config.model.caption_vocab_size else None
        return word_token_ids(self.tokenizer, _WORD_PIECE, candidates).to(self.device)

    def identity(self):
        if self.checkpoint is None:
            return "in-memory-" + weights_checksum(self.modules())[:16]
        from models.checkpoint import TEXT_ENCODER_DIR, WEIGHTS_FILE

        return files_identity([self.checkpoint / WEIGHTS_FILE,
                               *sorted((self.checkpoint / TEXT_ENCODER_DIR).glob("*.safetensors"))])

    def modules(self):
        return {"duet": self.model}


def load_duet_backend(checkpoint: str | Path | None, device: torch.device,
                      scheduler: str | None = None) -> DuetBackend:
    """Loads a Duet checkpoint (default: the newest under outputs/); it must hold a trained text-to-image model."""
    from models.checkpoint import UNET_DIR, find_latest_checkpoint, load_checkpoint, read_config

    folder = Path(checkpoint) if checkpoint else find_latest_checkpoint("outputs")
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} does not exist; pass --checkpoint with a folder written by main.py")
    cfg = read_config(folder)
    if not (folder / UNET_DIR).is_dir() or cfg.train.diffusion_weight <= 0:
        raise UserError(f"checkpoint {folder} has no trained text-to-image model (no unet/ or "
                        "train.diffusion_weight=0); train one with train.diffusion_weight > 0")
    return DuetBackend(load_checkpoint(folder, device=device, use_ema=True), folder, scheduler)


@torch.no_grad()
def sd_generate(pipe, prompts: list[str], seeds: list[int], steps: int | None = None,
                guidance_scale: float | None = None, batch_size: int | None = None) -> torch.Tensor:
    """A Stable Diffusion pipeline's images (N, 3, H, W) in [-1, 1], float32 on the CPU: image i from seeds[i] alone
    (a CPU generator each: the same on any device), batch_size prompts per call; None steps and guidance take
    SampleConfig's defaults, as a Duet checkpoint without its own would."""
    assert len(prompts) == len(seeds), "one seed per prompt"
    defaults, batch_size = SampleConfig(), batch_size or max(len(prompts), 1)
    images = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        out = pipe(prompt=list(prompts[rows]), num_inference_steps=steps or defaults.steps,
                   guidance_scale=defaults.guidance_scale if guidance_scale is None else guidance_scale,
                   generator=[torch.Generator().manual_seed(int(s)) for s in seeds[rows]], output_type="pt")
        images.append(out.images.float().cpu() * 2 - 1)                     # [0, 1] -> [-1, 1]
    return torch.cat(images)


def load_sd_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers StableDiffusionPipeline from a local folder (model_index.json + components), never downloaded.

    Shared with specialize/finetune.py (LoRA on SD). Progress bars are off; the pipeline is on `device`.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path else None
    if path is None or not (path / "model_index.json").is_file():
        raise UserError(f"--model-path {path} is not a diffusers pipeline folder (no model_index.json); give a local "
                        "Stable Diffusion v1.5 folder saved with save_pretrained")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"--model-path {path} does not load as a Stable Diffusion pipeline: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local HF folder: OpenAI CLIP, FashionCLIP or any CLIPModel checkpoint."""
    import json

    from transformers import CLIPModel, CLIPProcessor

    path = Path(path) if path else None
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"--clip-path {path} is not a Hugging Face model folder (no config.json); give a local "
                        "CLIP or FashionCLIP folder saved with save_pretrained")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError:
        raise UserError(f"--clip-path {path}: config.json is not valid JSON") from None
    if model_type != "clip":
        raise UserError(f"--clip-path {path} holds a '{model_type}' model, not a CLIP model (model_type 'clip')")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"--clip-path {path} does not load as CLIPModel + CLIPProcessor: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return model.to(device).eval().requires_grad_(False), processor


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class StableDiffusionBackend(Backend):
    """A Stable Diffusion pipeline generates; a separate CLIP (or FashionCLIP) model is the aligned space."""

    name = "sd"

    def __init__(self, pipe, clip, processor, model_path: Path | None = None, clip_path: Path | None = None,
                 batch_size: int = 4):
        self.pipe, self.clip, self.processor = pipe, clip, processor
        self.tokenizer = processor.tokenizer
        self.device = clip.logit_scale.device
        # pipe None: the CLIP half alone, judging images a server drew (specialize/sdapi.py)
        self.image_size = (pipe.unet.config.sample_size * pipe.vae_scale_factor if pipe is not None
                           else clip.config.vision_config.image_size)
        self.logit_scale = float(clip.logit_scale.detach().exp().clamp(max=100))
        self.paths = [p for p in (model_path, clip_path) if p is not None]
        self.source = " + ".join(map(str, self.paths)) or "in-memory pipeline"
        self.batch_size = batch_size
        image_processor = processor.image_processor
        size = image_processor.size
        self.resize_to = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        crop = image_processor.crop_size or {"height": self.resize_to, "width": self.resize_to}
        self.crop = (crop["height"], crop["width"])
        self.mean = torch.tensor(image_processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=self.device).view(1, 3, 1, 1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> CLIP's input (shorter side resized, centre crop, mean/std), as CLIPImageProcessor does."""
        x = (images.to(self.device).float() + 1) / 2
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        x = F.interpolate(x, size=(max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale))),
                          mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images):
        return F.normalize(_pooled(self.clip.get_image_features(pixel_values=self.pixel_values(images))), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.encode_token_ids(tokens["input_ids"], tokens["attention_mask"])

    def generate(self, prompts, seeds, steps=None, guidance_scale=None):
        return sd_generate(self.pipe, prompts, seeds, steps, guidance_scale, self.batch_size)

    @property
    def token_embedding(self):
        return self.clip.text_model.embeddings.token_embedding

    def encode_token_ids(self, input_ids, attention_mask):
        return F.normalize(_pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)),
                           dim=-1)

    def vocabulary_ids(self):
        return word_token_ids(self.tokenizer, _CLIP_WORD).to(self.device)

    def identity(self):
        files = [f for p in self.paths for f in sorted(p.rglob("*")) if f.suffix in (".safetensors", ".bin")]
        return files_identity(files) if files else "in-memory-" + weights_checksum(self.modules())[:16]

    def modules(self):
        pipe = {"unet": self.pipe.unet, "vae": self.pipe.vae, "sd_text_encoder": self.pipe.text_encoder
                } if self.pipe is not None else {}
        return {**pipe, "clip": self.clip}


def build_backend(args) -> Backend:
    """The backend the launcher's flags describe: --backend duet (--checkpoint) or sd (--model-path, --clip-path)."""
    device = resolve_device(getattr(args, "device", "auto"))
    if args.backend == "duet":
        return load_duet_backend(args.checkpoint, device, getattr(args, "scheduler", None))
    if args.backend == "sd":
        if not args.model_path or not args.clip_path:
            raise UserError("--backend sd needs --model-path (a Stable Diffusion diffusers folder) and --clip-path "
                            "(a CLIP or FashionCLIP HF folder)")
        pipe = load_sd_pipeline(args.model_path, device)
        clip, processor = load_clip(args.clip_path, device)
        return StableDiffusionBackend(pipe, clip, processor, Path(args.model_path), Path(args.clip_path))
    if args.backend == "sdapi":
        from specialize.sdapi import build_sdapi_backend

        return build_sdapi_backend(args, device)
    raise UserError(f"unknown --backend '{args.backend}'; choose duet, sd or sdapi")
