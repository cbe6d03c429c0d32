"""Folders of images with a caption file beside each, as kohya's sd-scripts train on: photo.png + photo.txt (or
photo.caption). Subfolders are read too (kohya's "10_name" repeat folders); each non-empty line is one caption.
"""
from __future__ import annotations

from pathlib import Path

from common.images import IMAGE_SUFFIXES
from data.image_files import ImageFiles
from data.listing import Listing

CAPTION_SUFFIXES = (".txt", ".caption")  # the first one present is read


def caption_file(image: Path) -> Path | None:
    return next((image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()), None)


def has_caption_files(folder: Path) -> bool:
    """Whether some image under folder has a caption file beside it (stops at the first)."""
    return any(caption_file(p) is not None for p in _images(folder))


def read_caption_folder(folder: Path) -> Listing:
    """Every image under folder, in sorted order, with the lines of its caption file; an image without one, or
    whose file is not UTF-8 text, is counted in skipped."""
    names, captions, skipped = [], [], 0
    for image in sorted(_images(folder)):
        path = caption_file(image)
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path else None
        except UnicodeDecodeError:
            lines = None
        if lines is None:
            skipped += 1
            continue
        names.append(image.relative_to(folder).as_posix())
        captions.append([line.strip() for line in lines if line.strip()])
    return Listing(names, captions, ImageFiles(folder), str(folder), skipped)


def _images(folder: Path):
    return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
