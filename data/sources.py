"""Sources: what data.dataset points at -> the splits the trainer reads, each a CaptionIndex plus an image store.

Formats (data.format; detected when auto): coco (data/coco.py), imagefolder (metadata.jsonl or metadata.csv,
Hugging Face's convention), csv (open_clip's CSV/TSV), captions (a caption file beside each image, kohya's), hf (a
dataset saved with save_to_disk) and webdataset (tar shards: streamed by data/shards.py, only their val split is
read here). Every split read here becomes the same CocoCaptions, so the image cache and all downstream code work
unchanged. Without a val split in the files, a fixed-seed data.val_fraction of the images is held out.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.errors import UserError
from data.caption_files import has_caption_files, read_caption_folder
from data.coco import CaptionIndex
from data.hf_dataset import is_saved_dataset, read_saved_split, split_names
from data.listing import Listing, split_aliases, split_folder
from data.shard_files import HOLDOUT_SEED, find_shard_set, is_shard_spec, read_split_shards
from data.tables import CSV_SUFFIXES, metadata_file, read_image_folder, read_table

logger = logging.getLogger(__name__)

_LAYOUTS = ("captions_train.json and train/ (COCO), metadata.jsonl or metadata.csv (imagefolder), .tar shards "
            "(webdataset), dataset_dict.json or state.json (save_to_disk), or images with a .txt or .caption file "
            "beside each")


@dataclass
class SplitSource:
    """One split of a source, as CocoCaptions.from_index and the image cache take it."""
    index: CaptionIndex
    images: object      # an image store (data/image_files.py, data/hf_dataset.py)
    identity: dict      # what it was read from, with a hash of its images and captions: the caches key on it
    where: str          # the file or folder, for messages
    note: str = ""      # how the split was made when no file says (the held-out val), for the log
    skipped: int = 0    # entries left out: no image, or no caption that is text


def detect_format(name: str) -> str:
    """The format of a path or pattern, from the files it holds (data.format=auto)."""
    if is_shard_spec(name):
        return "webdataset"
    path = Path(name)
    if path.is_file():
        if path.suffix.lower() in CSV_SUFFIXES:
            return "csv"
        raise UserError(f"{path} is neither a .csv/.tsv table nor a .tar shard; give one, or a folder of "
                        f"{_LAYOUTS}")
    roots = [path] + [p for p in (split_folder(path, "train"),) if p is not None]
    if any((path / f).exists() for f in ("captions_train.json", "annotations")) or any(path.glob("captions_*.json")):
        return "coco"
    if is_saved_dataset(path):
        return "hf"
    if any(metadata_file(root) for root in roots):
        return "imagefolder"
    if any(next(root.glob("*.tar"), None) for root in roots):
        return "webdataset"
    if has_caption_files(path):
        return "captions"
    raise UserError(f"cannot tell the format of {path}: expected {_LAYOUTS}; or set data.format")


def read_split(fmt: str, name: str, split: str, data, limit: int = 0, whole: bool = False) -> SplitSource:
    """Split `split` of the source `name` in format `fmt` (not coco: data/coco.py reads that), its first `limit`
    captioned images (0: all). data: cfg.data."""
    if fmt == "webdataset":
        return _shard_split(name, split, data, limit, whole)
    listing, held_out = _split_listing(fmt, Path(name), split, data)
    if not listing.names:
        raise UserError(f"{listing.where} lists no image with a caption, read as data.format={fmt}; check "
                        f"data.format, data.image_column and data.caption_column")
    ids = np.arange(len(listing.names))
    note = ""
    if held_out:
        is_val = hold_out(len(listing.names), data.val_fraction, listing.where)
        ids = ids[is_val] if split == data.val_split else ids[~is_val]
        note = (f"no val split in {listing.where}: holding out {int(is_val.sum())} of {len(is_val)} images "
                f"({data.val_fraction:g}, seed {HOLDOUT_SEED}) as val")
        logger.info(note)
    return _to_source(fmt, listing, ids, split, limit, note, data.val_fraction if held_out else 0.0)


def hold_out(count: int, fraction: float, where: str) -> np.ndarray:
    """(count,) bool: the fixed-seed images held out as val, round(fraction * count) of them and at least one."""
    if count < 2:
        raise UserError(f"{where} lists {count} image(s): too few to hold one out for validation; add images or a "
                        f"val split")
    held = min(count - 1, max(1, round(fraction * count)))
    is_val = np.zeros(count, dtype=bool)
    is_val[np.random.default_rng(HOLDOUT_SEED).permutation(count)[:held]] = True
    return is_val


def _split_listing(fmt: str, path: Path, split: str, data) -> tuple[Listing, bool]:
    """The listing that holds `split`, and whether the split is to be held out of it (no file names a val)."""
    if fmt == "csv":
        if path.is_dir():
            raise UserError(f"data.format=csv takes a .csv/.tsv file, and {path} is a folder; give the file")
        val_file = _sibling_table(path, data.val_split)
        if split not in (data.train_split, data.val_split):
            own = _sibling_table(path, split)
            if own is None:
                raise UserError(f"no '{split}' table beside {path}")
            return read_table(own, data), False
        if val_file is None:
            return read_table(path, data), True
        return read_table(val_file if split == data.val_split else path, data), False
    if fmt == "hf":
        return _hf_listing(path, split, data)
    if not path.is_dir():
        raise UserError(f"data.format={fmt} takes a folder, and {path} is not one")
    if fmt == "imagefolder":
        read, has = read_image_folder, (lambda folder: metadata_file(folder) is not None)
    else:   # captions: any split folder holds its images' caption files
        read, has = (lambda folder, _: read_caption_folder(folder)), (lambda folder: True)
    own = split_folder(path, split)
    if split not in (data.train_split, data.val_split):
        if own is None or not has(own):
            raise UserError(f"{path} has no '{split}' folder")
        return read(own, data), False
    train, val = (split_folder(path, s) for s in (data.train_split, data.val_split))
    train = train if train is not None and has(train) else None
    if train is not None and val is not None and has(val):
        return read(own, data), False
    return read(train or path, data), True


def _sibling_table(path: Path, split: str) -> Path | None:
    """open_clip keeps train and val tables apart: train.csv beside val.csv (or validation.csv, ...)."""
    if "train" not in path.name:
        return None
    for name in split_aliases(split):
        sibling = path.with_name(path.name.replace("train", name, 1))
        if sibling != path and sibling.is_file():
            return sibling
    return None


def _hf_listing(path: Path, split: str, data) -> tuple[Listing, bool]:
    splits = split_names(path)
    if splits is None:
        return read_saved_split(path, data), True
    def find(name: str) -> str | None:
        return next((n for n in split_aliases(name) if n in splits), None)
    own, train, val = find(split), find(data.train_split), find(data.val_split)
    if split not in (data.train_split, data.val_split) or (train and val):
        if own is None:
            raise UserError(f"{path} has no split '{split}' (its splits: {', '.join(splits)}); set "
                            f"data.train_split / data.val_split")
        return read_saved_split(path / own, data), False
    if train is None:
        raise UserError(f"{path} has no '{data.train_split}' split (its splits: {', '.join(splits)}); set "
                        f"data.train_split")
    return read_saved_split(path / train, data), True


def _to_source(fmt: str, listing: Listing, ids: np.ndarray, split: str, limit: int, note: str,
               held_out: float) -> SplitSource:
    """The split's index: images with at least one caption, in listing order, the first `limit` of them."""
    image_ids, file_names, captions, caption_image = [], [], [], []
    uncaptioned = 0
    for i in ids.tolist():
        texts = listing.captions[i]
        if not texts:
            uncaptioned += 1
            continue
        caption_image += [len(image_ids)] * len(texts)
        captions += texts
        image_ids.append(i + 1)          # counted from 1, as COCO's ids are
        file_names.append(listing.names[i])
        if limit and len(image_ids) == limit:
            break
    skipped = listing.skipped + uncaptioned
    if skipped:
        logger.warning("%s: %d entries left out (no image name, or no caption that is text)", listing.where, skipped)
    if not image_ids:
        raise UserError(f"{listing.where} lists no image with a caption for the '{split}' split; check "
                        f"data.caption_column and data.image_column")
    index = CaptionIndex(np.asarray(image_ids, dtype=np.int64), file_names, captions,
                         np.asarray(caption_image, dtype=np.int64))
    identity = {"format": fmt, "path": str(Path(listing.where).resolve()), "split": split, "held_out": held_out,
                "index_sha1": index_digest(index)}
    return SplitSource(index, listing.images, identity, listing.where, note, skipped)


