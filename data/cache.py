"""Prepared caption splits: images at image_size in a uint8 memmap plus token ids, so an epoch decodes no JPEG.

<root>/cache/<dataset>-<split>-<image_size>-<tokenizer fingerprint>[-first<N>]/
    manifest.json      what it was built from (rebuilt when that changes), counts, skipped files
    images.u8          (N_img, H, W, 3) uint8, raw memmap
    image_ids.npy      (N_img,) int64      caption_image.npy  (N_cap,) int64
    input_ids.npy      (N_cap, T) int32    attention_mask.npy (N_cap, T) int8
    index.json         file names and caption strings
Written with common.files.write_folder (a temporary folder renamed into place), so a killed build leaves no
half cache. A COCO-format split is keyed by its annotation file; any other source's split (data/sources.py) by its
identity, which holds a hash of its image list and captions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common.files import UnwritableFolder, write_folder
from configs.errors import UserError
from data.coco import CocoCaptions, CaptionIndex, read_caption_index, special_token_ids, tokenize_captions
from data.image_files import ImageFiles
from data.transforms import IMAGE_ERRORS, read_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MIN_IMAGES_FOR_POOL = 64  # below this, forking workers costs more than it saves
_MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer, max_caption_len: int) -> str:
    """10 hex digits naming the tokenizer's vocabulary and rules plus the caption length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        tree = json.loads(backend.to_str())
        # transformers rewrites these on every call; they are set per call anyway
        tree.pop("padding", None)
        tree.pop("truncation", None)
        text = json.dumps(tree, sort_keys=True)
    else:
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                           getattr(tokenizer, "do_lower_case", None)])
    return hashlib.sha1(f"{text}|max_len={max_caption_len}".encode()).hexdigest()[:10]


