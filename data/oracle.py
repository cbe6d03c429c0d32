"""The embedded world's oracle: reads any image (real or generated) and any caption into a Scene, and compares them.

read_image finds objects against the border colour, names each by nearest palette colour and by the shape
template that best fits its coverage (which also gives size and place); parse_caption (data/world_captions.py)
reads text; compare scores a prediction against the truth per attribute, object order ignored.
"""
from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from data.shapes import shape_moments, shape_template
from data.world import (CANVAS_SIZE, COLOUR_RGB, COLOURS, INVERSE_RELATION, POSITION_ANCHORS, SHAPES,
                        SIZE_THRESHOLD_PX, Scene, SceneObject)
from data.world_captions import parse_caption

__all__ = ["read_image", "parse_caption", "compare", "summarize", "MIN_IMAGE_SIDE"]

MIN_IMAGE_SIDE = 16
ATTRIBUTES = ("colour", "shape", "size", "position")
_FOREGROUND = 60.0           # RGB distance from the background; the dimmest palette colour (green) is 152 away
_MIN_AREA = 16               # px at 64 (scaled with the side): a small object covers >= 60, smoothed noise less
_PAD = 3                     # px at 64 around an object where its blurred edge still adds coverage
_EXTRA_BLURS = 7             # template blur levels tried: 0..6 passes of a 3x3 box (sigma up to 2 px)
_MAX_OBJECTS = 4
_PALETTE = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)   # (K, 3)


def _as_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) array (uint8, or floats in 0..1) -> (S, S, 3) float32 in 0..255, S = min(side, 64).

    Small images are read at their own size, since upsampling would add a blur no template expects.
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
        if np.issubdtype(array.dtype, np.floating):              # 0..1, as torch/diffusers hand images out
            array = (np.clip(array, 0, 1) * 255).round()
        array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    image = image.convert("RGB")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}; the oracle needs at least {MIN_IMAGE_SIDE} px")
    side = min(CANVAS_SIZE, *image.size)
    if image.size != (side, side):
        image = image.resize((side, side), Image.BOX)             # area average, as the world is drawn
    return np.asarray(image, dtype=np.float32)


def _smooth(x: np.ndarray) -> np.ndarray:
    """3x3 box mean over the first two axes of (H, W, ...), the border repeated; cuts pixel noise by 3x."""
    padded = np.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]                # (H, W + 2, ...)
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _blur_stack(x: np.ndarray) -> np.ndarray:
    """3x3 box mean of (N, H, W), zero outside (templates are empty there)."""
    padded = np.zeros((x.shape[0], x.shape[1] + 2, x.shape[2] + 2), dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]       # (N, H, W + 2)
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / 9.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a (H, W) bool mask, each as an (N, 2) array of (y, x), largest first.

    Each pixel takes the smallest label among itself and its 8 neighbours until nothing changes.
    """
    h, w = mask.shape
    none = h * w                                                  # label of background pixels
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        neighbours = np.min([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        updated = np.where(mask, neighbours, none)
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[mask], return_counts=True)
    return [np.argwhere(labels == v) for v in values[np.argsort(-counts, kind="stable")]]


def _colour_scores(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Distance of (N, 3) colours to each palette colour's line from the background: (N, K).

    Sliding along the line (0.6x..1.2x the contrast) forgives dim or washed-out generated colours.
    """
    target = _PALETTE - background                               # (K, 3)
    offset = rgb[:, None, :] - background                        # (N, 1, 3)
    scale = np.clip((offset * target).sum(-1) / (target * target).sum(-1), 0.6, 1.2)   # (N, K)
    return np.linalg.norm(offset - scale[..., None] * target, axis=-1)


def _fit_shape(coverage: np.ndarray) -> tuple[str, float, float, float]:
    """The shape template that best fits a (h, w) window of object coverage (0 outside, ~1 inside).

    Per shape, the side comes from the total coverage and the place from the centroid; both survive blur,
    unlike the outline. Templates are tried sharp and blurred (generated images are blurry); the least
    squared error wins. Returns (shape, side, centre x, centre y) in window pixels.
    """
    h, w = coverage.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5                              # pixel centres
    mass = max(float(coverage.sum()), 1e-6)
    cx, cy = float((coverage * xs).sum()) / mass, float((coverage * ys).sum()) / mass
    boxes, templates = [], []
    for shape in SHAPES:
        area, cu, cv = shape_moments(shape)
        side = (mass / area) ** 0.5
        boxes.append((side, cx - cu * side + side / 2, cy - cv * side + side / 2))
        templates.append(shape_template(shape, w, h, (cx - cu * side, cy - cv * side, side, side)))
    templates = np.stack(templates)                               # (len(SHAPES), h, w)
    target = np.clip(coverage, 0, 1)
    errors = np.full(len(SHAPES), np.inf)
    for _ in range(_EXTRA_BLURS):
        errors = np.minimum(errors, ((templates - target) ** 2).sum(axis=(1, 2)))
        templates = _blur_stack(templates)
    best = int(np.argmin(errors))
    return (SHAPES[best], *boxes[best])


def _nearest_position(cx: float, cy: float, side: int) -> str:
    return min(POSITION_ANCHORS, key=lambda p: (POSITION_ANCHORS[p][0] * side - cx) ** 2
               + (POSITION_ANCHORS[p][1] * side - cy) ** 2)


