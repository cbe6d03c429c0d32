"""One adapter per model family, with the verbs every mode uses (encode, generate, score, autoencode, save, and
token-level access for PEZ). duet: a Duet checkpoint; sd: a Stable Diffusion pipeline with a CLIP (or FashionCLIP)
model as its aligned space; sdapi: an A1111-compatible server, judged by another adapter (see specialize/loading.py)."""
from __future__ import annotations

import hashlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.files import write_folder
from common.images import from_uint8, to_pil
from configs.errors import UserError
from configs.schema import SampleConfig
from evaluation.generation import FD_LABEL, image_features, score_features
from models.checkpoint import save_checkpoint

_WORD_PIECE = re.compile(r"^[a-z]+$")          # BERT whole-word tokens ("##ing", "[unused3]", "," excluded)
_CLIP_WORD = re.compile(r"^[a-z]+</w>$")       # CLIP BPE tokens that end a word
CHUNK = 64                                     # images per encoder call


def chunked(encode, items, size: int = CHUNK) -> torch.Tensor:
    """encode over items in chunks of size, concatenated as float32 on the CPU."""
    return torch.cat([encode(items[i:i + size]).float().cpu() for i in range(0, len(items), size)])


def fit_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, h, w) -> (B, 3, size, size), antialiased; unchanged when it already fits."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def weights_checksum(modules: dict[str, nn.Module]) -> str:
    """sha256 over every parameter and buffer: proves that prompt optimisation left the weights as they were, and
    keys the text-embedding cache."""
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


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Adapter:
    """What the modes call; images are (B, 3, H, W) in [-1, 1], embeddings (B, E) normalised. Each family has
    encode_images(images) and encode_texts(texts) -> (B, E); generate(prompts, seeds, steps, guidance_scale) -> one
    image per (prompt, seed), None taking self.sample's defaults; save(folder) -> the whole model, adapters fused;
    modules() -> what prompt optimisation must leave untouched; for PEZ token_embedding (V, D), encode_token_ids
    (with autograd) and vocabulary_ids() -> the token ids it may choose (V',)."""

    name = ""
    source = ""                        # where the weights came from, for the reports
    fd_label = ""                      # what the Fréchet distance over features() is
    aligned = True                     # has an image-text space: encode_*, features and score work
    image_size: int
    tokenizer = None
    logit_scale: float = 100.0
    sample = SampleConfig()            # the sampling defaults generate() falls back on
    device = torch.device("cpu")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, E) float32 on the CPU: what the Fréchet distance compares."""
        return chunked(self.encode_images, images)

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CLIP-score style (Hessel et al., without their 2.5 weight): 100 * max(cos, 0) of each image (N, 3, H, W)
        and its text -> (N,)."""
        assert len(images) == len(texts), "one text per image"
        return score_features(self.features(images), chunked(self.encode_texts, texts))

    def caption(self, images: torch.Tensor) -> list[str] | None:
        """Captions of images, or None when the family has no captioner."""
        return None

    def autoencode(self, images: torch.Tensor) -> torch.Tensor | None:
        """Images through the generator's frozen autoencoder (N, 3, H, W) on the CPU; None without one."""
        return None

    def wrap_prompt_ids(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompt token ids -> (input_ids (1, T), attention_mask (1, T), offset of the first prompt token)."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        input_ids = torch.tensor([[start, *token_ids, end]], device=self.device)
        return input_ids, torch.ones_like(input_ids), 1


class DuetAdapter(Adapter):
    """A DuetModel: its image/text encoders are the aligned space, its latent diffusion the generator."""

    name = "duet"
    fd_label = FD_LABEL

    def __init__(self, model, source: str = "in-memory model", scheduler: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.tokenizer = model.tokenizer
        self.device = model.logit_scale.device
        self.image_size = model.config.model.image_size
        self.sample = model.config.sample
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

    def features(self, images):
        return image_features(self.model, images)    # before normalisation, as evaluate.py measures it

    def generate(self, prompts, seeds, steps=None, guidance_scale=None):
        return self.model.generate_images(list(prompts), list(seeds), steps, guidance_scale, self.scheduler)

    @torch.no_grad()
    def caption(self, images):
        return self.model.caption(fit_images(images.to(self.device), self.image_size))

    @torch.no_grad()
    def autoencode(self, images):
        m = self.model
        return chunked(lambda batch: m.decode_latents(m.encode_latents(batch.to(self.device))), images)

    def save(self, folder):
        return save_checkpoint(self.model, folder)

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

    def modules(self):
        return {"duet": self.model}


class SdAdapter(Adapter):
    """A diffusers StableDiffusionPipeline generates; a CLIP model (optional: without one the adapter only generates)
    is the aligned space. pipe None: the CLIP half alone, judging the images a server drew."""

    name = "sd"
    fd_label = "FD (CLIP image features) — not Inception FID"

    def __init__(self, pipe, clip=None, processor=None, source: str = "in-memory pipeline",
                 scheduler: str | None = None, batch_size: int = 4):
        self.pipe, self.clip, self.processor = pipe, clip, processor
        self.source = source
        self.batch_size = batch_size
        self.aligned = clip is not None
        if pipe is not None:
            self.device = pipe.unet.device
            self.image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            if scheduler:   # the pipeline's own sampler unless one is named
                from models.diffusion import sampling_scheduler

                pipe.scheduler = sampling_scheduler(scheduler, pipe.scheduler)
            self.sample = SampleConfig(scheduler=type(pipe.scheduler).__name__)
        if clip is not None:
            self.device = clip.logit_scale.device
            self.image_size = self.image_size if pipe is not None else clip.config.vision_config.image_size
            self.tokenizer = processor.tokenizer
            self.logit_scale = float(clip.logit_scale.detach().exp().clamp(max=100))

    @torch.no_grad()
    def encode_images(self, images):
        pixels = self.processor.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        return F.normalize(_pooled(self.clip.get_image_features(pixel_values=pixels.to(self.device))), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts):
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self.encode_token_ids(tokens["input_ids"], tokens["attention_mask"])

    @torch.no_grad()
    def generate(self, prompts, seeds, steps=None, guidance_scale=None):
        """Float32 on the CPU: image i from seeds[i] alone (a CPU generator each: the same on any device)."""
        assert len(prompts) == len(seeds), "one seed per prompt"
        images = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            out = self.pipe(prompt=list(prompts[rows]), num_inference_steps=steps or self.sample.steps,
                            guidance_scale=self.sample.guidance_scale if guidance_scale is None else guidance_scale,
                            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[rows]], output_type="pt")
            images.append(out.images.float().cpu() * 2 - 1)                     # [0, 1] -> [-1, 1]
        return torch.cat(images)

    @torch.no_grad()
    def autoencode(self, images):
        vae = self.pipe.vae   # 512 px images: smaller chunks than Duet's
        return chunked(lambda batch: vae.decode(vae.encode(batch.to(self.device)).latent_dist.mode()).sample,
                       images, size=16).clamp(-1, 1)

    def save(self, folder):
        return write_folder(folder, lambda tmp: self.pipe.save_pretrained(tmp, safe_serialization=True))

    @property
    def token_embedding(self):
        return self.clip.text_model.embeddings.token_embedding

    def encode_token_ids(self, input_ids, attention_mask):
        return F.normalize(_pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)),
                           dim=-1)

    def vocabulary_ids(self):
        return word_token_ids(self.tokenizer, _CLIP_WORD).to(self.device)

    def modules(self):
        pipe = {"unet": self.pipe.unet, "vae": self.pipe.vae, "sd_text_encoder": self.pipe.text_encoder
                } if self.pipe is not None else {}
        return {**pipe, **({"clip": self.clip} if self.clip is not None else {})}


class SdApiAdapter:
    """Generates through an A1111-compatible server (serving/client.py); everything else (the aligned space,
    captions, the tokens PEZ searches, the weights to guard) is the local judge's, so no score depends on the
    server."""

    name = "sdapi"

    def __init__(self, client, judge: Adapter, sampler: str | None = None):
        self.client, self.judge, self.sampler = client, judge, sampler
        self.source = f"{client.url} (judge: {judge.source})"

    def __getattr__(self, name: str):
        return getattr(self.judge, name)

    def generate(self, prompts, seeds, steps=None, guidance_scale=None):
        arrays = self.client.generate(list(prompts), list(seeds), steps, guidance_scale, self.sampler)
        images = torch.stack([from_uint8(a) for a in arrays])
        return fit_images(images.to(self.judge.device), self.judge.image_size)      # (B, 3, S, S) in [-1, 1]
