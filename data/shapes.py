"""Shape outlines of the embedded world and their antialiased drawing, shared by the generator and the oracle."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4          # draw at 4x and box-filter down: exact area coverage, so edges are antialiased
_CROSS_ARM = 0.36        # arm width of the plus sign, as a fraction of its side
_CIRCLE_POINTS = 96


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Vertices in the unit square [0, 1]^2 (y down); every shape's tight bounding box is the whole square."""
    if shape == "circle":
        return [(0.5 + 0.5 * math.cos(2 * math.pi * k / _CIRCLE_POINTS),
                 0.5 + 0.5 * math.sin(2 * math.pi * k / _CIRCLE_POINTS)) for k in range(_CIRCLE_POINTS)]
    if shape == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if shape == "triangle":                      # apex up, so it differs from its mirror image
        return [(0.5, 0), (1, 1), (0, 1)]
    if shape == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if shape == "cross":
        a, b = 0.5 - _CROSS_ARM / 2, 0.5 + _CROSS_ARM / 2
        return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    raise ValueError(f"unknown shape '{shape}'")


@lru_cache(maxsize=None)
def shape_moments(shape: str) -> tuple[float, float, float]:
    """(area, centroid u, centroid v) of the shape in its unit square (shoelace formulas)."""
    pts = _unit_outline(shape)
    area = cu = cv = 0.0
    for (u0, v0), (u1, v1) in zip(pts, pts[1:] + pts[:1]):
        cross = u0 * v1 - u1 * v0
        area += cross / 2
        cu += (u0 + u1) * cross / 6
        cv += (v0 + v1) * cross / 6
    return abs(area), cu / area, cv / area


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fills `shape` stretched over box = (x0, y0, width, height), given in the canvas's own pixels.

    Pixel i spans [i, i + 1) and PIL fills every pixel whose centre is inside or on the edge, which would grow a
    shape by half a pixel all round: the outline is drawn through the centres of its rim pixels instead.
    """
    x0, y0, w, h = box
    draw.polygon([(x0 + u * (w - 1), y0 + v * (h - 1)) for u, v in _unit_outline(shape)], fill=fill)


def render_shapes(side: int, background, items: list[tuple[str, tuple[float, float, float, float], tuple]]
                  ) -> Image.Image:
    """An RGB image (side x side) with each (shape, box, rgb) drawn antialiased; boxes in output pixels."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (side * k, side * k), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for shape, (x0, y0, w, h), rgb in items:
        draw_shape(draw, shape, (x0 * k, y0 * k, w * k, h * k), tuple(rgb))
    return canvas.reduce(k)                       # box filter: each output pixel = its area coverage


def shape_template(shape: str, width: int, height: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Coverage in [0, 1] of `shape` stretched over box = (x0, y0, w, h) on a width x height grid: (height, width)."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (width * k, height * k), 0)
    x0, y0, w, h = box
    draw_shape(ImageDraw.Draw(canvas), shape, (x0 * k, y0 * k, w * k, h * k), 255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0
