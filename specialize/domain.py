"""A domain's images and prompts: target images from a COCO-format split (the tinted Fashion-MNIST val split by
default) or a plain folder of image files, read as (3, H, W) tensors in [-1, 1] with whatever labels the annotation
carries; the prompts --mode compare generates for; the domain's classifier (fashion)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.images import IMAGE_SUFFIXES, from_uint8
from configs.errors import UserError
from data.coco import load_coco, resolve_split_files
from data.datasets import domain_folder
from data.fashion import FASHION_CLASSES, FASHION_TINTS, fashion_captions
from data.transforms import IMAGE_ERRORS, read_image
from evaluation.fashion_classifier import load_fashion_classifier

LABEL_KEYS = ("label", "label_name", "tint")  # what data/fashion.py stores per image; the classifier reads them


@dataclass
class Target:
    image_id: str
    path: Path
    image: torch.Tensor                       # (3, H, W) in [-1, 1]
    captions: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)


def find_targets(dataset: str, data_root: str | Path, split: str) -> list[tuple[str, Path, list[str], dict]]:
    """(image id, path, captions, labels) of every image a COCO-format split lists, or of every image file in a
    plain folder; cheap (nothing decoded), so bad input fails before a model is loaded. None found is a UserError."""
    folder = domain_folder(dataset, data_root)
    if (folder / f"captions_{split}.json").exists() or (folder / "annotations").is_dir():
        ann_file, image_dir = resolve_split_files(folder, split)
        coco = load_coco(ann_file)
        items = [(str(e["id"]), image_dir / e["file_name"], [a["caption"] for a in coco.imgToAnns.get(e["id"], [])],
                  {k: e[k] for k in LABEL_KEYS if k in e}) for e in coco.dataset["images"]]
    else:
        items = [(p.stem, p, [], {}) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"no target images in {folder} (split '{split}'); give a COCO-format folder or a "
                        f"folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    return items


def read_targets(items: list[tuple[str, Path, list[str], dict]], image_size: int, limit: int = 0) -> list[Target]:
    """The first `limit` readable images (0: all), resized to image_size; unreadable files are skipped."""
    targets = []
    for image_id, path, texts, labels in items:
        try:
            image = from_uint8(read_image(path, image_size))                      # (3, size, size)
        except IMAGE_ERRORS:
            continue
        targets.append(Target(image_id, path, image, texts, labels))
        if limit and len(targets) == limit:
            break
    if not targets:
        raise UserError(f"none of the {len(items)} target images (first: {items[0][1]}) could be read")
    return targets


@dataclass
class DomainPrompt:
    """One generation request: the text, the class it names (None when the domain has none) and its seed."""
    text: str
    seed: int
    label: int | None = None
    label_name: str = ""
    tint: str = ""


def domain_prompts(dataset: str, targets: list[Target], seed: int, images_per_prompt: int, tints_per_class: int,
                   num_prompts: int) -> list[DomainPrompt]:
    """Fashion: 'a photo of a <tint> <class>' for every class and tints_per_class tints; otherwise the first
    num_prompts captions of the targets. Each prompt is repeated over images_per_prompt seeds."""
    if dataset == "fashion":   # (text, label, label name, tint) each
        texts = [(fashion_captions(label, tint)[0], label, name, tint)
                 for label, name in enumerate(FASHION_CLASSES) for tint in list(FASHION_TINTS)[:tints_per_class]]
    else:
        texts = [(t.captions[0], t.labels.get("label"), t.labels.get("label_name", ""), t.labels.get("tint", ""))
                 for t in targets if t.captions][:num_prompts]
    if not texts:
        raise UserError(f"no prompts for --dataset {dataset}: its val split has no captions")
    return [DomainPrompt(text, seed + i * images_per_prompt + k, label, name, tint)
            for i, (text, label, name, tint) in enumerate(texts) for k in range(images_per_prompt)]


def domain_classifier(dataset: str, data_root: str | Path):
    """The fashion set's classifier (trained and cached under <data_root>/cache/ on first use), else None."""
    if dataset != "fashion":
        return None
    classifier = load_fashion_classifier(data_root)
    if classifier.test_accuracy is not None:
        logging.getLogger(__name__).info("fashion classifier: %.1f%% test accuracy", 100 * classifier.test_accuracy)
    return classifier
