"""ImageTextGenerator, the Python API for a trained Duet checkpoint (text->image, image->text, retrieval), and a
CLI that only parses, calls it and writes files.

    python inference.py --mode t2i --text "a red circle on the left" --output out.png --steps 50
    python inference.py --mode i2t --image photos/ --output captions.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from configs.errors import UserError
from data.transforms import IMAGE_ERRORS, read_image, resize_center_crop, to_rgb
from models.caption_search import CaptionOptions, decode_captions
from models.checkpoint import find_latest_checkpoint, load_checkpoint
from models.device import resolve_device

logger = logging.getLogger("duet.inference")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
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


def check_outputs(paths: list[Path], overwrite: bool, input_folder: Path | None) -> None:
    """The CLI never replaces a file without --overwrite, nor writes into the folder it reads images from."""
    for path in paths:
        if input_folder is not None and path.resolve().is_relative_to(input_folder.resolve()):
            raise UserError(f"{path} is inside the input folder {input_folder}; choose an --output elsewhere")
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --output")


def check_writable(path: str | Path) -> Path:
    """Makes path's folder if needed; UserError when the file cannot be written there."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name such as {path / 'out.png'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {path.parent} ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied; choose another --output")
    return path


def load_image(image, size: int) -> torch.Tensor:
    """A path, PIL image or numpy array -> (3, size, size) float in [-1, 1], preprocessed as in training
    (data.transforms: RGB conversion, shorter-side resize, center crop).

    numpy arrays: uint8 (H, W), (H, W, 3) or (H, W, 4), or floats in [0, 1]."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            pixels = read_image(path, size)  # the training path itself, JPEG draft decoding included
        except IMAGE_ERRORS as err:
            raise UserError(f"cannot read image {path}: {str(err).splitlines()[0] or type(err).__name__} "
                            "(not an image, or a truncated/damaged file)") from None
    else:
        if isinstance(image, np.ndarray):
            array = image
            if array.dtype != np.uint8:
                array = (np.clip(array.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            try:
                image = Image.fromarray(array)
            except TypeError:
                raise UserError(f"cannot use an array of shape {image.shape} as an image; "
                                "give (H, W), (H, W, 3) or (H, W, 4)") from None
        if not isinstance(image, Image.Image):
            raise UserError(f"cannot use a {type(image).__name__} as an image; give a path, PIL image or numpy array")
        try:
            pixels = resize_center_crop(to_rgb(image), size)
        except IMAGE_ERRORS as err:  # a lazily loaded PIL image can still turn out truncated here
            raise UserError(f"cannot read the image: {str(err).splitlines()[0]}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0   # (3, H, W)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """images (B, 3, H, W) in [-1, 1] -> B RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def save_image(image: Image.Image, path: str | Path) -> Path:
    path = check_writable(path)
    try:
        image.save(path)
    except (ValueError, KeyError):
        raise UserError(f"cannot save {path}: unknown image type '{path.suffix}'; use .png or .jpg") from None
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err})") from None
    return path


def seed_list(seed: int | None, count: int) -> list[int]:
    """seed, seed+1, ...: image i of a call always gets seed+i. None draws a fresh base seed."""
    base = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    return [base + i for i in range(count)]


