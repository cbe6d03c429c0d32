"""The embedded world's vocabulary and geometry (colours, shapes, sizes, positions, relations) and its Scene type.

The generator (data/embedded.py), the caption writer/reader (data/world_captions.py) and the oracle
(data/oracle.py) all read these tables, so a word or an anchor is named once.
"""
from __future__ import annotations

from dataclasses import dataclass

# Palette on a dark grey background: hues far apart in RGB (nearest pair ~95 apart), all bright, so a blurry
# or slightly off-colour generated object still lands nearest its own colour.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 230, 50),
    "green": (50, 190, 60),
    "cyan": (50, 210, 220),
    "blue": (50, 80, 230),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
BACKGROUND_RGB = (40, 40, 40)
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Relation of objects[0] to objects[1]; stored scenes use the first of each pair (left_of, above).
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

# Colour-shape pairs drawn only in val (never in train): compositional generalisation. Each colour and shape
# here still appears in train with other partners.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "diamond"))

# Geometry, in pixels of the native canvas; anything else scales by side / CANVAS_SIZE.
CANVAS_SIZE = 64
# Small is 14 px so a blurred small cross still differs from a diamond; large is as big as two fit side by side.
SIZE_PX = {"small": 14.0, "large": 24.0}       # side of the shape's (tight) bounding square
SIZE_JITTER = 0.07                              # relative: small <= 15 px, large >= 22.3 px
SIZE_THRESHOLD_PX = (SIZE_PX["small"] * SIZE_PX["large"]) ** 0.5  # geometric middle, ~16.2
# Anchors (x, y) as fractions of the side. One object sits at any anchor; two objects sit at left+right or
# top+bottom, so a relation word always agrees with the position words.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_JITTER_PX = 2.0                        # uniform +-; anchors are 16 px apart, so cells never blur
PAIR_AXIS_JITTER_PX = 1.0                       # along a pair's axis: two large objects stay >= 4 px apart
RELATION_POSITIONS = {"left_of": ("left", "right"), "right_of": ("right", "left"),
                      "above": ("top", "bottom"), "below": ("bottom", "top")}


@dataclass(frozen=True)
class SceneObject:
    """One object; None marks an attribute a caption did not say."""
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """Objects in an image and, for two objects, the relation of objects[0] to objects[1] (a RELATIONS word)."""
    objects: tuple[SceneObject, ...] = ()
    relation: str | None = None

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, tree: dict) -> Scene:
        """Reads to_dict's output or a COCO image entry's "scene" (extra keys such as "bbox" are ignored)."""
        objects = tuple(SceneObject(o.get("colour"), o.get("shape"), o.get("size"), o.get("position"))
                        for o in tree.get("objects", ()))
        return cls(objects, tree.get("relation"))

    def swapped(self) -> Scene:
        """The same scene with objects[0] and objects[1] exchanged and the relation inverted."""
        assert len(self.objects) == 2, "only a two-object scene can be swapped"
        relation = INVERSE_RELATION.get(self.relation) if self.relation else None
        return Scene((self.objects[1], self.objects[0]), relation)

    def has_held_out(self) -> bool:
        """True when some object is a val-only colour-shape pair."""
        return any((o.colour, o.shape) in HELD_OUT_COMBOS for o in self.objects)
