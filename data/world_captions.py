"""Captions of the embedded world: templates with synonyms that write them, and a reader that parses them back.

parse_caption also reads looser free text (a captioning model's output with a word missing, other synonyms or
word order) into the same Scene, so generated captions can be scored attribute by attribute.
"""
from __future__ import annotations

import re

import numpy as np

from data.world import INVERSE_RELATION, RELATION_POSITIONS, Scene, SceneObject

# Words the templates write; the reader knows these and more (below).
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES = {"left_of": ("to the left of", "left of"), "right_of": ("to the right of", "right of"),
                    "above": ("above", "over"), "below": ("below", "under")}

# {o}/{a}/{b}: "size colour shape"; {p}/{pa}/{pb}: position phrases; {r}: relation of a to b.
SINGLE_TEMPLATES = (
    "a {o} {p}",
    "there is a {o} {p}",
    "{p} there is a {o}",
    "a picture of a {o} {p}",
    "a {size} {shape} in {colour} {p}",
)
PAIR_TEMPLATES = (
    "a {a} {r} a {b}",
    "there is a {a} {r} a {b}",
    "a picture of a {a} {r} a {b}",
    "a {a} {pa} and a {b} {pb}",
    "{pa} a {a} and {pb} a {b}",
)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    return f"{_pick(rng, SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def _fill(template: str, scene: Scene, rng: np.random.Generator) -> str:
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        return template.format(o=_noun_phrase(obj, rng), p=_pick(rng, POSITION_PHRASES[obj.position]),
                               size=_pick(rng, SIZE_WORDS[obj.size]), colour=obj.colour, shape=obj.shape)
    if rng.random() < 0.5:                       # either object may be the subject: all four relation words occur
        scene = scene.swapped()
    a, b = scene.objects
    return template.format(a=_noun_phrase(a, rng), b=_noun_phrase(b, rng),
                           r=_pick(rng, RELATION_PHRASES[scene.relation]),
                           pa=_pick(rng, POSITION_PHRASES[a.position]), pb=_pick(rng, POSITION_PHRASES[b.position]))


def _templates_for(scene: Scene) -> tuple[str, ...]:
    assert len(scene.objects) in (1, 2), "the world has one or two objects per image"
    return SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES


def write_captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """`count` captions of a complete scene, each from a different template (in a random order) while they last."""
    templates = _templates_for(scene)
    order = [int(i) for i in rng.permutation(len(templates))]
    return [_fill(templates[order[k % len(order)]], scene, rng) for k in range(count)]


def canonical_caption(scene: Scene) -> str:
    """The plainest caption (first template, first synonyms, scene order): for prompts and sample sheets."""
    if len(scene.objects) == 1:
        (o,) = scene.objects
        return f"a {SIZE_WORDS[o.size][0]} {o.colour} {o.shape} {POSITION_PHRASES[o.position][0]}"
    a, b = scene.objects
    return (f"a {SIZE_WORDS[a.size][0]} {a.colour} {a.shape} {RELATION_PHRASES[scene.relation][0]} "
            f"a {SIZE_WORDS[b.size][0]} {b.colour} {b.shape}")


# Reader lexicon: the template words plus plausible free-text synonyms.
_COLOUR_LEXICON = {
    "red": "red", "crimson": "red", "scarlet": "red", "orange": "orange", "yellow": "yellow", "gold": "yellow",
    "golden": "yellow", "green": "green", "lime": "green", "cyan": "cyan", "teal": "cyan", "turquoise": "cyan",
    "aqua": "cyan", "blue": "blue", "navy": "blue", "purple": "purple", "violet": "purple", "magenta": "purple",
    "white": "white",
}
_SHAPE_LEXICON = {
    "circle": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "ball": "circle",
    "square": "square", "box": "square", "block": "square", "rectangle": "square", "triangle": "triangle",
    "diamond": "diamond", "rhombus": "diamond", "cross": "cross", "plus": "cross",
}
_SIZE_LEXICON = {"small": "small", "tiny": "small", "little": "small", "smaller": "small", "large": "large",
                 "big": "large", "huge": "large", "larger": "large", "bigger": "large"}
_POSITION_LEXICON = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                     "lower": "bottom", "center": "center", "centre": "center", "middle": "center"}
_RELATION_WORDS = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
                   "underneath": "below"}