class ImageTextGenerator:
    """A trained Duet checkpoint, ready for generation, captioning and retrieval.

    Args:
        checkpoint: a checkpoint folder (outputs/<run>/best_model, .../checkpoint-000500); None takes the newest
            one under outputs/.
        device: "cpu", "cuda", "cuda:1" or None (CUDA when available, else CPU).
        lora: a LoRA adapter folder (written by the fine-tuning step) applied on top of the checkpoint.
        lora_scale: how strongly the adapter acts (1.0: as trained, 0.0: the base model).

    Raises:
        UserError: no checkpoint, a damaged or mismatched one (the message names the field), CUDA asked for but
            absent, or an adapter that does not fit.

    Sampling uses the EMA UNet when the checkpoint has one. Every image a call makes gets its own generator,
    seeded seed+i, so batched output equals one-by-one output and a seed reproduces an image exactly.
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str | torch.device | None = None,
                 lora: str | Path | None = None, lora_scale: float = 1.0):
        self.device = resolve_device(device)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else find_latest_checkpoint()
        if not self.checkpoint.is_dir():
            raise UserError(f"checkpoint folder {self.checkpoint} does not exist; give a folder such as "
                            "outputs/<run>/best_model")
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
    def _generate(self, texts: list[str], seeds: list[int], num_inference_steps: int | None,
                  guidance_scale: float | None, scheduler: str | None,
                  negative_prompts: list[str] | None = None) -> list[Image.Image]:
        """One batch: texts[i] drawn with noise from seeds[i], guided away from negative_prompts[i] ("" or None:
        the trained null condition); None means the checkpoint's sample default. serving/ calls this directly."""
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        images = self.model.generate_images(texts, scheduler, num_inference_steps, guidance_scale, generators,
                                            negative_texts=negative_prompts)
        return to_pil(images)

    def text_to_image(self, text: str, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      seed: int | None = None, save_path: str | Path | None = None, num_images: int = 1,
                      scheduler: str | None = None):
        """Draws an image for a caption.

        Args:
            text: the prompt; longer than model.max_caption_len tokens is truncated with a warning.
            num_inference_steps: denoising steps (>= 1); None: the checkpoint's sample.steps.
            guidance_scale: classifier-free guidance weight; 1.0 turns guidance off (and halves the work);
                None: the checkpoint's sample.guidance_scale.
            seed: image i is drawn from seed+i; None picks a random seed.
            save_path: where to write the image; with num_images > 1, image i goes to <stem>_<i:03d><suffix>.
            num_images: how many images of this prompt, drawn as one batch.
            scheduler: "ddim", "dpm++", "euler" or "ddpm" ("euler" or "heun" for a flow model); None: the
                checkpoint's sample.scheduler.

        Returns:
            A PIL RGB image of model.image_size pixels a side; a list of them when num_images > 1.
        """
        text = check_prompt(text)
        check_steps(num_inference_steps)
        if num_images < 1:
            raise UserError(f"num_images must be at least 1, got {num_images}")
        if save_path is not None:
            check_writable(save_path)
        self._check_prompt_length(text)
        images = self._generate([text] * num_images, seed_list(seed, num_images), num_inference_steps,
                                guidance_scale, scheduler)
        if save_path is not None:
            save_path = Path(save_path)
            paths = [save_path] if num_images == 1 else [
                save_path.with_name(f"{save_path.stem}_{i:03d}{save_path.suffix}") for i in range(num_images)]
            for image, path in zip(images, paths):
                save_image(image, path)
        return images[0] if num_images == 1 else images

    def batch_text_to_image(self, texts: list[str], save_dir: str | Path | None, batch_size: int = 8,
                            num_inference_steps: int | None = None, guidance_scale: float | None = None,
                            seed: int | None = None, scheduler: str | None = None, name: str = "image"):
        """One image per prompt, batch_size prompts at a time on the device.

        Args:
            texts: prompts; texts[i] is drawn from seed+i, so image i equals text_to_image(texts[i], seed=seed+i).
            save_dir: folder for <name>_<i:03d>.png; None keeps the images in memory only.
            batch_size: prompts per denoising batch (memory grows with it).
            num_inference_steps, guidance_scale, seed, scheduler: as in text_to_image.
            name: file name stem.

        Returns:
            (images, paths): PIL images in prompt order and the files written (empty when save_dir is None).
        """
        texts = [check_prompt(t) for t in texts]
        check_steps(num_inference_steps)
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        paths = [Path(save_dir) / f"{name}_{i:03d}.png" for i in range(len(texts))] if save_dir is not None else []
        if paths:
            check_writable(paths[0])
        for text in texts:
            self._check_prompt_length(text)
        seeds, images = seed_list(seed, len(texts)), []
        for start in range(0, len(texts), batch_size):
            stop = start + batch_size
            images += self._generate(texts[start:stop], seeds[start:stop], num_inference_steps, guidance_scale,
                                     scheduler)
        for image, path in zip(images, paths):
            save_image(image, path)
        return images, paths

    # -- image -> text ---------------------------------------------------------------------------------------

    def _images(self, images) -> torch.Tensor:
        """Paths, PIL images or arrays -> (B, 3, H, W) in [-1, 1] on the device."""
        return torch.stack([load_image(image, self.image_size) for image in images]).to(self.device)

    @torch.inference_mode()
    def _caption(self, images: torch.Tensor, options: CaptionOptions, seeds: list[int] | None) -> list[str]:
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds] if seeds else None
        tokens = self.model.image_encoder(images)["tokens"]
        token_ids, _ = decode_captions(self.model.caption_decoder, tokens, options, generators)
        return [c.strip() for c in self.model.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

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


# -- CLI -----------------------------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """Keeps the CLI's stderr to our own lines: no weight-loading progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one `error:` line) instead of usage text and SystemExit."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate images from text and captions from images with a Duet "
                                            "checkpoint.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under outputs/)")
    p.add_argument("--mode", choices=("t2i", "i2t", "both"),
                   help="t2i: --text -> image; i2t: --image -> caption; both: each with one model load (without "
                        "--image, the generated images are captioned). Default: from --text/--image")
    p.add_argument("--text", help="a prompt, or a .txt file of prompts (one image per line)")
    p.add_argument("--image", help="an image file or a folder of images")
    p.add_argument("--output", help="t2i: image path (default generated.png; several images: <stem>_000.png ...); "
                                    "i2t of a folder: captions .json or .csv (default captions.json)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's sample.steps)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="image i uses seed+i (default: random)")
    p.add_argument("--num-images", type=int, default=1, help="images of a single prompt")
    p.add_argument("--scheduler", help="ddim, dpm++, euler or ddpm (default: the checkpoint's sample.scheduler)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search captions")
    p.add_argument("--sample", action="store_true", help="nucleus-sample captions instead of the most likely")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--lora", help="LoRA adapter folder to apply")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    return p.parse_args(argv)


def read_prompts(text: str) -> list[str]:
    """--text: one prompt, or the non-blank lines of a .txt file."""
    if not text.lower().endswith(".txt"):
        return [check_prompt(text)]
    path = Path(text)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def list_images(image: str) -> tuple[list[Path], bool]:
    """--image: (files, is_folder); a folder gives its image files, sorted."""
    path = Path(image)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files, True
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    return [path], False


def write_captions(path: Path, files: list, captions: list[str]) -> None:
    """JSON list of {"image", "caption"}, or a CSV with those columns, by path's suffix."""
    rows = [{"image": str(f), "caption": c} for f, c in zip(files, captions)]
    try:
        with open(path, "w", newline="") as f:
            if path.suffix.lower() == ".csv":
                writer = csv.DictWriter(f, fieldnames=["image", "caption"])
                writer.writeheader()
                writer.writerows(rows)
            else:
                json.dump(rows, f, indent=2)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err})") from None


