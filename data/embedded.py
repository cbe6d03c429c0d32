"""The embedded world: procedurally drawn shapes with captions, written once as a COCO-caption dataset and cached.

Layout under <root>/embedded-<train>x<val>-seed<seed>-v<FORMAT_VERSION>[-<side>px]/ (one folder per parameter set,
so the default, tiny and test worlds live side by side): captions_{train,val}.json (COCO caption format; each image
entry also holds its ground-truth "scene") and the PNGs in train/ and val/, 64x64 unless drawn at another side (the
geometry scales with it, so a 256 px world shows the same scenes in finer detail). Every image is a pure function of
(seed, split, index), so the same seed gives byte-identical files on any number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from configs.errors import UserError
from data.generated import write_once
from data.shapes import render_shapes
from data.world import (BACKGROUND_RGB, CANVAS_SIZE, COLOUR_RGB, COLOURS, HELD_OUT_COMBOS, PAIR_AXIS_JITTER_PX,
                        POSITION_ANCHORS, POSITION_JITTER_PX, POSITIONS, RELATIONS, SHAPES, SIZE_JITTER, SIZE_PX,
                        SIZES, Scene, SceneObject)
from data.world_captions import canonical_caption, write_captions

# Re-exported: the world's vocabulary is part of this module's API.
__all__ = ["COLOURS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "HELD_OUT_COMBOS", "embedded_folder",
           "ensure_embedded", "read_split", "sample_scene", "world_prompts"]

FORMAT_VERSION = 2                   # bump when drawing or captions change: it names the folder, so a new one is made
SPLITS = ("train", "val")
CAPTIONS_PER_IMAGE = 5               # as in COCO
HELD_OUT_VAL_SHARE = 0.25            # val scenes whose first object is forced to a held-out pair (else ~14%)
_STREAM = {"train": 1, "val": 2, "prompts": 3}   # RNG stream per split: val does not shift with the train count
_CHUNK = 500                         # images per worker task


def _combos(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return pairs if split != "train" else [p for p in pairs if p not in HELD_OUT_COMBOS]


def sample_scene(rng: np.random.Generator, split: str) -> tuple[Scene, list[tuple[float, float, float, float]]]:
    """A random scene of `split` ("train" never holds a HELD_OUT_COMBOS pair) and each object's box (x0, y0, w, h).

    Two objects have different colours and sit at left+right or top+bottom; objects[0] is the left/top one.
    """
    combos = _combos(split)
    picks = []
    count = 1 if rng.random() < 0.5 else 2
    if split != "train" and rng.random() < HELD_OUT_VAL_SHARE:
        picks.append(HELD_OUT_COMBOS[int(rng.integers(len(HELD_OUT_COMBOS)))])
    while len(picks) < count:
        pick = combos[int(rng.integers(len(combos)))]
        if all(pick[0] != colour for colour, _ in picks):
            picks.append(pick)
    jitter = (POSITION_JITTER_PX, POSITION_JITTER_PX)            # (x, y), uniform +-
    if count == 1:
        positions, relation = [POSITIONS[int(rng.integers(len(POSITIONS)))]], None
    elif rng.random() < 0.5:
        positions, relation = ["left", "right"], "left_of"
        jitter = (PAIR_AXIS_JITTER_PX, POSITION_JITTER_PX)
    else:
        positions, relation = ["top", "bottom"], "above"
        jitter = (POSITION_JITTER_PX, PAIR_AXIS_JITTER_PX)
    if count == 2 and rng.random() < 0.5:         # the held-out pick must not always be the left/top one
        picks.reverse()
    objects, boxes = [], []
    for (colour, shape), position in zip(picks, positions):
        size = SIZES[int(rng.integers(len(SIZES)))]
        side = SIZE_PX[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        cx, cy = (a * CANVAS_SIZE + rng.uniform(-j, j) for a, j in zip(POSITION_ANCHORS[position], jitter))
        objects.append(SceneObject(colour, shape, size, position))
        boxes.append((cx - side / 2, cy - side / 2, side, side))
    return Scene(tuple(objects), relation), boxes


def _render_chunk(task: tuple[str, str, int, int, int, int]) -> list[tuple[dict, list[str]]]:
    """Draws and saves images [start, stop) of a split at side px; returns (scene entry, captions) per image (boxes
    in the native canvas's pixels, whatever the side)."""
    folder, split, seed, start, stop, side = task
    scale = side / CANVAS_SIZE
    records = []
    for index in range(start, stop):
        rng = np.random.default_rng([seed, _STREAM[split], index])
        scene, boxes = sample_scene(rng, split)
        items = [(o.shape, tuple(v * scale for v in box), COLOUR_RGB[o.colour]) for o, box in zip(scene.objects, boxes)]
        render_shapes(side, BACKGROUND_RGB, items).save(Path(folder) / _file_name(index), format="PNG")
        entry = scene.to_dict()
        for obj, box in zip(entry["objects"], boxes):
            obj["bbox"] = [round(float(v), 2) for v in box]
        records.append((entry, write_captions(scene, rng, CAPTIONS_PER_IMAGE)))
    return records


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.png"


def _coco_json(split: str, seed: int, records: list[tuple[dict, list[str]]], side: int) -> dict:
    images, annotations = [], []
    for index, (scene, captions) in enumerate(records):
        image_id = index + 1
        held_out = Scene.from_dict(scene).has_held_out()
        images.append({"id": image_id, "file_name": _file_name(index), "width": side, "height": side,
                       "license": 1, "scene": scene, "held_out": held_out})
        annotations.extend({"id": len(annotations) + 1, "image_id": image_id, "caption": c} for c in captions)
    return {
        "info": {"description": f"Duet embedded world, {split} split: procedurally drawn shapes with captions",
                 "version": str(FORMAT_VERSION), "year": 2025, "contributor": "duet data/embedded.py",
                 "date_created": "", "seed": seed},   # no timestamp: the same seed gives identical bytes
        "licenses": [{"id": 1, "name": "procedurally generated, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "held_out_combos": [list(p) for p in HELD_OUT_COMBOS],
    }


def _manifest(train_images: int, val_images: int, seed: int, side: int) -> dict:
    manifest = {"format_version": FORMAT_VERSION, "train_images": train_images, "val_images": val_images, "seed": seed}
    return manifest if side == CANVAS_SIZE else {**manifest, "side": side}


def _is_complete(folder: Path, manifest: dict) -> bool:
    """Only a finished generation has manifest.json: it is written last, then the folder is moved into place."""
    try:
        return json.loads((folder / "manifest.json").read_text()) == manifest
    except (OSError, ValueError):
        return False


def _generate(folder: Path, train_images: int, val_images: int, seed: int, workers: int, side: int) -> None:
    counts = {"train": train_images, "val": val_images}
    tasks = []
    for split in SPLITS:
        (folder / split).mkdir(parents=True)
        tasks += [(str(folder / split), split, seed, start, min(start + _CHUNK, counts[split]), side)
                  for start in range(0, counts[split], _CHUNK)]
    if workers > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: spawn would re-import the caller's __main__ (torch and all) in each worker.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_render_chunk, tasks, chunksize=1)
    else:
        chunks = [_render_chunk(task) for task in tasks]
    for split in SPLITS:
        records = [r for task, chunk in zip(tasks, chunks) if task[1] == split for r in chunk]
        text = json.dumps(_coco_json(split, seed, records, side), separators=(",", ":"))
        (folder / f"captions_{split}.json").write_text(text)
    (folder / "manifest.json").write_text(json.dumps(_manifest(train_images, val_images, seed, side)))


def embedded_folder(root: str | Path, train_images: int, val_images: int, seed: int = 0,
                    side: int = CANVAS_SIZE) -> Path:
    """Where the world of these parameters lives (whether or not it is generated yet)."""
    size = "" if side == CANVAS_SIZE else f"-{side}px"
    return Path(root) / f"embedded-{train_images}x{val_images}-seed{seed}-v{FORMAT_VERSION}{size}"


def ensure_embedded(root: str | Path, train_images: int, val_images: int, seed: int = 0,
                    workers: int | None = None, side: int = CANVAS_SIZE) -> Path:
    """Returns embedded_folder(root, ...), generating it first unless a complete copy is there.

    Each parameter set has its own folder, so other counts or another seed never replace a world another run
    uses. Generation goes to a temporary folder renamed into place when complete (see write_once), so a killed
    run is never read as a dataset. workers: processes (default: up to 8). side: the images' side in pixels.
    """
    for name, value in (("data.embedded_train_images", train_images), ("data.embedded_val_images", val_images),
                        ("data.embedded_image_size", side)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    if side < CANVAS_SIZE // 2:
        raise UserError(f"data.embedded_image_size must be at least {CANVAS_SIZE // 2} (small shapes would vanish), "
                        f"got {side}")
    manifest = _manifest(train_images, val_images, seed, side)
    workers = workers or min(8, os.cpu_count() or 1)
    return write_once(embedded_folder(root, train_images, val_images, seed, side),
                      lambda folder: _is_complete(folder, manifest),
                      lambda tmp: _generate(tmp, train_images, val_images, seed, workers, side))


def read_split(folder: str | Path, split: str) -> list[dict]:
    """Each image of a generated split: {"image_id", "path", "scene": Scene, "captions": [str], "held_out": bool}."""
    folder = Path(folder)
    tree = json.loads((folder / f"captions_{split}.json").read_text())
    captions: dict[int, list[str]] = {}
    for ann in tree["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return [{"image_id": im["id"], "path": folder / split / im["file_name"], "scene": Scene.from_dict(im["scene"]),
             "captions": captions.get(im["id"], []), "held_out": im["held_out"]} for im in tree["images"]]


def world_prompts(n: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """n fixed val-distribution captions (plainest phrasing) with their scenes, for sample sheets; no disk needed."""
    prompts = []
    for index in range(n):
        scene, _ = sample_scene(np.random.default_rng([seed, _STREAM["prompts"], index]), "val")
        prompts.append((canonical_caption(scene), scene))
    return prompts
