"""The command line of ImageTextGenerator (pipelines/generator.py): parses, calls it and writes files; no tensor
math here. `from inference import ImageTextGenerator` is the import users were promised and keeps working.

    python inference.py --mode t2i --text "a red circle on the left" --out out.png --steps 50
    python inference.py --mode i2t --image photos/ --out captions.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from common.images import IMAGE_SUFFIXES
from configs.errors import UserError
from models.checkpoint import quiet_library_progress
from pipelines.generator import ImageTextGenerator, check_prompt, check_steps, logger
from pipelines.images import check_writable, save_image

__all__ = ["ImageTextGenerator", "main"]


def check_outputs(paths: list[Path], overwrite: bool, input_folder: Path | None) -> None:
    """The CLI never replaces a file without --overwrite, nor writes into the folder it reads images from."""
    for path in paths:
        if input_folder is not None and path.resolve().is_relative_to(input_folder.resolve()):
            raise UserError(f"{path} is inside the input folder {input_folder}; choose an --out elsewhere")
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one `error:` line) instead of usage text and SystemExit."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate images from text and captions from images with a Duet checkpoint.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under outputs/)")
    p.add_argument("--mode", choices=("t2i", "i2t", "both"),
                   help="t2i: --text -> image; i2t: --image -> caption; both: each with one model load (without "
                        "--image, the generated images are captioned). Default: from --text/--image")
    p.add_argument("--text", help="a prompt, or a .txt file of prompts (one image per line)")
    p.add_argument("--image", help="an image file or a folder of images")
    p.add_argument("--out", "--output", dest="out",
                   help="t2i: image path (default generated.png; several images: <stem>_000.png ...); "
                        "i2t of a folder: captions .json or .csv (default captions.json)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's sample.steps)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--negative-prompt", default="", help="what images should not show (guidance steers away from it)")
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
    """(image output, captions file) from --out, whose suffix says which one it names; the captions file is
    None when captions are only printed (one image, no .json/.csv --out)."""
    image_out, captions_out = Path("generated.png"), None
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() in (".json", ".csv"):
            if mode == "t2i":
                raise UserError(f"--out {out} is a captions file; text-to-image writes an image (.png, .jpg)")
            captions_out = out
        elif out.suffix.lower() in IMAGE_SUFFIXES:
            if mode == "i2t":
                raise UserError(f"--out {out} is an image; captions go to a .json or .csv file")
            image_out = out
        else:
            raise UserError(f"--out {out}: use an image suffix (.png, .jpg) or .json/.csv for captions")
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
        images = generator.batch_text_to_image(prompts * args.num_images, None, batch_size=args.batch_size,
                                                  num_inference_steps=args.steps, seed=args.seed,
                                                  guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                                                  negative_prompt=args.negative_prompt)
        for image, path in zip(images, image_files):
            save_image(image, path)
            print(f"wrote {path}")
        files = files or (image_files if mode == "both" else [])  # both without --image: caption what was drawn
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
    quiet_library_progress()
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
