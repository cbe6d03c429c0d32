"""ImageTextGenerator, the Python API for a trained Duet checkpoint: text->image, image->text and retrieval.

Scripts (inference.py, test_generation.py, bench/) stand on it; `from inference import ImageTextGenerator` is the
import users were promised and keeps working.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from PIL import Image

from common.images import to_pil
from configs.errors import UserError
from models.caption_search import CaptionOptions
from models.checkpoint import load_checkpoint, resolve_checkpoint
from models.device import resolve_device
from pipelines.images import check_writable, load_image, save_image

logger = logging.getLogger("duet.inference")

EMBED_BATCH = 64  # images or texts per forward pass in embed_*


def check_prompt(text) -> str:
    """A non-empty prompt string, stripped."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("the prompt is empty; give some text to draw, e.g. --text \"a red circle\"")
    return text.strip()


def check_steps(num_inference_steps: int | None) -> int | None:
    """None (the checkpoint's default) or a whole number >= 1."""
    if num_inference_steps is None:
        return None
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise UserError(f"the number of sampling steps must be a whole number >= 1, got {num_inference_steps!r}")
    return num_inference_steps


def seed_list(seed: int | None, count: int) -> list[int]:
    """seed, seed+1, ...: image i of a call always gets seed+i. None draws a fresh base seed."""
    base = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    return [base + i for i in range(count)]


