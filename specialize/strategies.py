"""Prompt strategies: attribute choices built from zero-shot features, and the text they compose into.

A choice maps group -> chosen values ({"colour": ["red"], "garment": ["dress"]}); compose_prompt turns it into
"a photo of a red dress". type_only (the garment alone) is the naive baseline every report compares against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from specialize.features import Features

# Modifiers in English adjective order before the head noun; groups not listed come after these.
MODIFIER_ORDER = ("style", "colour", "color", "pattern", "material")
NAIVE_STRATEGY = "type_only"
ATTRIBUTE_STRATEGIES = ("type_only", "top1", "high_confidence", "all_attributes")
STRATEGIES = (*ATTRIBUTE_STRATEGIES, "caption", "pez", "refine")
Choice = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class PromptStyle:
    """How choices become text, and the thresholds the confidence-based strategies use."""
    type_group: str = "garment"
    prefix: str = "a photo of"
    confidence: float = 0.5        # high_confidence keeps a group whose top value has at least this probability
    secondary_prob: float = 0.25   # all_attributes adds a group's second value when it has at least this
    max_per_group: int = 2


def _article(phrase: str, head: str) -> str:
    """'a red dress', 'an orange coat', 'red trousers' (a plural head noun takes no article)."""
    last = head.split()[-1]
    if last.endswith("s") and not last.endswith("ss"):
        return phrase
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def compose_prompt(choice: Choice, style: PromptStyle) -> str:
    """{"colour": ("red",), "garment": ("dress",)} -> 'a photo of a red dress'."""
    head = " and ".join(choice[style.type_group])
    modifiers = [g for g in MODIFIER_ORDER if g in choice] + sorted(
        g for g in choice if g not in MODIFIER_ORDER and g != style.type_group)
    words = [" and ".join(choice[g]) for g in modifiers if choice[g]]
    phrase = _article(" ".join([*words, head]), head)
    return f"{style.prefix} {phrase}".strip() if style.prefix else phrase


def attribute_choice(strategy: str, features: Features, style: PromptStyle) -> Choice:
    """The choice one attribute strategy makes from one image's features."""
    t = style.type_group
    if strategy == "type_only":
        return {t: (features[t].top,)}
    if strategy == "top1":
        return {g: (s.top,) for g, s in features.items()}
    if strategy == "high_confidence":
        return {g: (s.top,) for g, s in features.items() if g == t or s.confidence >= style.confidence}
    if strategy == "all_attributes":
        choice = {}
        for g, s in features.items():
            extra = [v for v, p in zip(s.values[1:style.max_per_group], s.probs[1:style.max_per_group])
                     if p >= style.secondary_prob and g != t]
            choice[g] = (s.top, *extra)
        return choice
    raise AssertionError(f"not an attribute strategy: {strategy}")


def choice_neighbours(choice: Choice, features: Features, style: PromptStyle, alternatives: int = 2
                      ) -> Iterator[Choice]:
    """Single edits of a choice for the refine search, most plausible first: swap one group's value for its
    next-ranked one (by zero-shot probability), add a missing group, or drop an unsure modifier."""
    edits: list[tuple[float, Choice]] = []
    for g, s in features.items():
        current = choice.get(g, ())
        for value, prob in list(zip(s.values, s.probs))[:alternatives + 1]:
            if (value,) != tuple(current):
                edits.append((prob, {**choice, g: (value,)}))
        if g in choice and g != style.type_group:
            edits.append((1.0 - s.confidence, {k: v for k, v in choice.items() if k != g}))
    for _, neighbour in sorted(edits, key=lambda e: -e[0]):
        yield neighbour
