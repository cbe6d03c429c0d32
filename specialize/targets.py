"""Target images of a domain: a COCO-format split (the tinted Fashion-MNIST val split by default) or a plain
folder of image files, read as (3, H, W) tensors in [-1, 1] with whatever labels the annotation carries."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.images import IMAGE_SUFFIXES, from_uint8
from configs.errors import UserError

LABEL_KEYS = ("label", "label_name", "tint")  # what data/fashion.py stores per image; the classifier reads them


@dataclass
class Target:
    image_id: str
    path: Path
    image: torch.Tensor                       # (3, H, W) in [-1, 1]
    captions: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)


def _read(path: Path, size: int) -> torch.Tensor | None:
    from data.transforms import IMAGE_ERRORS, read_image

    try:
        pixels = read_image(path, size)                                     # (size, size, 3) uint8
    except IMAGE_ERRORS:
        return None
    return from_uint8(pixels)


def _coco_entries(folder: Path, split: str) -> tuple[list[dict], dict[int, list[str]], Path] | None:
    """(image entries, captions by image id, image folder) when folder holds a COCO-format split, else None."""
    from data.coco import load_coco, resolve_split_files

    has_split = (folder / f"captions_{split}.json").exists() or (folder / "annotations").is_dir()
    if not has_split:
        return None
    ann_file, image_dir = resolve_split_files(folder, split)
    coco = load_coco(ann_file)
    captions = {img_id: [a["caption"] for a in anns] for img_id, anns in coco.imgToAnns.items()}
    return coco.dataset["images"], captions, image_dir


def find_targets(dataset: str, data_root: str | Path, split: str) -> list[tuple[str, Path, list[str], dict]]:
    """(image id, path, captions, labels) of every image a split lists, or of every image file in a plain
    folder; cheap (nothing decoded), so bad input fails before a model is loaded. None found is a UserError."""
    from data.datasets import domain_folder

    folder = domain_folder(dataset, data_root)
    coco = _coco_entries(folder, split)
    if coco is not None:
        entries, captions, image_dir = coco
        items = [(str(e["id"]), image_dir / e["file_name"], captions.get(e["id"], []),
                  {k: e[k] for k in LABEL_KEYS if k in e}) for e in entries]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items = [(p.stem, p, [], {}) for p in files]
    if not items:
        raise UserError(f"no target images in {folder} (split '{split}'); give a COCO-format folder or a "
                        f"folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    return items


def read_targets(items: list[tuple[str, Path, list[str], dict]], image_size: int, limit: int = 0) -> list[Target]:
    """The first `limit` readable images (0: all), resized to image_size; unreadable files are skipped."""
    targets = []
    for image_id, path, texts, labels in items:
        image = _read(path, image_size)
        if image is None:
            continue
        targets.append(Target(image_id, path, image, texts, labels))
        if limit and len(targets) == limit:
            break
    if not targets:
        raise UserError(f"none of the {len(items)} target images (first: {items[0][1]}) could be read")
    return targets


def load_targets(dataset: str, data_root: str | Path, split: str, image_size: int, limit: int = 0) -> list[Target]:
    """find_targets + read_targets."""
    return read_targets(find_targets(dataset, data_root, split), image_size, limit)
