"""Picks and builds the train/val caption datasets from cfg.data: COCO 2017, the embedded world, fashion, or a
source of another format (data/sources.py: an image folder, a CSV, caption files, a saved HF dataset); webdataset
shards stream through data/shards.py instead."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from configs.errors import UserError
from data.coco import CocoCaptions, coco_missing_error, resolve_split_files
from data.shard_files import expand_shards, is_shard_spec

NAMED_DATASETS = ("coco", "embedded", "fashion")
GENERATED_DATASETS = ("embedded", "fashion")  # written by this project, one folder per parameter set


def coco_folder(cfg) -> Path:
    return Path(cfg.data.root) / "coco" / "coco2017"


def resolve_dataset_name(cfg) -> str:
    """What cfg.data.dataset means here: "coco", "embedded", "fashion", or the folder, file or shard pattern given.

    "auto" is COCO when <root>/coco/coco2017 exists, else the embedded world.
    """
    name = cfg.data.dataset
    if name == "auto":
        return "coco" if coco_folder(cfg).is_dir() else "embedded"
    if name in NAMED_DATASETS:
        return name
    if is_shard_spec(name) and not Path(name).exists():
        expand_shards(name)   # a pattern that names missing files fails here, before any work
    elif not Path(name).exists():
        raise UserError(f"data.dataset '{name}' is neither auto, {', '.join(NAMED_DATASETS)} nor an existing folder, "
                        f"file or shard pattern (a COCO-format folder holds captions_train.json and train/; README "
                        f"lists the other formats)")
    return name


def resolve_format(cfg, name: str) -> str:
    """The format of a resolved dataset name (one of configs.schema.DATA_FORMATS but auto): cfg.data.format, or
    what its files show when that is auto."""
    from data.sources import detect_format

    fmt = cfg.data.format
    if name in NAMED_DATASETS:
        if fmt not in ("auto", "coco"):
            raise UserError(f"the {name} dataset is in COCO format, not data.format={fmt}; leave data.format=auto")
        return "coco"
    return detect_format(name) if fmt == "auto" else fmt


def uses_stream(cfg) -> bool:
    """Whether cfg.data names webdataset shards, which train through data.shards.build_stream, not build_datasets."""
    name = resolve_dataset_name(cfg)
    return resolve_format(cfg, name) == "webdataset"


def dataset_folder(cfg, name: str, create: bool = True) -> Path:
    """The folder of a resolved dataset name (for a CSV file or a shard pattern: that path), which nothing writes
    into. create: generates the embedded or fashion set if it is not there yet and checks COCO's files; without
    it, only says where the folder is or will be."""
    root, d = Path(cfg.data.root), cfg.data
    if name == "coco":
        folder = coco_folder(cfg)
        for split in (d.train_split, d.val_split) if create else ():
            expected = (folder / f"{split}2017", folder / "annotations" / f"captions_{split}2017.json")
            if not all(path.exists() for path in expected):
                raise coco_missing_error(folder, split)
        return folder
    if name == "embedded":
        # the generator is heavy; only imported when asked for
        from data.embedded import embedded_folder, ensure_embedded

        make = ensure_embedded if create else embedded_folder
        return Path(make(root, d.embedded_train_images, d.embedded_val_images, d.embedded_seed,
                         side=d.embedded_image_size))
    if name == "fashion":
        from data.fashion import ensure_fashion, fashion_folder

        make = ensure_fashion if create else fashion_folder
        return make(root, d.fashion_train_images, d.fashion_val_images, d.fashion_tints)
    return Path(name)


def domain_folder(dataset: str, root: str | Path) -> Path:
    """The folder of a domain a trained model is used on (specialize.py): "fashion" is the newest fashion set
    already under root (a training run may have asked for other counts; it is never regenerated), else one with
    the default counts; anything else must be an existing folder."""
    if dataset == "fashion":
        from configs.schema import DuetConfig
        from data.fashion import complete_fashion_sets

        sets = complete_fashion_sets(root)
        if sets:
            return sets[0]
        cfg = DuetConfig()
        cfg.data.root = str(root)
        return dataset_folder(cfg, "fashion")
    folder = Path(dataset)
    if not folder.is_dir():
        raise UserError(f"--dataset {dataset} is neither 'fashion' nor an existing folder")
    return folder


def safe_dataset_name(name: str) -> str:
    """A resolved dataset's name as one safe folder name: a named dataset is itself; a folder or file is its base
    name plus a hash of its resolved path, so two 'images/' never collide and an absolute path never escapes a
    parent (a shard pattern's braces and colons become '_')."""
    if name in NAMED_DATASETS:
        return name
    path = str(Path(name).resolve())
    base = Path(path).name or "dataset"
    if is_shard_spec(name):
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    return f"{base}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


def cache_name(name: str, folder: Path, fmt: str = "coco") -> str:
    """What a dataset's image cache is keyed by: a generated set's folder name carries its parameters, so the
    default, tiny and test worlds never share (and so never evict) each other's cache; a folder read in another
    format than COCO has its own."""
    if name in GENERATED_DATASETS:
        return Path(folder).name
    return safe_dataset_name(name) + ("" if fmt == "coco" else f"-{fmt}")


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether path is folder or inside it, after resolving both (symlinks, '..', relative paths)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def refuse_inside_dataset(path: str | Path, folder: str | Path, what: str, fix: str) -> None:
    """UserError when an output path is, or is inside, a dataset folder (dataset_folder): nothing may write into a
    user's data."""
    if is_inside(path, folder):
        raise UserError(f"{what} {path} is inside the dataset folder {folder}, which is never written to; {fix}")


def skipped_at_build(dataset) -> int:
    """Images a split left out when it was built: the cache drops unreadable ones (CachedCocoCaptions), so they
    never reach a batch; the uncached reader finds them only when read, as None samples (0 here). Entries of a
    source's listing with no image name or no caption that is text (skipped_entries) are left out either way."""
    return int(getattr(dataset, "skipped_images", 0)) + int(getattr(dataset, "skipped_entries", 0))


def build_split(cfg, name: str, folder: Path, split: str, tokenizer, limit: int, caption_mode: str,
                whole: bool = False) -> CocoCaptions:
    """One split of a dataset (folder: dataset_folder(cfg, name)), from the image cache when cfg.data.use_cache is
    set. Its `note` says how the split was made when no file said (the held-out val), else it is "". whole: read
    a shard set's train split whole (it is streamed otherwise)."""
    fmt = resolve_format(cfg, name)
    common = dict(tokenizer=tokenizer, image_size=cfg.model.image_size, max_caption_len=cfg.model.max_caption_len,
                  caption_mode=caption_mode, seed=cfg.train.seed)
    source = None
    if fmt == "coco":
        ann_file, image_dir = resolve_split_files(folder, split)
    else:
        from data.sources import read_split

        source = read_split(fmt, name, split, cfg.data, limit, whole)
    if not cfg.data.use_cache:
        dataset = (CocoCaptions(ann_file, image_dir, limit=limit, **common) if source is None else
                   CocoCaptions.from_index(source.index, source.images, source.identity, **common))
    else:
        from data.cache import load_cached_captions, load_cached_split

        cache_root = Path(cfg.data.root) / "cache"
        refuse_inside_dataset(cache_root, folder, "the image cache", "set data.root to another folder or "
                              "data.use_cache=false")
        # the shards' val images are held in memory: pickling them to a pool would copy them per image
        processes = 1 if fmt == "webdataset" else min(os.cpu_count() or 1, max(2, cfg.train.num_workers))
        where = dict(cache_root=cache_root, dataset_name=cache_name(name, folder, fmt), processes=processes)
        dataset = (load_cached_captions(ann_file, image_dir, split=split, limit=limit, **where, **common)
                   if source is None else
                   load_cached_split(source, split_name=split, limit=limit, **where, **common))
    dataset.note = source.note if source is not None else ""
    dataset.skipped_entries = source.skipped if source is not None else 0
    return dataset


def build_datasets(cfg, tokenizer, whole: bool = False) -> tuple[CocoCaptions, CocoCaptions]:
    """(train, val) datasets for cfg.data; batch them with data.collate.collate_captions.

    Train follows cfg.data.caption_mode. Val always holds one caption per image (random mode, fixed unless
    set_epoch is called): in pairs mode an unshuffled val batch would hold five copies of each image, which
    makes in-batch retrieval meaningless. All references of an image: val.image_captions(position).
    Webdataset shards are streamed (data.shards.build_stream) unless `whole` reads their train split into the image
    cache (the diffusion phase needs random access).
    """
    name = resolve_dataset_name(cfg)
    if resolve_format(cfg, name) == "webdataset" and not whole:
        raise UserError(f"{name} holds webdataset shards, which are streamed (data.shards.build_stream), not read "
                        f"whole by build_datasets")
    folder = dataset_folder(cfg, name)
    train = build_split(cfg, name, folder, cfg.data.train_split, tokenizer, cfg.data.limit_train,
                        cfg.data.caption_mode, whole)
    val = build_split(cfg, name, folder, cfg.data.val_split, tokenizer, cfg.data.limit_val, "random")
    return train, val


def caption_token_ids(dataset: CocoCaptions) -> list[int]:
    """Sorted ids the dataset's captions use plus the tokenizer's CLS, SEP, PAD and UNK (the decoder's output set)."""
    used = np.unique(dataset.input_ids[dataset.attention_mask.astype(bool)])
    return sorted(set(used.tolist()) | set(dataset.special_ids))