class ImageTextGenerator:
    """A trained Duet checkpoint, ready for generation, captioning and retrieval.

    Args:
        checkpoint: a checkpoint folder (outputs/<run>/best_model, .../checkpoint-000500); outputs/best_model is the
            newest run's best model; None takes the newest checkpoint under outputs/.
        device: "cpu", "cuda", "cuda:1" or None (CUDA when available, else CPU).
        lora: a LoRA adapter folder (written by the fine-tuning step) applied on top of the checkpoint.
        lora_scale: how strongly the adapter acts (1.0: as trained, 0.0: the base model).

    Raises:
        UserError: no checkpoint, a damaged or mismatched one (the message names the field), CUDA asked for but
            absent, or an adapter that does not fit.

    Sampling uses the EMA UNet when the checkpoint has one. Every image a call makes gets its own generator,
    seeded seed+i, so batched output equals one-by-one output and a seed reproduces an image: exactly on the CPU,
    to within rounding on a GPU (whose kernels are not bit-deterministic), and the same image on either (the noise
    is drawn on the CPU).
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str | torch.device | None = None,
                 lora: str | Path | None = None, lora_scale: float = 1.0):
        self.device = resolve_device(device)
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.model = load_checkpoint(self.checkpoint, self.device, use_ema=True)
        if lora is not None:
            try:
                from models.lora import apply_lora
            except ModuleNotFoundError as err:
                if err.name != "models.lora":
                    raise
                raise UserError("LoRA adapters need models/lora.py, which this version does not have") from None
            apply_lora(self.model, lora, lora_scale)
            self.model.eval()
        self._set_config()

    @classmethod
    def from_model(cls, model, device: str | torch.device | None = None) -> "ImageTextGenerator":
        """Wraps a DuetModel already in memory (right after training, or in a benchmark); no checkpoint is read.
        The model is moved to `device` (default: where it is) and put in eval mode."""
        self = cls.__new__(cls)
        self.device = resolve_device(device) if device is not None else model.logit_scale.device
        self.checkpoint = None
        self.model = model.to(self.device).eval()
        self._set_config()
        return self

    def _set_config(self) -> None:
        self.config = self.model.config
        self.image_size = self.config.model.image_size
        self.max_caption_len = self.config.model.max_caption_len

    # -- text -> image ---------------------------------------------------------------------------------------

    def _check_prompt_length(self, text: str) -> None:
        """Warns (stderr) when a prompt is longer than the model reads; tokenize() truncates it."""
        # One token past the limit is enough to know, and keeps the tokenizer's own long-input warning quiet.
        ids = self.model.tokenizer(text, truncation=True, max_length=self.max_caption_len + 1)["input_ids"]
        if len(ids) > self.max_caption_len:
            logger.warning("warning: prompt '%s' is longer than %d tokens (model.max_caption_len); the rest is cut",
                           text if len(text) <= 60 else text[:57] + "...", self.max_caption_len)

    @torch.inference_mode()
    def generate(self, texts: list[str], seeds: list[int], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, scheduler: str | None = None,
                 negative_prompt: str | list[str] = "", batch_size: int | None = None) -> list[Image.Image]:
        """texts[i] drawn with noise from seeds[i] (models.duet's one text-to-image path), so each image is the same
        alone or batched with others; negative_prompt: one for all or one per text. None: the checkpoint's sample
        default."""
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        for prompt in dict.fromkeys([*texts, *negatives]):   # each distinct prompt once, the server's included
            if prompt:
                self._check_prompt_length(prompt)
        return to_pil(self.model.generate_images(texts, seeds, num_inference_steps, guidance_scale, scheduler,
                                                 negative_prompt, batch_size))

    def text_to_image(self, text: str, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      seed: int | None = None, save_path: str | Path | None = None, num_images: int = 1,
                      scheduler: str | None = None, negative_prompt: str = ""):
        """Draws an image for a caption.

        Args:
            text: the prompt; longer than model.max_caption_len tokens is truncated with a warning.
            num_inference_steps: denoising steps (>= 1); None: the checkpoint's sample.steps.
            guidance_scale: classifier-free guidance weight; 1.0 turns guidance off (and halves the work);
                None: the checkpoint's sample.guidance_scale.
            seed: image i is drawn from seed+i; None picks a random seed.
            save_path: where to write the image; with num_images > 1, image i goes to <stem>_<i:03d><suffix>.
            num_images: how many images of this prompt, drawn as one batch.
            scheduler: "ddim", "dpm++", "euler", "euler_a" or "ddpm"; None: the
                checkpoint's sample.scheduler.
            negative_prompt: what the image should not show: guidance steers away from it instead of from the
                empty condition. "" (the default) is plain classifier-free guidance.

        Returns:
            A PIL RGB image of model.image_size pixels a side; a list of them when num_images > 1.
        """
        text = check_prompt(text)
        check_steps(num_inference_steps)
        if num_images < 1:
            raise UserError(f"num_images must be at least 1, got {num_images}")
        if save_path is not None:
            check_writable(save_path)
        images = self.generate([text] * num_images, seed_list(seed, num_images), num_inference_steps,
                                guidance_scale, scheduler, negative_prompt)
        if save_path is not None:
            save_path = Path(save_path)
            paths = [save_path] if num_images == 1 else [
                save_path.with_name(f"{save_path.stem}_{i:03d}{save_path.suffix}") for i in range(num_images)]
            for image, path in zip(images, paths):
                save_image(image, path)
        return images[0] if num_images == 1 else images

    def batch_text_to_image(self, texts: list[str], save_dir: str | Path | None = None, batch_size: int = 8,
                            num_inference_steps: int | None = None, guidance_scale: float | None = None,
                            seed: int | None = None, scheduler: str | None = None, name: str = "image",
                            negative_prompt: str = ""):
        """One image per prompt, batch_size prompts at a time on the device.

        Args:
            texts: prompts; texts[i] is drawn from seed+i, so image i equals text_to_image(texts[i], seed=seed+i).
            save_dir: folder for <name>_<i:03d>.png; None keeps the images in memory only.
            batch_size: prompts per denoising batch (memory grows with it).
            num_inference_steps, guidance_scale, seed, scheduler, negative_prompt: as in text_to_image.
            name: file name stem.

        Returns:
            PIL images in prompt order; with save_dir, each one's `filename` is the file it was written to.
        """
        texts = [check_prompt(t) for t in texts]
        check_steps(num_inference_steps)
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        paths = [Path(save_dir) / f"{name}_{i:03d}.png" for i in range(len(texts))] if save_dir is not None else []
        if paths:
            check_writable(paths[0])
        images = self.generate(texts, seed_list(seed, len(texts)), num_inference_steps, guidance_scale, scheduler,
                                negative_prompt, batch_size)
        for image, path in zip(images, paths):
            save_image(image, path)
            image.filename = str(path)       # PIL's own attribute for the file an image lives in
        return images

    # -- image -> text ---------------------------------------------------------------------------------------

    def _images(self, images) -> torch.Tensor:
        """Paths, PIL images or arrays -> (B, 3, H, W) in [-1, 1] on the device."""
        return torch.stack([load_image(image, self.image_size) for image in images]).to(self.device)

    @torch.inference_mode()
    def _caption(self, images: torch.Tensor, options: CaptionOptions, seeds: list[int] | None) -> list[str]:
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds] if seeds else None
        return [c.strip() for c in self.model.caption(images, options, generators)]

    def image_to_text(self, image, num_beams: int = 1, max_length: int | None = None, min_length: int = 0,
                      do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0,
                      repetition_penalty: float = 1.0, seed: int | None = None) -> str:
        """Captions one image (greedy by default).

        Args:
            image: a file path, PIL image or numpy array (uint8 (H, W[, 3|4]) or floats in [0, 1]); resized and
                center-cropped as in training.
            num_beams: > 1 runs beam search, ranked by length-normalised log-likelihood.
            max_length: most tokens, [CLS] and [SEP] included; None: model.max_caption_len (also the ceiling).
            min_length: fewest tokens, [CLS] and [SEP] included ([SEP] is held back until then).
            do_sample: nucleus sampling instead of the most likely tokens.
            top_p: sampling keeps the smallest set of tokens whose probability reaches top_p.
            temperature: sampling sharpness (< 1 sharper, > 1 flatter).
            repetition_penalty: > 1 discourages repeating tokens (CTRL's penalty).
            seed: seeds the sampling; the same seed gives the same caption.

        Returns:
            The caption as a string.
        """
        return self.batch_image_to_text([image], num_beams=num_beams, max_length=max_length,
                                        min_length=min_length, do_sample=do_sample, top_p=top_p,
                                        temperature=temperature, repetition_penalty=repetition_penalty,
                                        seed=seed)[0]

    def batch_image_to_text(self, image_paths: list, batch_size: int = 32, num_beams: int = 1,
                            max_length: int | None = None, min_length: int = 0, do_sample: bool = False,
                            top_p: float = 0.9, temperature: float = 1.0, repetition_penalty: float = 1.0,
                            seed: int | None = None) -> list[str]:
        """Captions many images, batch_size at a time.

        Args:
            image_paths: file paths (or PIL images / arrays) in the order the captions come back.
            batch_size: images per decoding batch.
            the rest: as in image_to_text; with sampling, image i uses seed+i, so caption i equals
                image_to_text(image_paths[i], seed=seed+i, ...).

        Returns:
            One caption per image.
        """
        if isinstance(image_paths, (str, Path)):
            raise UserError(f"batch_image_to_text takes a list of images, got the single path {image_paths}")
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        options = CaptionOptions(num_beams=num_beams, max_length=max_length, min_length=min_length,
                                 do_sample=do_sample, top_p=top_p, temperature=temperature,
                                 repetition_penalty=repetition_penalty).check(self.max_caption_len)
        seeds = seed_list(seed, len(image_paths)) if do_sample else None
        captions = []
        for start in range(0, len(image_paths), batch_size):
            stop = start + batch_size
            captions += self._caption(self._images(image_paths[start:stop]), options,
                                      seeds[start:stop] if seeds else None)
        return captions

    # -- the aligned space -----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Images (paths, PIL images or arrays; one or a list) -> normalised embeddings (N, E) on the device."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return torch.cat([self.model.encode_image(self._images(images[i:i + EMBED_BATCH]))
                          for i in range(0, len(images), EMBED_BATCH)]) if images else self._empty_embeds()

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """Texts (one or a list) -> normalised embeddings (N, E) on the device; long texts are truncated."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        chunks = []
        for i in range(0, len(texts), EMBED_BATCH):
            tokens = self.model.tokenize(texts[i:i + EMBED_BATCH])
            chunks.append(self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
        return torch.cat(chunks) if chunks else self._empty_embeds()

    def _empty_embeds(self) -> torch.Tensor:
        return torch.empty(0, self.config.model.embed_dim, device=self.device)

    @staticmethod
    def _top(query: torch.Tensor, candidates: torch.Tensor, top_k: int | None) -> tuple[list[int], list[float]]:
        scores = (candidates.float() @ query.float().squeeze(0))                 # (N,) cosine similarities
        k = len(scores) if top_k is None else max(0, min(int(top_k), len(scores)))
        best = scores.topk(k)
        return best.indices.tolist(), best.values.tolist()

    def rank_images(self, text: str, images, top_k: int | None = 5) -> tuple[list[int], list[float]]:
        """Orders images by how well they match text.

        Args:
            text: the query.
            images: paths, PIL images or arrays, or the (N, E) tensor embed_images returned (to rank one gallery
                against many queries without re-encoding it).
            top_k: how many to return (None: all).

        Returns:
            (indices into images, cosine similarities), best first.
        """
        image_embeds = images if isinstance(images, torch.Tensor) and images.ndim == 2 else self.embed_images(images)
        return self._top(self.embed_texts([text]), image_embeds.to(self.device), top_k)

    def rank_texts(self, image, texts, top_k: int | None = 5) -> tuple[list[int], list[float]]:
        """Orders texts by how well they describe image (a path, PIL image or array).

        texts may be a list of strings or the (N, E) tensor embed_texts returned. Returns (indices into texts,
        cosine similarities), best first; top_k None returns all."""
        text_embeds = texts if isinstance(texts, torch.Tensor) else self.embed_texts(texts)
        return self._top(self.embed_images([image]), text_embeds.to(self.device), top_k)
