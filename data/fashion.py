"""Fashion-MNIST (Debian's dataset-fashion-mnist) as a tinted COCO-format caption set under
<root>/fashion-<train>x<val>-<tints hash>-v<FORMAT_VERSION>/.

Each 28x28 article is coloured with one tint and gets five captions naming its class, and in four of them its
tint ("a photo of a red dress", "a pullover"). Image entries carry "label", "label_name" and "tint" for the
evaluation's classifier. Generated once per (counts, tints), each set in its own folder, written atomically
under a lock (data.generated.write_once).
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from configs.errors import UserError
from data.generated import write_once

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Caption-friendly spellings of the official names (T-shirt/top, Trouser, ..., Ankle boot), in label order.
FASHION_CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
_PLURAL_CLASSES = {"trousers"}  # no article: "red trousers", not "a red trousers"
# Multiplied into the grey levels, so the background stays black and the shading survives.
FASHION_TINTS = {"white": (255, 255, 255), "red": (235, 45, 40), "green": (60, 200, 70), "blue": (60, 110, 245),
                 "yellow": (245, 220, 50)}
CAPTION_TEMPLATES = ("a photo of {tinted}", "{tinted}", "a picture of {plain} in {tint}", "{plain}",
                     "an image of {tinted}")
# 28x28 padded with 2 black pixels (the set's own background) rather than resampled: the stored pixels are the
# originals, 32 is a power of two the latent downsampling divides, and the loader resizes to model.image_size.
IMAGE_SIZE = 32
_PAD = (IMAGE_SIZE - 28) // 2
FORMAT_VERSION = 1
_SOURCES = {"train": "train", "val": "t10k"}  # our split -> Fashion-MNIST file prefix
_SPLIT_SEEDS = {"train": 0, "val": 1}
_MANIFEST = "fashion.json"


def read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """Reads the first `count` items (None: all) of a gzipped idx file (LeCun's MNIST format) of unsigned bytes.

    Returns (N,) labels or (N, 28, 28) images, uint8.
    """
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
            raise UserError(f"{path} is not an idx file of unsigned bytes; reinstall it with: "
                            f"apt-get install --reinstall dataset-fashion-mnist")
        shape = [int(d) for d in np.frombuffer(f.read(4 * head[3]), dtype=">u4")]
        shape[0] = shape[0] if count is None else min(count, shape[0])
        body = f.read(int(np.prod(shape)))  # only what is asked for: the train file inflates to 47 MB
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _with_article(phrase: str, plural: bool) -> str:
    if plural:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def fashion_captions(label: int, tint: str) -> list[str]:
    """The five captions of an article of class `label` coloured `tint`."""
    name = FASHION_CLASSES[label]
    plural = name in _PLURAL_CLASSES
    words = {"tinted": _with_article(f"{tint} {name}", plural), "plain": _with_article(name, plural), "tint": tint}
    return [template.format(**words) for template in CAPTION_TEMPLATES]


def tint_images(gray: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(N, 28, 28) uint8 grey -> (N, 32, 32, 3) uint8, scaled by the tint and padded with black."""
    tinted = (gray[..., None].astype(np.uint32) * np.asarray(rgb, dtype=np.uint32) + 127) // 255  # (N, 28, 28, 3)
    return np.pad(tinted.astype(np.uint8), ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))


def _check_request(source_dir: Path, counts: dict[str, int], tints: list[str]) -> None:
    missing = [source_dir / f"{prefix}-{kind}-ubyte.gz" for prefix in _SOURCES.values()
               for kind in ("images-idx3", "labels-idx1")]
    if not all(path.is_file() for path in missing):
        raise UserError(f"Fashion-MNIST not found under {source_dir}; install it with: "
                        f"apt-get install dataset-fashion-mnist")
    unknown = [t for t in tints if t not in FASHION_TINTS]
    if not tints or unknown:
        raise UserError(f"data.fashion_tints must name some of {', '.join(FASHION_TINTS)}; got {tints}")
    available = {"train": 60000, "val": 10000}
    for split, count in counts.items():
        if not 1 <= count <= available[split]:
            raise UserError(f"data.fashion_{split}_images must be between 1 and {available[split]}, got {count}")