def cache_dir_for(cache_root: str | Path, dataset_name: str, split: str, image_size: int, fingerprint: str,
                  limit: int = 0) -> Path:
    """The folder a split's cache lives in; a limited split gets its own so it never evicts the full one."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name).strip("_") or "dataset"
    name = f"{slug}-{split}-{image_size}-{fingerprint}" + (f"-first{limit}" if limit else "")
    return Path(cache_root) / name


def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source(ann_file: Path, image_dir: Path, image_size: int, fingerprint: str, limit: int) -> dict:
    """What a cache was built from; any difference means it is stale."""
    return {"version": CACHE_VERSION, "annotation_file": str(ann_file.resolve()),
            "annotation_sha1": _file_sha1(ann_file), "image_dir": str(image_dir.resolve()),
            "image_dir_mtime_ns": image_dir.stat().st_mtime_ns, "image_size": image_size,
            "tokenizer": fingerprint, "limit": limit}


def _split_source(identity: dict, image_size: int, fingerprint: str, limit: int) -> dict:
    """_source for a split of any other source: its identity (data/sources.py) changes with its captions or
    image list."""
    return {"version": CACHE_VERSION, **identity, "image_size": image_size, "tokenizer": fingerprint, "limit": limit}


def _decode(job: tuple) -> tuple[np.ndarray | None, str]:
    """Pool worker: (image store, name, size) -> ((size, size, 3) uint8 or None, error message)."""
    images, name, size = job
    try:
        return read_image(images.open(name), size), ""
    except IMAGE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"


def build_cache(ann_file: Path, image_dir: Path, out_dir: Path, tokenizer, image_size: int, max_caption_len: int,
                limit: int = 0, processes: int = 2) -> Path:
    """Decodes every image of a split once into out_dir (see the module docstring); unreadable ones are skipped."""
    source = _source(ann_file, image_dir, image_size, tokenizer_fingerprint(tokenizer, max_caption_len), limit)
    return _build(read_caption_index(ann_file, limit), ImageFiles(image_dir), source, out_dir, tokenizer, image_size,
                  max_caption_len, processes, f"listed in {ann_file} could be read from {image_dir}/")


def build_split_cache(split, out_dir: Path, tokenizer, image_size: int, max_caption_len: int, limit: int = 0,
                      processes: int = 2) -> Path:
    """build_cache for a split of any source (a data.sources.SplitSource, already limited)."""
    source = _split_source(split.identity, image_size, tokenizer_fingerprint(tokenizer, max_caption_len), limit)
    return _build(split.index, split.images, source, out_dir, tokenizer, image_size, max_caption_len, processes,
                  f"of {split.where} could be read")


def _build(index: CaptionIndex, images, source: dict, out_dir: Path, tokenizer, image_size: int,
           max_caption_len: int, processes: int, none_read: str) -> Path:
    start = time.perf_counter()
    built = []

    def write(tmp: Path) -> None:
        manifest = _fill(tmp, index, images, tokenizer, image_size, max_caption_len, processes)
        if not manifest["num_images"]:
            raise UserError(f"none of the {len(index.image_ids)} images {none_read}")
        manifest.update(source=source, build_seconds=round(time.perf_counter() - start, 3))
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete
        built.append(manifest)

    def is_fresh(folder: Path) -> bool:
        manifest = read_manifest(folder)
        return manifest is not None and manifest.get("source") == source

    try:
        # No lock: two processes may both build it; the first copy to land is kept.
        write_folder(out_dir, write, is_complete=is_fresh)
    except UnwritableFolder as err:
        raise UserError(f"cannot write the image cache {out_dir.parent} ({err.strerror}); set data.root to a "
                        f"writable folder or data.use_cache=false") from None
    manifest = built[0] if built else read_manifest(out_dir) or {"skipped": []}
    if manifest["skipped"]:
        logger.warning("cache %s: skipped %d unreadable image(s), e.g. %s", out_dir, manifest["num_skipped"],
                       manifest["skipped"][0]["file_name"])
    return out_dir


def _fill(tmp: Path, index: CaptionIndex, images, tokenizer, image_size: int, max_caption_len: int,
          processes: int) -> dict:
    """Writes the cache files into tmp; returns the manifest's counts and skipped list."""
    jobs = [(images, name, image_size) for name in index.file_names]
    with contextlib.ExitStack() as stack:
        if processes > 1 and len(jobs) >= MIN_IMAGES_FOR_POOL:
            # Fork before the tokenizer thread starts, so no child inherits a lock that thread holds.
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(processes))
            results = pool.imap(_decode, jobs, chunksize=max(1, min(256, len(jobs) // (processes * 8))))
        else:
            results = map(_decode, jobs)
        # The tokenizer releases the GIL, so it runs while the loop below collects decoded images.
        tokens = stack.enter_context(ThreadPoolExecutor(1)).submit(
            tokenize_captions, tokenizer, index.captions, max_caption_len)
        keep, skipped = _write_images(results, index, tmp / "images.u8", image_size)
        input_ids, attention_mask = tokens.result()

    kept = index.subset(keep)
    caption_keep = keep[index.caption_image]
    np.save(tmp / "image_ids.npy", kept.image_ids)
    np.save(tmp / "caption_image.npy", kept.caption_image)
    np.save(tmp / "input_ids.npy", input_ids[caption_keep])
    np.save(tmp / "attention_mask.npy", attention_mask[caption_keep])
    (tmp / "index.json").write_text(json.dumps({"file_names": kept.file_names, "captions": kept.captions}))
    return {"num_images": len(kept.image_ids), "num_captions": len(kept.captions),
            "image_shape": [image_size, image_size, 3], "max_caption_len": max_caption_len,
            "special_ids": special_token_ids(tokenizer), "num_skipped": len(skipped), "skipped": skipped}


def _write_images(results, index: CaptionIndex, path: Path, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """Writes the readable images in order, compacted, to a raw (N_ok, H, W, 3) uint8 file.

    Returns keep (N_img,) bool and the skipped images as {"image_id", "file_name", "error"}.
    """
    keep = np.zeros(len(index.image_ids), dtype=bool)
    skipped = []
    images = np.memmap(path, dtype=np.uint8, mode="w+", shape=(len(keep), image_size, image_size, 3))
    written = 0
    for i, (pixels, error) in enumerate(results):
        if pixels is None:
            skipped.append({"image_id": int(index.image_ids[i]), "file_name": index.file_names[i], "error": error})
            continue
        images[written] = pixels
        keep[i] = True
        written += 1
    images.flush()
    del images
    os.truncate(path, written * image_size * image_size * 3)
    return keep, skipped


def read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / _MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class CachedCocoCaptions(CocoCaptions):
    """CocoCaptions served from a cache folder: the same samples, with the unreadable images left out.

    `skipped` lists the images excluded when the cache was built ({"image_id", "file_name", "error"});
    `skipped_images` counts them.
    """

    def __init__(self, cache_dir: str | Path, caption_mode: str = "pairs", seed: int = 0):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        assert manifest is not None, f"no cache manifest in {self.cache_dir}"
        self.manifest = manifest
        self.skipped = manifest["skipped"]
        names = json.loads((self.cache_dir / "index.json").read_text())
        index = CaptionIndex(image_ids=np.load(self.cache_dir / "image_ids.npy"), file_names=names["file_names"],
                             captions=names["captions"], caption_image=np.load(self.cache_dir / "caption_image.npy"))
        self.image_dir = self.images = None
        self._images = None  # opened lazily, so pickling the dataset to a spawned worker copies no pixels
        self._setup(index, np.load(self.cache_dir / "input_ids.npy"), np.load(self.cache_dir / "attention_mask.npy"),
                    manifest["image_shape"][0], caption_mode, seed, manifest["special_ids"])

    @property
    def skipped_images(self) -> int:
        """Unreadable images found when the cache was built; they never reach a batch, so a count of the None
        samples a loader yields misses them (it is 0 here)."""
        return len(self.skipped)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def _read_pixels(self, image_position: int) -> np.ndarray:
        if self._images is None:
            shape = (self.manifest["num_images"], *self.manifest["image_shape"])
            self._images = np.memmap(self.cache_dir / "images.u8", dtype=np.uint8, mode="r", shape=shape)
        return self._images[image_position]


def load_cached_captions(ann_file: str | Path, image_dir: str | Path, cache_root: str | Path, dataset_name: str,
                         split: str, tokenizer, image_size: int, max_caption_len: int, caption_mode: str = "pairs",
                         limit: int = 0, seed: int = 0, processes: int = 2) -> CachedCocoCaptions:
    """The cached split, built first when missing or when its annotation file, images, size or tokenizer changed."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    fingerprint = tokenizer_fingerprint(tokenizer, max_caption_len)
    out_dir = cache_dir_for(cache_root, dataset_name, split, image_size, fingerprint, limit)
    manifest = read_manifest(out_dir)
    if manifest is None or manifest["source"] != _source(ann_file, image_dir, image_size, fingerprint, limit):
        logger.info("building image cache %s", out_dir)
        build_cache(ann_file, image_dir, out_dir, tokenizer, image_size, max_caption_len, limit, processes)
    return CachedCocoCaptions(out_dir, caption_mode=caption_mode, seed=seed)


def load_cached_split(split, cache_root: str | Path, dataset_name: str, split_name: str, tokenizer, image_size: int,
                      max_caption_len: int, caption_mode: str = "pairs", limit: int = 0, seed: int = 0,
                      processes: int = 2) -> CachedCocoCaptions:
    """load_cached_captions for a split of any source (a data.sources.SplitSource): rebuilt when its identity (its
    image list and captions), the size or the tokenizer changed."""
    fingerprint = tokenizer_fingerprint(tokenizer, max_caption_len)
    out_dir = cache_dir_for(cache_root, dataset_name, split_name, image_size, fingerprint, limit)
    manifest = read_manifest(out_dir)
    if manifest is None or manifest["source"] != _split_source(split.identity, image_size, fingerprint, limit):
        logger.info("building image cache %s", out_dir)
        build_split_cache(split, out_dir, tokenizer, image_size, max_caption_len, limit, processes)
    return CachedCocoCaptions(out_dir, caption_mode=caption_mode, seed=seed)
