"""Webdataset shard sets: which tar files a pattern or folder names, how many samples each holds, the held-out
val shards, and what one tar sample holds (image bytes, captions, id).

A set is a brace pattern ("shards-{0000..0099}.tar"; several joined by "::"), one .tar file, or a folder of .tar
files, optionally split into train/ and val/ subfolders (what data/convert.py writes). A sample is the tar members
sharing a key: an image (jpg, jpeg, png or webp) and a caption, as json ({"captions": [...]} or "caption"/"text")
or txt. Sample counts come from sizes.json beside the shards ({"shard-000000.tar": 1000}, open_clip's convention,
written by data/convert.py), img2dataset's <shard>_stats.json, or data.train_num_samples.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from configs.errors import UserError
from data.image_files import MemoryImages
from data.listing import caption_list, split_folder

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"
HOLDOUT_SEED = 0   # the held-out shards never move with train.seed, so runs compare on the same val


def is_shard_spec(name: str) -> bool:
    """Whether data.dataset names shards by itself: a brace pattern, a '::' list or one .tar file."""
    return ("{" in name and "}" in name) or "::" in name or name.endswith(".tar")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str) -> list[str]:
    """The shard files a pattern, .tar file or folder names, in order; a name that matches nothing is a
    UserError. Remote URLs (pipe:, http://) are passed on unchecked."""
    path = Path(spec)
    if not is_shard_spec(spec) and path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise UserError(f"{path} holds no .tar shard; give a folder of webdataset shards, a pattern like "
                            f"'{path}/shard-{{000000..000009}}.tar', or set data.format")
        return urls
    urls = wds.shardlists.expand_urls(spec)
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise UserError(f"shard pattern '{spec}' names {len(urls)} file(s), {len(missing)} of which do not exist "
                        f"(e.g. {missing[0]}); check the pattern's folder and number range")
    return urls


@dataclass
class ShardSet:
    """The train and val shards of a set, with the sample counts that are known (by URL)."""
    train: list[str]
    val: list[str]
    sizes: dict[str, int]
    note: str = ""                                         # how val was chosen, when no folder said
    empty: list[str] = field(default_factory=list)         # zero-byte shards, left out


def find_shard_set(spec: str, train_split: str, val_split: str, val_fraction: float) -> ShardSet:
    """Train and val shards: the folder's train/ and val/ (or validation/) subfolders when it has them, else a
    fixed-seed val_fraction of the shards held out (at least one)."""

    folder = Path(spec)
    train_dir = split_folder(folder, train_split) if not is_shard_spec(spec) and folder.is_dir() else None
    val_dir = split_folder(folder, val_split) if train_dir is not None else None
    if train_dir is not None and val_dir is not None:
        train, val, note = expand_shards(str(train_dir)), expand_shards(str(val_dir)), ""
        train, empty = _drop_empty(train)
        val, empty_val = _drop_empty(val)
        empty += empty_val
    else:
        urls, empty = _drop_empty(expand_shards(str(train_dir or spec)))
        if len(urls) < 2:
            raise UserError(f"{spec} holds {len(urls)} readable shard(s) and no val/ folder: one shard must be held "
                            f"out for validation; write the set in more shards (python -m data.convert SRC OUT "
                            f"--shard-size N) or add a val/ folder of shards")
        count = max(1, round(val_fraction * len(urls)))
        held = set(np.random.default_rng(HOLDOUT_SEED).permutation(len(urls))[:count].tolist())
        train = [u for i, u in enumerate(urls) if i not in held]
        val = [u for i, u in enumerate(urls) if i in held]
        note = (f"no val split in {spec}: holding out {count} of {len(urls)} shards ({val_fraction:g} of the set, "
                f"seed {HOLDOUT_SEED}) as val")
        logger.info(note)
    if not train or not val:
        raise UserError(f"{spec}: no readable {'train' if not train else 'val'} shard (all are empty files); "
                        f"write the shards again (python -m data.convert)")
    return ShardSet(train, val, read_sizes(train + val), note, empty)


def _drop_empty(urls: list[str]) -> tuple[list[str], list[str]]:
    """Zero-byte shards (a failed download or write) are left out, each said once per process."""
    empty = [u for u in urls if not _is_remote(u) and Path(u).stat().st_size == 0]
    for url in empty:
        _warn_once(url, f"skipping empty shard {url} (0 bytes); write it again or remove it")
    return [u for u in urls if u not in empty], empty


_said: set[str] = set()


def _warn_once(url: str, message: str) -> None:
    if url not in _said:
        _said.add(url)
        logger.warning(message)


def read_sizes(urls: list[str]) -> dict[str, int]:
    """Known sample counts by URL: sizes.json beside the shards, else img2dataset's <name>_stats.json."""
    sizes: dict[str, int] = {}
    tables: dict[Path, dict] = {}
    for url in urls:
        if _is_remote(url):
            continue
        path = Path(url)
        if path.parent not in tables:
            try:
                tables[path.parent] = json.loads((path.parent / SIZES_FILE).read_text())
            except (OSError, ValueError):
                tables[path.parent] = {}
        count = tables[path.parent].get(path.name)
        if count is None:
            try:
                count = json.loads(path.with_name(f"{path.stem}_stats.json").read_text())["successes"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if isinstance(count, int) and count >= 0:
            sizes[url] = count
    return sizes


def warn_bad_shard(err: Exception) -> bool:
    """webdataset handler: a shard that is truncated or not a tar loses its remaining samples, said once in the log;
    the stream goes on with the next shard."""
    # webdataset appends (stream, url) to the error's args
    url = next((a for a in reversed(err.args) if isinstance(a, str)), "a shard")
    reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
    _warn_once(url, f"skipping the rest of {url}, which is truncated or not a tar ({reason}); write it again "
                    f"(python -m data.convert) or remove it")
    return True


@dataclass
class ShardSample:
    """A tar sample's parts: captions None when there is none that is text, image None when no member is one."""
    key: str
    image_id: int
    image: bytes | None
    captions: list[str] | None
    image_key: str = ""     # the image member's extension (jpg, png, ...)


def parse_sample(raw: dict) -> ShardSample:
    """Reads a grouped tar sample ({"__key__", "jpg": bytes, "json": bytes, ...}) without decoding its image."""
    key = raw["__key__"]
    image_key = next((k for k in IMAGE_KEYS if k in raw), "")
    image = raw[image_key] if image_key else None
    meta = _json(raw.get("json"))
    captions = caption_list(meta["captions"]) if "captions" in meta else None
    if captions is None and "txt" in raw:
        try:
            captions = caption_list(raw["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            captions = None
    if captions is None:
        field_name = next((k for k in ("caption", "text") if k in meta), None)
        captions = caption_list(meta[field_name]) if field_name else None
    return ShardSample(key, sample_id(key, meta), image, captions or None, image_key)


def _json(data: bytes | None) -> dict:
    try:
        value = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def sample_id(key: str, meta: dict) -> int:
    """The image id: the json's image_id (data/convert.py keeps the source's), a numeric key (img2dataset's), else
    62 bits of the key's hash (non-negative: it seeds the caption choice)."""
    image_id = meta.get("image_id")
    if isinstance(image_id, int) and not isinstance(image_id, bool) and image_id >= 0:
        return image_id
    if key.isdigit():
        return int(key)
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16) >> 2


def read_split_shards(urls: list[str], limit: int = 0):
    """Every sample of some shards, read once into memory (the val split: a few shards).

    Returns (names, captions per name, MemoryImages, image ids, skipped): a sample with no image member or no
    caption that is text is skipped and counted; an image member that does not decode is found when read.
    """
    names, captions, ids, encoded, skipped = [], [], [], {}, 0
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=warn_bad_shard))
    for raw in pipeline:
        sample = parse_sample(raw)
        if sample.image is None or sample.captions is None:
            skipped += 1
            continue
        name = sample.key if sample.key not in encoded else f"{sample.key}@{raw['__url__']}"
        encoded[name] = sample.image
        names.append(name)
        captions.append(sample.captions)
        ids.append(sample.image_id)
        if limit and len(names) == limit:
            break
    where = urls[0] if len(urls) == 1 else f"{len(urls)} shards ({urls[0]}, ...)"
    return names, captions, MemoryImages(encoded, where), ids, skipped
