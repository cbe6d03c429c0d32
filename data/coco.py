"""COCO-format caption folders (COCO 2017, the embedded world, fashion) read through pycocotools.

Follows torchvision's CocoCaptions, but yields one sample per (image, caption) pair or one random caption per
image per epoch, skips unreadable images instead of crashing, and tokenizes every caption once up front.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.images import from_uint8
from configs.errors import UserError
from data.image_files import ImageFiles
from data.transforms import IMAGE_ERRORS, read_image

logger = logging.getLogger(__name__)

COCO_URL = "https://cocodataset.org/#download"
CAPTION_MODES = ("pairs", "random")
_TOKENIZE_CHUNK = 8192


def resolve_split_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """Finds (annotation json, image folder) for a split, in either layout.

    COCO 2017: folder/annotations/captions_{split}2017.json + folder/{split}2017/
    ours:      folder/captions_{split}.json + folder/{split}/
    """
    folder = Path(folder)
    ours = (folder / f"captions_{split}.json", folder / split)
    official = (folder / "annotations" / f"captions_{split}2017.json", folder / f"{split}2017")
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist; give a folder holding captions_{split}.json and "
                        f"{split}/ (or annotations/captions_{split}2017.json and {split}2017/)")
    if ours[0].exists() or ours[1].exists():
        ann_file, image_dir = ours
    elif official[0].exists() or official[1].exists() or (folder / "annotations").is_dir():
        ann_file, image_dir = official
    else:
        raise UserError(f"no '{split}' split in {folder}: expected {ours[0]} and {ours[1]}/, "
                        f"or the COCO 2017 layout {official[0]} and {official[1]}/")
    for path, kind in ((ann_file, "annotation file"), (image_dir, "image folder")):
        if not path.exists():
            raise UserError(f"{kind} {path} is missing (the '{split}' split of {folder} needs both "
                            f"{ann_file.name} and {image_dir.name}/)")
    return ann_file, image_dir


def coco_missing_error(folder: Path, split: str = "train") -> UserError:
    """The message for an absent COCO 2017: what to download and the exact paths it must end up at."""
    return UserError(
        f"COCO 2017 not found: expected {folder / f'{split}2017'}/ and "
        f"{folder / 'annotations' / f'captions_{split}2017.json'}; download train2017.zip, val2017.zip and "
        f"annotations_trainval2017.zip from {COCO_URL} and unzip all three into {folder}/ "
        f"(or use data.dataset=embedded)")


def load_coco(ann_file: str | Path):
    """Parses a COCO captions json into a pycocotools COCO; malformed files raise UserError naming the file."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    fix = (f"re-download annotations_trainval2017.zip from {COCO_URL} if it is COCO's, "
           f"or delete the dataset folder to regenerate it if it is generated")
    try:
        tree = json.loads(ann_file.read_bytes())
    except FileNotFoundError:
        raise UserError(f"annotation file {ann_file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file {ann_file} is not valid JSON ({err}); {fix}") from None
    problem = _coco_problem(tree)
    if problem:
        raise UserError(f"annotation file {ann_file} is not a COCO captions file ({problem}); {fix}")
    coco = COCO()
    coco.dataset = tree
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _coco_problem(tree) -> str:
    """What is wrong with a parsed annotation json, or "" if it has the keys we read."""
    if not isinstance(tree, dict):
        return "top level is not an object"
    for key in ("images", "annotations"):
        if not isinstance(tree.get(key), list):
            return f"no '{key}' list"
    for i, img in enumerate(tree["images"]):
        if not isinstance(img, dict) or not {"id", "file_name"} <= img.keys():
            return f"images[{i}] lacks 'id' or 'file_name'"
    for i, ann in enumerate(tree["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id"} <= ann.keys() or not isinstance(ann.get("caption"), str):
            return f"annotations[{i}] lacks 'id', 'image_id' or a 'caption' string"
    return ""


@dataclass
class CaptionIndex:
    """Images in annotation order and their captions, grouped by image (caption_image is non-decreasing)."""
    image_ids: np.ndarray      # (N_img,) int64 COCO image ids (other sources: positions in their listing)
    file_names: list[str]      # N_img, names in the split's image store (data/image_files.py)
    captions: list[str]        # N_cap
    caption_image: np.ndarray  # (N_cap,) int64 position of each caption's image in image_ids

    def subset(self, keep: np.ndarray) -> CaptionIndex:
        """The images where keep (N_img,) bool is set, with their captions."""
        new_position = np.cumsum(keep) - 1
        caption_keep = keep[self.caption_image]
        return CaptionIndex(
            image_ids=self.image_ids[keep],
            file_names=[f for f, k in zip(self.file_names, keep) if k],
            captions=[c for c, k in zip(self.captions, caption_keep) if k],
            caption_image=new_position[self.caption_image[caption_keep]])


def read_caption_index(ann_file: str | Path, limit: int = 0) -> CaptionIndex:
    """The first `limit` images (0: all) of an annotation file that have a non-empty caption, with their captions."""
    coco = load_coco(ann_file)
    image_ids, file_names, captions, caption_image = [], [], [], []
    for img in coco.dataset["images"]:
        texts = [ann["caption"].strip() for ann in coco.imgToAnns.get(img["id"], [])]
        texts = [t for t in texts if t]
        if not texts:
            continue
        caption_image += [len(image_ids)] * len(texts)
        captions += texts
        image_ids.append(int(img["id"]))
        file_names.append(img["file_name"])
        if limit and len(image_ids) == limit:
            break
    if not image_ids:
        raise UserError(f"annotation file {ann_file} lists no image with a caption")
    return CaptionIndex(np.asarray(image_ids, dtype=np.int64), file_names, captions,
                        np.asarray(caption_image, dtype=np.int64))


def tokenize_captions(tokenizer, captions: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """HF tokenizer, padded to max_len, truncated. Returns input_ids (N, T) int32 and attention_mask (N, T) int8."""
    # Generated sets repeat captions (fashion: 250 distinct in 60k); each distinct one is tokenized once.
    unique = list(dict.fromkeys(captions))
    input_ids = np.zeros((len(unique), max_len), dtype=np.int32)
    attention_mask = np.zeros((len(unique), max_len), dtype=np.int8)
    for start in range(0, len(unique), _TOKENIZE_CHUNK):
        chunk = unique[start:start + _TOKENIZE_CHUNK]
        out = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len,
                        return_token_type_ids=False, return_tensors="np")
        input_ids[start:start + len(chunk)] = out["input_ids"]
        attention_mask[start:start + len(chunk)] = out["attention_mask"]
    row = {caption: i for i, caption in enumerate(unique)}
    rows = np.fromiter((row[c] for c in captions), dtype=np.int64, count=len(captions))
    return input_ids[rows], attention_mask[rows]


def special_token_ids(tokenizer) -> list[int]:
    """CLS, SEP, PAD and UNK ids the tokenizer defines."""
    ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return sorted({int(i) for i in ids if i is not None})


class CocoCaptions(Dataset):
    """Image-caption samples from a COCO-format split, decoding the image files on every access.

    caption_mode "pairs": one sample per (image, caption); "random": one sample per image with a caption drawn
    from (seed, epoch, image_id), so it changes with set_epoch(). DataLoader workers copy the dataset when an
    iterator starts, so call set_epoch before iterating (and don't use persistent_workers in random mode).

    A sample is {"images": (3, H, W) float32 in [-1, 1], "input_ids": (T,) long, "attention_mask": (T,) long,
    "image_id": int, "caption": str}, or {"unreadable": image_id} if the image cannot be read (batch with
    data.collate.collate_captions, which counts those once per image).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, tokenizer, image_size: int,
                 max_caption_len: int, caption_mode: str = "pairs", limit: int = 0, seed: int = 0):
        index = read_caption_index(ann_file, limit)
        input_ids, attention_mask = tokenize_captions(tokenizer, index.captions, max_caption_len)
        self.image_dir = Path(image_dir)
        self.images = ImageFiles(image_dir)
        self._setup(index, input_ids, attention_mask, image_size, caption_mode, seed, special_token_ids(tokenizer))

    @classmethod
    def from_index(cls, index: CaptionIndex, images, source: dict, tokenizer, image_size: int,
                   max_caption_len: int, caption_mode: str = "pairs", seed: int = 0) -> CocoCaptions:
        """The same dataset from any source's split (data/sources.py): its index, its image store
        (data/image_files.py) and `source`, what it was read from (the feature store keys on it)."""
        dataset = cls.__new__(cls)
        input_ids, attention_mask = tokenize_captions(tokenizer, index.captions, max_caption_len)
        dataset.images = images
        dataset.image_dir = images.root
        dataset.manifest = {"source": source}
        dataset._setup(index, input_ids, attention_mask, image_size, caption_mode, seed, special_token_ids(tokenizer))
        return dataset

    def _setup(self, index: CaptionIndex, input_ids: np.ndarray, attention_mask: np.ndarray, image_size: int,
               caption_mode: str, seed: int, special_ids: list[int]) -> None:
        if caption_mode not in CAPTION_MODES:
            raise UserError(f"data.caption_mode must be pairs or random, got '{caption_mode}'")
        assert len(index.captions) == len(input_ids) == len(attention_mask) == len(index.caption_image)
        self.index = index
        self.input_ids = input_ids            # (N_cap, T) int32
        self.attention_mask = attention_mask  # (N_cap, T) int8
        self.image_size = image_size
        self.caption_mode = caption_mode
        self.seed = seed
        self.epoch = 0
        self.special_ids = special_ids
        # captions of image i are caption_offsets[i]:caption_offsets[i + 1]
        self.caption_offsets = np.searchsorted(index.caption_image, np.arange(len(index.image_ids) + 1))
        self._warned: set[str] = set()

    @property
    def num_images(self) -> int:
        return len(self.index.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.index.captions)

    def set_epoch(self, epoch: int) -> None:
        """Picks a new caption per image in random mode; no effect in pairs mode."""
        self.epoch = int(epoch)

    def image_captions(self, image_position: int) -> list[str]:
        """Every caption of the image at this position (the references for caption metrics)."""
        start, stop = self.caption_offsets[image_position], self.caption_offsets[image_position + 1]
        return self.index.captions[start:stop]

    def __len__(self) -> int:
        return self.num_captions if self.caption_mode == "pairs" else self.num_images

    def _caption_position(self, image_position: int) -> int:
        start, stop = self.caption_offsets[image_position], self.caption_offsets[image_position + 1]
        # Keyed by image_id, not position, so a cache that dropped bad images draws the same captions.
        image_id = int(self.index.image_ids[image_position])
        rng = np.random.default_rng([self.seed, self.epoch, image_id])
        return int(start + rng.integers(stop - start))

    def _read_pixels(self, image_position: int) -> np.ndarray | None:
        """(H, W, 3) uint8, or None for a missing, corrupt or truncated file."""
        name = self.index.file_names[image_position]
        try:
            return read_image(self.images.open(name), self.image_size)
        except IMAGE_ERRORS as err:
            if name not in self._warned:  # once per file and process; the loop counts every skip
                self._warned.add(name)
                logger.warning("skipping unreadable image %s: %s", self.images.describe(name), err)
            return None

    def image_tensor(self, image_position: int) -> torch.Tensor | None:
        """(3, H, W) float32 in [-1, 1], or None for an unreadable image."""
        pixels = self._read_pixels(image_position)
        if pixels is None:
            return None
        return from_uint8(pixels)

    def __getitem__(self, idx: int) -> dict:
        """A sample, or {"unreadable": image_id} for an image that cannot be read (collate_captions drops it and
        reports its id, so it can be counted once however often it is drawn)."""
        if self.caption_mode == "pairs":
            caption_position = int(idx)
            image_position = int(self.index.caption_image[caption_position])
        else:
            image_position = int(idx)
            caption_position = self._caption_position(image_position)
        images = self.image_tensor(image_position)
        if images is None:
            return {"unreadable": int(self.index.image_ids[image_position])}
        return {
            "images": images,
            "input_ids": torch.from_numpy(self.input_ids[caption_position].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.attention_mask[caption_position].astype(np.int64)),
            "image_id": int(self.index.image_ids[image_position]),
            "caption": self.index.captions[caption_position],
        }
