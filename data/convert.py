"""`python -m data.convert SRC OUT --shard-size N`: any dataset this project reads -> webdataset shards.

SRC is a named dataset (embedded, fashion, coco) or a path in any format data/sources.py reads (shards are
re-sharded). OUT gets train/ and val/ folders of shard-NNNNNN.tar plus a sizes.json each; a sample is the image
file's bytes as they are (other formats than jpg/png/webp become PNG), json {"captions", "image_id", "file_name"}
and txt, its first caption, for tools that read one. Without a val split in SRC, data.val_fraction of it is held
out, as training would. A missing or non-image file is skipped and counted. OUT is written under a temporary name
and renamed when complete; it may not lie in the folder that holds SRC, and SRC is only read.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import UnwritableFolder, write_folder
from configs.errors import UserError
from data.shard_files import IMAGE_KEYS, SIZES_FILE

SHARD_NAME = "shard-%06d.tar"
_FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}   # PIL's format name -> the member's extension


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.convert", description="Writes any dataset this project "
                                     "reads as webdataset shards: OUT/train/ and OUT/val/, with a sizes.json each.")
    parser.add_argument("src", help="embedded | fashion | coco | a folder, CSV file or shard pattern")
    parser.add_argument("out", help="a new folder for the shards (train/, val/)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="data.* settings for reading SRC, e.g. data.caption_column=title data.val_fraction=0.1")
    parser.add_argument("--overwrite", action="store_true", help="replace an OUT this command wrote before")
    return parser.parse_args(argv)


def convert(cfg, out: str | Path, shard_size: int, overwrite: bool = False) -> dict:
    """Writes cfg.data.dataset's train and val splits to out as shards; returns the counts written and skipped."""
    from data.datasets import dataset_folder, is_inside, resolve_dataset_name, resolve_format

    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    name = resolve_dataset_name(cfg)
    fmt = resolve_format(cfg, name)
    folder = dataset_folder(cfg, name)
    holder = folder if folder.is_dir() else folder.parent   # a CSV file or a pattern: the folder holding it
    out = Path(out)
    if is_inside(out, holder) or is_inside(holder, out):
        raise UserError(f"OUT {out} and the source {holder} overlap; the source is never written to: choose an OUT "
                        f"outside it")
    if out.exists() and not (overwrite and (out / "train" / SIZES_FILE).is_file()):
        raise UserError(f"OUT {out} exists; choose a new folder" + ("" if overwrite else
                        ", or pass --overwrite to replace shards this command wrote there"))
    summary = {}

    def write(tmp: Path) -> None:
        for split in (cfg.data.train_split, cfg.data.val_split):
            (tmp / split).mkdir()
            samples = _samples(cfg, name, fmt, folder, split)
            summary[split] = _write_split(samples, tmp / split, shard_size, split)

    try:
        write_folder(out, write)
    except UnwritableFolder as err:
        raise UserError(f"cannot write {out} ({err.strerror}); choose a writable place") from None
    return summary


def _samples(cfg, name: str, fmt: str, folder: Path, split: str):
    """(image id, file name, encoded image or None, its extension, captions) for each image of a split."""
    if fmt == "webdataset":
        yield from _shard_samples(cfg, name, split)
        return
    if fmt == "coco":
        from data.coco import read_caption_index, resolve_split_files
        from data.image_files import ImageFiles

        ann_file, image_dir = resolve_split_files(folder, split)
        index, images = read_caption_index(ann_file), ImageFiles(image_dir)
    else:
        from data.sources import read_split

        source = read_split(fmt, name, split, cfg.data)
        index, images = source.index, source.images
    offsets = np.searchsorted(index.caption_image, np.arange(len(index.image_ids) + 1))   # image i's captions
    for i, file_name in enumerate(index.file_names):
        encoded, key = _encoded(images, file_name)
        yield (int(index.image_ids[i]), file_name, encoded, key, index.captions[offsets[i]:offsets[i + 1]])


def _shard_samples(cfg, name: str, split: str):
    """Re-sharding: the raw samples of a shard set's split, read once in order."""
    import webdataset as wds

    from data.shard_files import find_shard_set, parse_sample, warn_bad_shard

    d = cfg.data
    shards = find_shard_set(name, d.train_split, d.val_split, d.val_fraction)
    urls = shards.train if split == d.train_split else shards.val
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=warn_bad_shard)):
        sample = parse_sample(raw)
        yield (sample.image_id, sample.key, sample.image, sample.image_key, sample.captions or [])


def _encoded(images, file_name: str) -> tuple[bytes | None, str]:
    """The image's bytes as stored and their member extension, or (None, "") when it is missing or not an image.
    Formats the readers do not take (bmp, gif, tiff) become PNG of the same RGB pixels."""
    from data.transforms import IMAGE_ERRORS, to_rgb

    try:
        handle = images.open(file_name)
        data = handle.getvalue() if isinstance(handle, io.BytesIO) else Path(handle).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            key = _FORMAT_KEYS.get(img.format, "")
            if key:
                img.verify()   # cheap: catches a non-image or a broken header without decoding
                return data, key
            img.load()
            buffer = io.BytesIO()
            to_rgb(img).save(buffer, format="PNG")
            return buffer.getvalue(), "png"
    except IMAGE_ERRORS:
        return None, ""


def _write_split(samples, folder: Path, shard_size: int, split: str) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    sizes, written, skipped = {}, 0, 0
    writer = None
    for image_id, file_name, encoded, key, captions in tqdm(samples, desc=split, unit=" images"):
        if encoded is None or key not in IMAGE_KEYS or not captions:
            skipped += 1
            continue
        if writer is None:   # opened on the first sample, so an empty split writes no empty shard
            writer = wds.ShardWriter(str(folder / SHARD_NAME), maxcount=shard_size, verbose=0,
                                     post=lambda path: sizes.__setitem__(Path(path).name, writer.count))
        writer.write({"__key__": f"{image_id:012d}", key: encoded, "txt": captions[0],
                      "json": {"captions": captions, "image_id": image_id, "file_name": file_name}})
        written += 1
    if writer is not None:
        writer.close()
    (folder / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    return {"samples": written, "shards": len(sizes), "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from configs.loading import load_config

        cfg = load_config(None, list(args.set) + [f"data.dataset={args.src}"])
        summary = convert(cfg, args.out, args.shard_size, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parts = [f"{s}: {c['samples']} samples in {c['shards']} shards" + (f", {c['skipped']} skipped (missing, not "
             f"an image, or no caption)" if c["skipped"] else "") for s, c in summary.items()]
    print(f"wrote {args.out} ({'; '.join(parts)}); train on it with --dataset {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