def _read_object(pixels: np.ndarray, labels: np.ndarray, rgb: np.ndarray, strength: np.ndarray,
                 background: np.ndarray):
    """One component, (N, 2) of (y, x) -> (SceneObject, centre (x, y), area in px)."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    values = strength[ys, xs]
    core_rgb = rgb[ys, xs][values >= 0.8 * np.percentile(values, 90)].mean(0)   # (3,) the object's own colour
    colour = COLOURS[int(np.argmin(_colour_scores(core_rgb[None], background)[0]))]
    # Coverage = projection on (object colour - background): zero-mean under noise, unlike a distance, so the
    # blurred edge just outside the component adds up to the shape's true area.
    scale = rgb.shape[0] / CANVAS_SIZE
    pad = max(2, round(_PAD * scale))
    wy0, wx0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
    window = (slice(wy0, int(ys.max()) + 1 + pad), slice(wx0, int(xs.max()) + 1 + pad))
    direction = core_rgb - background
    coverage = ((rgb[window] - background) @ direction) / float(direction @ direction)
    own = labels[ys[0], xs[0]]
    coverage[(labels[window] != own) & (labels[window] != 0)] = 0.0   # a neighbour's pixels are not ours
    # Full coverage = the object's own brightest level, so a dim or glaring generated object keeps its size.
    coverage /= max(float(np.percentile(coverage[labels[window] == own], 95)), 1e-3)
    shape, side, cx, cy = _fit_shape(coverage)
    cx, cy = cx + wx0, cy + wy0
    size = "large" if side > SIZE_THRESHOLD_PX * scale else "small"
    return SceneObject(colour, shape, size, _nearest_position(cx, cy, rgb.shape[0])), (cx, cy), len(pixels)


def read_image(image) -> Scene:
    """Reads the objects of an image (PIL or (H, W, 3) uint8, any size >= 16 px) into a Scene.

    Two or more objects come left/top first with the relation of the first two (left_of or above);
    at most 4 objects, largest first beyond the first two.
    """
    rgb = _as_array(image)                                        # (S, S, 3)
    # Smoothing fights pixel noise; below 32 px the downscale has already averaged it, and a 3x3 box would merge
    # two objects one pixel apart.
    smooth = _smooth(rgb) if rgb.shape[0] >= 32 else rgb
    border = np.concatenate([smooth[:2].reshape(-1, 3), smooth[-2:].reshape(-1, 3),
                             smooth[:, :2].reshape(-1, 3), smooth[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)                        # (3,)
    strength = np.linalg.norm(smooth - background, axis=-1)       # (S, S)
    min_area = max(2, round(_MIN_AREA * (rgb.shape[0] / CANVAS_SIZE) ** 2))
    parts = [p for p in _components(strength > _FOREGROUND) if len(p) >= min_area]
    labels = np.zeros(strength.shape, dtype=np.int32)             # 0: background or a dropped speck
    for number, part in enumerate(parts, start=1):
        labels[part[:, 0], part[:, 1]] = number
    read = sorted((_read_object(p, labels, rgb, strength, background) for p in parts),
                  key=lambda r: -r[2])[:_MAX_OBJECTS]
    if len(read) < 2:
        return Scene(tuple(r[0] for r in read), None)
    first, second = read[0], read[1]
    dx, dy = second[1][0] - first[1][0], second[1][1] - first[1][1]
    if (abs(dx) >= abs(dy) and dx < 0) or (abs(dy) > abs(dx) and dy < 0):
        first, second = second, first                             # the left/top one first
    relation = "left_of" if abs(dx) >= abs(dy) else "above"
    return Scene((first[0], second[0], *(r[0] for r in read[2:])), relation)


def _agrees(pred: SceneObject | None, truth: SceneObject, attribute: str) -> bool:
    wanted = getattr(truth, attribute)
    return wanted is None or (pred is not None and getattr(pred, attribute) == wanted)


def compare(predicted: Scene, truth: Scene) -> dict[str, bool]:
    """Per-attribute correctness of a prediction, object order ignored.

    Each truth object is matched to a distinct predicted object (the assignment agreeing on most attributes).
    An attribute is right when every truth object's match has it; None in the truth means "not said" and
    accepts anything. relation: the matched pair's relation (other than two-object truths: the prediction has
    none).
    Returns {"colour", "shape", "size", "position", "relation", "count", "all"}.
    """
    n, m = len(truth.objects), len(predicted.objects)
    slots = list(range(m)) + [None] * max(n - m, 0)              # None: that truth object has no match
    best, best_score = None, -1
    for assignment in itertools.permutations(slots, n):
        score = sum(_agrees(predicted.objects[j] if j is not None else None, t, a) and j is not None
                    for t, j in zip(truth.objects, assignment) for a in ATTRIBUTES)
        if score > best_score:
            best, best_score = assignment, score
    matched = [predicted.objects[j] if j is not None else None for j in best]
    result = {a: all(_agrees(p, t, a) for p, t in zip(matched, truth.objects)) for a in ATTRIBUTES}
    result["count"] = n == m
    if n == 2 and truth.relation is not None:
        pairs = {(0, 1): predicted.relation, (1, 0): INVERSE_RELATION.get(predicted.relation)}
        result["relation"] = pairs.get(tuple(best)) == truth.relation
    elif n == 2:
        result["relation"] = True
    else:
        result["relation"] = predicted.relation is None
    result["all"] = all(result.values())
    return result


def summarize(results: list[dict[str, bool]]) -> dict[str, float]:
    """Mean of each key over compare() results: accuracy per attribute, count, relation and all."""
    if not results:
        return {}
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}
