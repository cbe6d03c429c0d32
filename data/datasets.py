"""Picks and builds the train/val caption datasets from cfg.data: COCO 2017, the embedded world, fashion or a folder."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from configs.errors import UserError
from data.coco import CocoCaptions, coco_missing_error, resolve_split_files

NAMED_DATASETS = ("coco", "embedded", "fashion")


def coco_folder(cfg) -> Path:
    return Path(cfg.data.root) / "coco" / "coco2017"


def resolve_dataset_name(cfg) -> str:
    """What cfg.data.dataset means here: "coco", "embedded", "fashion" or the COCO-format folder given.

    "auto" is COCO when <root>/coco/coco2017 exists, else the embedded world.
    """
    name = cfg.data.dataset
    if name == "auto":
        return "coco" if coco_folder(cfg).is_dir() else "embedded"
    if name in NAMED_DATASETS:
        return name
    if not Path(name).is_dir():
        raise UserError(f"data.dataset '{name}' is neither auto, {', '.join(NAMED_DATASETS)} nor an existing folder "
                        f"(a COCO-format folder holds captions_train.json and train/)")
    return name


def dataset_folder(cfg, name: str) -> Path:
    """The COCO-format folder of a resolved dataset name, generating the embedded or fashion set if needed."""
    root = Path(cfg.data.root)
    if name == "coco":
        folder = coco_folder(cfg)
        for split in (cfg.data.train_split, cfg.data.val_split):
            expected = (folder / f"{split}2017", folder / "annotations" / f"captions_{split}2017.json")
            if not all(path.exists() for path in expected):
                raise coco_missing_error(folder, split)
        return folder
    if name == "embedded":
        from data.embedded import ensure_embedded  # the generator is heavy; only import it when asked for

        return Path(ensure_embedded(root, cfg.data.embedded_train_images, cfg.data.embedded_val_images,
                                    cfg.data.embedded_seed))
    if name == "fashion":
        from data.fashion import ensure_fashion

        return ensure_fashion(root, cfg.data.fashion_train_images, cfg.data.fashion_val_images, cfg.data.fashion_tints)
    return Path(name)


def _cache_name(name: str) -> str:
    """A folder dataset is cached under its base name plus a hash of its path, so two 'images/' never collide."""
    if name in NAMED_DATASETS:
        return name
    path = str(Path(name).resolve())
    return f"{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


def build_split(cfg, name: str, folder: Path, split: str, tokenizer, limit: int, caption_mode: str) -> CocoCaptions:
    """One split of a COCO-format folder, from the image cache when cfg.data.use_cache is set."""
    ann_file, image_dir = resolve_split_files(folder, split)
    common = dict(tokenizer=tokenizer, image_size=cfg.model.image_size, max_caption_len=cfg.model.max_caption_len,
                  caption_mode=caption_mode, limit=limit, seed=cfg.train.seed)
    if not cfg.data.use_cache:
        return CocoCaptions(ann_file, image_dir, **common)
    from data.cache import load_cached_captions

    processes = min(os.cpu_count() or 1, max(2, cfg.train.num_workers))
    return load_cached_captions(ann_file, image_dir, Path(cfg.data.root) / "cache", _cache_name(name), split,
                                processes=processes, **common)


def build_datasets(cfg, tokenizer) -> tuple[CocoCaptions, CocoCaptions]:
    """(train, val) datasets for cfg.data; batch them with data.collate.collate_captions.

    Train follows cfg.data.caption_mode. Val always holds one caption per image (random mode, fixed unless
    set_epoch is called): in pairs mode an unshuffled val batch would hold five copies of each image, which
    makes in-batch retrieval meaningless. All references of an image: val.image_captions(position).
    """
    name = resolve_dataset_name(cfg)
    folder = dataset_folder(cfg, name)
    train = build_split(cfg, name, folder, cfg.data.train_split, tokenizer, cfg.data.limit_train,
                        cfg.data.caption_mode)
    val = build_split(cfg, name, folder, cfg.data.val_split, tokenizer, cfg.data.limit_val, "random")
    return train, val


def caption_token_ids(dataset: CocoCaptions) -> list[int]:
    """Sorted ids the dataset's captions use plus the tokenizer's CLS, SEP, PAD and UNK (the decoder's output set)."""
    used = np.unique(dataset.input_ids[dataset.attention_mask.astype(bool)])
    return sorted(set(used.tolist()) | set(dataset.special_ids))