def plan_outputs(args: argparse.Namespace, mode: str) -> tuple[Path, Path | None]:
    """(image output, captions file) from --output, whose suffix says which one it names; the captions file is
    None when captions are only printed (one image, no .json/.csv --output)."""
    image_out, captions_out = Path("generated.png"), None
    if args.output:
        output = Path(args.output)
        if output.suffix.lower() in (".json", ".csv"):
            if mode == "t2i":
                raise UserError(f"--output {output} is a captions file; text-to-image writes an image (.png, .jpg)")
            captions_out = output
        elif output.suffix.lower() in IMAGE_SUFFIXES:
            if mode == "i2t":
                raise UserError(f"--output {output} is an image; captions go to a .json or .csv file")
            image_out = output
        else:
            raise UserError(f"--output {output}: use an image suffix (.png, .jpg) or .json/.csv for captions")
    return image_out, captions_out


def run(args: argparse.Namespace) -> None:
    if args.text is None and args.image is None:
        raise UserError("nothing to do: give --text (text-to-image) and/or --image (image-to-text)")
    mode = args.mode or ("both" if args.text and args.image else "t2i" if args.text else "i2t")
    if mode in ("t2i", "both") and args.text is None:
        raise UserError(f"--mode {mode} needs --text (a prompt or a .txt file of prompts)")
    if mode == "i2t" and args.image is None:
        raise UserError("--mode i2t needs --image (an image file or a folder); or give --text for text-to-image")
    prompts = read_prompts(args.text) if mode != "i2t" else []
    files, is_folder = list_images(args.image) if args.image else ([], False)
    check_steps(args.steps)
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.num_images > 1 and len(prompts) > 1:
        raise UserError("--num-images works with a single prompt; a prompt file gives one image per prompt")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    image_out, captions_out = plan_outputs(args, mode)
    if is_folder or (mode == "both" and not files and len(prompts) * args.num_images > 1):  # several captions
        captions_out = captions_out or Path("captions.json")
    count = len(prompts) * args.num_images
    image_files = [] if mode == "i2t" else [image_out] if count == 1 else [
        image_out.with_name(f"{image_out.stem}_{i:03d}{image_out.suffix}") for i in range(count)]
    # refused before check_writable makes any folder: nothing may appear inside the input folder
    check_outputs(image_files + ([captions_out] if captions_out else []), args.overwrite,
                  Path(args.image) if is_folder else None)
    if mode != "i2t":
        check_writable(image_out)
    if captions_out is not None:
        check_writable(captions_out)

    generator = ImageTextGenerator(args.checkpoint, device=args.device, lora=args.lora, lora_scale=args.lora_scale)
    if mode != "i2t":
        # Image i of the run uses seed+i, whether it is the i-th prompt or the i-th image of one prompt.
        images, _ = generator.batch_text_to_image(prompts * args.num_images, None, batch_size=args.batch_size,
                                                  num_inference_steps=args.steps, seed=args.seed,
                                                  guidance_scale=args.guidance_scale, scheduler=args.scheduler)
        written = image_files
        for image, path in zip(images, written):
            save_image(image, path)
            print(f"wrote {path}")
        files = files or (written if mode == "both" else [])  # both without --image: caption what was drawn
    if mode != "t2i":
        captions = generator.batch_image_to_text(files, batch_size=args.batch_size, num_beams=args.num_beams,
                                                 do_sample=args.sample, top_p=args.top_p,
                                                 temperature=args.temperature, seed=args.seed)
        if captions_out is not None:
            write_captions(captions_out, files, captions)
            print(f"wrote {len(captions)} captions to {captions_out}")
        else:
            print(captions[0])


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet_libraries()
    handler = logging.StreamHandler(sys.stderr)  # warnings (a truncated prompt) as one plain line
    logger.addHandler(handler)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