def index_digest(index: CaptionIndex) -> str:
    """A hash of an index's image ids, file names and captions: it changes whenever the image list or a caption
    does."""
    digest = hashlib.sha1()
    for array in (index.image_ids, index.caption_image):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    for text in (*index.file_names, "\0", *index.captions):
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _shard_split(spec: str, split: str, data, limit: int, whole: bool = False) -> SplitSource:
    """A split of a shard set read whole into memory (its encoded images): the val shards, or the train shards when
    `whole` (for the diffusion phase, which needs random access); data/shards.py streams train otherwise."""
    if split != data.val_split and not whole:
        raise UserError(f"the '{split}' split of the webdataset shards {spec} is streamed, not read whole: train on "
                        f"it with data.shards.build_stream, or convert it (python -m data.convert)")
    shards = find_shard_set(spec, data.train_split, data.val_split, data.val_fraction)
    names, captions, images, ids, skipped = read_split_shards(shards.val if split == data.val_split else shards.train,
                                                              limit)
    listing = Listing(names, captions, images, images.where, skipped)
    source = _to_source("webdataset", listing, np.arange(len(names)), split, limit, shards.note, 0.0)
    source.index.image_ids = np.asarray([ids[i - 1] for i in source.index.image_ids], dtype=np.int64)
    source.identity.update(path=spec, shards=shards.val if split == data.val_split else shards.train,
                           index_sha1=index_digest(source.index))
    return source