def _write_split(folder: Path, source_dir: Path, split: str, count: int, tints: list[str]) -> None:
    prefix = _SOURCES[split]
    gray = read_idx(source_dir / f"{prefix}-images-idx3-ubyte.gz", count)
    labels = read_idx(source_dir / f"{prefix}-labels-idx1-ubyte.gz", count)
    tint_ids = np.random.default_rng(_SPLIT_SEEDS[split]).integers(len(tints), size=count)
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for t, tint in enumerate(tints):
        rows = np.flatnonzero(tint_ids == t)
        for i, pixels in zip(rows, tint_images(gray[rows], FASHION_TINTS[tint])):
            Image.fromarray(pixels).save(folder / split / f"{i:05d}.png", compress_level=1)
    for i in range(count):
        label, tint = int(labels[i]), tints[tint_ids[i]]
        images.append({"id": i + 1, "file_name": f"{i:05d}.png", "width": IMAGE_SIZE, "height": IMAGE_SIZE,
                       "label": label, "label_name": FASHION_CLASSES[label], "tint": tint})
        for caption in fashion_captions(label, tint):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
    tree = {"info": {"description": f"Fashion-MNIST {prefix} set, first {count} articles, tinted"},
            "licenses": [], "images": images, "annotations": annotations}
    (folder / f"captions_{split}.json").write_text(json.dumps(tree))


def fashion_folder(root: str | Path, train_images: int, val_images: int,
                   tints: list[str] | tuple[str, ...] = tuple(FASHION_TINTS)) -> Path:
    """Where the set of these parameters lives (whether or not it is written yet); the tints' order matters."""
    tag = hashlib.sha1(",".join(tints).encode()).hexdigest()[:6]
    return Path(root) / f"fashion-{train_images}x{val_images}-{tag}-v{FORMAT_VERSION}"


def complete_fashion_sets(root: str | Path) -> list[Path]:
    """The finished fashion sets under root, newest first: for tools that take whatever set is there rather
    than generate one with counts of their own."""
    manifests = Path(root).glob(f"fashion-*-v{FORMAT_VERSION}/{_MANIFEST}")
    return [m.parent for m in sorted(manifests, key=lambda m: m.stat().st_mtime_ns, reverse=True)]


def _matches(folder: Path, params: dict) -> bool:
    """Only a finished set has the manifest: it is written last, then the folder is moved into place."""
    try:
        return json.loads((folder / _MANIFEST).read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def _write_all(folder: Path, source_dir: Path, counts: dict[str, int], params: dict) -> None:
    for split, count in counts.items():
        _write_split(folder, source_dir, split, count, params["tints"])
    (folder / _MANIFEST).write_text(json.dumps(params))  # last: its presence marks a complete folder


def ensure_fashion(root: str | Path, train_images: int = 12000, val_images: int = 2000,
                   tints: list[str] | tuple[str, ...] = tuple(FASHION_TINTS), source_dir: str | Path = FASHION_DIR
                   ) -> Path:
    """Writes fashion_folder(root, ...) (captions_{train,val}.json + {train,val}/*.png) unless it is complete;
    returns it.

    Train comes from the first `train_images` of Fashion-MNIST's train file, val from the first `val_images`
    of t10k. Deterministic: the same arguments give the same files. Other counts or tints get another folder.
    """
    source_dir, tints = Path(source_dir), list(tints)
    folder = fashion_folder(root, train_images, val_images, tints)
    params = {"version": FORMAT_VERSION, "train_images": train_images, "val_images": val_images, "tints": tints,
              "image_size": IMAGE_SIZE}
    if _matches(folder, params):  # without the source files: a finished set needs none
        return folder
    counts = {"train": train_images, "val": val_images}
    _check_request(source_dir, counts, tints)
    return write_once(folder, lambda f: _matches(f, params), lambda tmp: _write_all(tmp, source_dir, counts, params))