# "<word> of" is a relation, unless the image itself follows ("on the left of the picture").
_RELATION_BEFORE_OF = {"left": "left_of", "right": "right_of", "top": "above", "bottom": "below"}
_FRAME_WORDS = {"image", "picture", "photo", "frame", "canvas", "scene"}
_ARTICLES = {"a", "an", "the"}


def _shape_of(word: str) -> str | None:
    """The shape a noun names, plural or not (circles, crosses, boxes); None if it names none."""
    for candidate in (word, word[:-1] if word.endswith("s") else "", word[:-2] if word.endswith("es") else ""):
        if candidate in _SHAPE_LEXICON:
            return _SHAPE_LEXICON[candidate]
    return None


def _events(words: list[str]) -> list[tuple[str, object]]:
    """The caption as ("np", {attr: value}), ("pos", position) and ("rel", relation) events, in order."""
    events: list[tuple[str, object]] = []
    phrase: dict | None = None                    # the noun phrase being read; closed by a shape or other word
    i = 0
    while i < len(words):
        word = words[i]
        attribute = (("colour", _COLOUR_LEXICON[word]) if word in _COLOUR_LEXICON else
                     ("size", _SIZE_LEXICON[word]) if word in _SIZE_LEXICON else
                     ("shape", _shape_of(word)) if _shape_of(word) else None)
        if attribute:
            key, value = attribute
            if phrase is None or "shape" in phrase or key in phrase:
                phrase = {}
                events.append(("np", phrase))
            phrase[key] = value
            i += 1
            continue
        phrase = None                             # any other word ends the phrase ("a large red on the left")
        after = [w for w in words[i + 2:i + 4] if w not in _ARTICLES][:1]
        if word in _RELATION_BEFORE_OF and i + 1 < len(words) and words[i + 1] == "of" \
                and not (after and after[0] in _FRAME_WORDS):
            events.append(("rel", _RELATION_BEFORE_OF[word]))
            i += 2
            continue
        if word in _RELATION_WORDS:
            events.append(("rel", _RELATION_WORDS[word]))
        elif word in _POSITION_LEXICON:
            events.append(("pos", _POSITION_LEXICON[word]))
        i += 1
    return events


def _merge_fragments(events: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Joins a shapeless phrase to the phrase just before it when they do not clash ("a large circle in red")."""
    merged: list[tuple[str, object]] = []
    for kind, value in events:
        if (kind == "np" and "shape" not in value and merged and merged[-1][0] == "np"
                and not set(value) & set(merged[-1][1])):
            merged[-1][1].update(value)
            continue
        merged.append((kind, value))
    return merged


def parse_caption(text: str) -> Scene:
    """Reads a caption ("a big red circle to the left of a small blue square") into a Scene.

    Objects come in the order the text names them; an attribute the text does not give is None. Positions and
    the relation fill each other in for two objects (left_of <-> left/right, above <-> top/bottom).
    """
    events = _merge_fragments(_events(re.findall(r"[a-z]+", text.lower())))
    phrases = [value for kind, value in events if kind == "np"]
    positions: list[str | None] = [None] * len(phrases)
    relation = None
    np_seen = -1                                  # index of the last noun phrase read
    pending_position = None                       # a position said before its noun phrase ("on the left a ...")
    for kind, value in events:
        if kind == "np":
            np_seen += 1
            if pending_position and positions[np_seen] is None:
                positions[np_seen], pending_position = pending_position, None
        elif kind == "pos":
            if np_seen >= 0 and positions[np_seen] is None:
                positions[np_seen] = value
            else:
                pending_position = value
        elif kind == "rel" and relation is None:
            # Relates the phrase before it to the one after; any other placement ("... with a red circle above
            # it") relates the second phrase to the first.
            relation = value if np_seen == 0 else INVERSE_RELATION[value]
    if len(phrases) == 2:
        if relation is not None:
            implied = RELATION_POSITIONS[relation]
            positions = [p or q for p, q in zip(positions, implied)]
        else:
            relation = next((r for r, pair in RELATION_POSITIONS.items() if tuple(positions) == pair), None)
    else:
        relation = None
    objects = tuple(SceneObject(p.get("colour"), p.get("shape"), p.get("size"), pos)
                    for p, pos in zip(phrases, positions))
    return Scene(objects, relation)

