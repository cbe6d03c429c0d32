"""Attributes of a domain's images, and the prompts built from them. Attribute tables are text files users edit
(`<group>.txt`: one value per line, `#` comments, `# template: a photo of a {} {garment}` setting the text a value is
scored with, `{group}` being that group's top value for the same image). Images get zero-shot features over them
(CLIP-style softmax over scaled cosines), the text embeddings cached by the weights and the tables' content. A choice
(group -> values) becomes a prompt ("a photo of a red dress"); type_only, the garment alone, is the naive baseline."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.files import atomic_write
from configs.errors import UserError
from specialize.adapters import chunked

logger = logging.getLogger(__name__)
DEFAULT_ATTRIBUTES_DIR = Path(__file__).resolve().parent / "attributes"
DEFAULT_TEMPLATE = "a photo of a {}"
_TEMPLATE_LINE = re.compile(r"^#\s*template:\s*(.+?)\s*$", re.IGNORECASE)
# Modifiers in English adjective order before the head noun; groups not listed come after these.
MODIFIER_ORDER = ("style", "colour", "color", "pattern", "material")
NAIVE_STRATEGY = "type_only"
ATTRIBUTE_STRATEGIES = ("type_only", "top1", "high_confidence", "all_attributes")
STRATEGIES = (*ATTRIBUTE_STRATEGIES, "caption", "pez", "refine")
Choice = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class AttributeTable:
    """One group's values and scoring template; `refs` are the groups its template names."""
    group: str
    values: tuple[str, ...]
    template: str
    refs: tuple[str, ...]

    def texts(self, context: dict[str, str]) -> list[str]:
        """The scoring text of every value, with `{group}` fields taken from context (group -> chosen value)."""
        return [self.template.format(value, **context) for value in self.values]


def parse_table(path: Path) -> AttributeTable:
    """Reads one table file; an empty table or a template without `{}` is a UserError naming the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"attribute table {path} cannot be read ({type(err).__name__}); "
                        "it must be a UTF-8 text file with one value per line") from None
    template, values = DEFAULT_TEMPLATE, []
    for line in lines:
        line = line.strip()
        match = _TEMPLATE_LINE.match(line)
        if match:
            template = match.group(1)
        elif line and not line.startswith("#"):
            values.append(" ".join(line.split()))
    group = path.stem
    if not values:
        raise UserError(f"attribute table {path} lists no values; put one value per line (# starts a comment)")
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if "" not in fields:
        raise UserError(f"attribute table {path}: the template '{template}' needs a {{}} where the value goes")
    refs = tuple(dict.fromkeys(name for name in fields if name))
    if group in refs:
        raise UserError(f"attribute table {path}: the template cannot name its own group {{{group}}}")
    return AttributeTable(group, tuple(dict.fromkeys(values)), template, refs)


def load_attribute_tables(folder: str | Path, type_group: str = "garment") -> list[AttributeTable]:
    """Every `*.txt` table in folder, each after the groups its template names. type_group, the head noun of every
    prompt (alone, the naive baseline), must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"attribute folder {folder} does not exist; give a folder of <group>.txt tables "
                        f"(the shipped ones are in {DEFAULT_ATTRIBUTES_DIR})")
    tables = {path.stem: parse_table(path) for path in sorted(folder.glob("*.txt"))}
    if type_group not in tables:
        raise UserError(f"attribute folder {folder} has no {type_group}.txt; the garment-type table is required "
                        f"(it gives the naive type-only prompt)")
    ordered: dict[str, AttributeTable] = {}
    while len(ordered) < len(tables):  # topological order over template references
        ready = [t for g, t in tables.items() if g not in ordered and all(r in ordered for r in t.refs)]
        if not ready:
            bad = next(t for g, t in tables.items() if g not in ordered)
            unknown = [r for r in bad.refs if r not in tables]
            detail = f"names unknown group {{{unknown[0]}}}" if unknown else "references form a cycle"
            raise UserError(f"attribute table {folder / (bad.group + '.txt')}: its template {detail}")
        ordered.update((t.group, t) for t in ready)
    return list(ordered.values())


def tables_hash(tables: list[AttributeTable]) -> str:
    """A short content hash of the tables (values and templates): the text-embedding disk cache key."""
    digest = hashlib.sha256()
    for table in sorted(tables, key=lambda t: t.group):
        digest.update(f"{table.group}\0{table.template}\0{chr(1).join(table.values)}\n".encode())
    return digest.hexdigest()[:16]


class TextEmbeddingCache:
    """texts -> normalised embeds (N, E) from adapter.encode_texts, each text embedded at most once; on disk under
    weights_key (a checksum of the encoder's weights) and the tables' content hash."""

    def __init__(self, adapter, tables: list[AttributeTable], cache_dir: str | Path | None = None,
                 weights_key: str = ""):
        self.adapter = adapter
        self.memory: dict[str, torch.Tensor] = {}
        self.path = Path(cache_dir) / f"{weights_key}-{tables_hash(tables)}.safetensors" if cache_dir else None
        self.encoded = 0  # texts sent to the encoder this run, none of them on disk yet
        if self.path is not None and self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            with safe_open(self.path, framework="pt") as f:
                texts = json.loads(f.metadata()["texts"])
                embeds = f.get_tensor("embeds")
            if len(embeds) != len(texts):
                raise ValueError("not one embedding per text")
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:   # ValueError: JSON too
            logger.warning("ignoring damaged text-embedding cache %s (%s)", self.path, type(err).__name__)
            return
        self.memory.update(zip(texts, embeds))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """N texts -> (N, E) on the CPU."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        if missing:
            self.memory.update(zip(missing, chunked(self.adapter.encode_texts, missing)))
        self.encoded += len(missing)
        return torch.stack([self.memory[t] for t in texts])

    def save(self) -> None:
        """Writes the cache if this run embedded new texts (atomically: a reader never sees half a file)."""
        if self.path is None or not self.encoded:
            return
        texts = list(self.memory)
        embeds = torch.stack([self.memory[t] for t in texts]).contiguous()
        atomic_write(self.path, lambda tmp: save_file({"embeds": embeds}, tmp, metadata={"texts": json.dumps(texts)}))


@dataclass
class GroupScores:
    """One image's zero-shot ranking of one table: values and softmax probabilities, best first."""
    group: str
    values: list[str]
    probs: list[float]

    @property
    def top(self) -> str:
        return self.values[0]

    @property
    def confidence(self) -> float:
        return self.probs[0]

    def to_json(self, k: int = 3) -> dict:
        return {"top": [{"value": v, "prob": round(p, 4)} for v, p in zip(self.values[:k], self.probs[:k])]}


Features = dict[str, GroupScores]  # group -> ranking, in table order


def score_attributes(image_embeds: torch.Tensor, tables: list[AttributeTable], cache: TextEmbeddingCache,
                     logit_scale: float) -> list[Features]:
    """image_embeds (B, E) normalised -> B feature dicts. Tables come in dependency order (load_attribute_tables),
    so a template's `{garment}` is filled with that image's top garment, scored just before."""
    image_embeds = image_embeds.float().cpu()
    features: list[Features] = [{} for _ in range(len(image_embeds))]
    for table in tables:
        # Images sharing a context (the top values their template names) share one text batch.
        groups: dict[tuple, list[int]] = {}
        for i, feats in enumerate(features):
            groups.setdefault(tuple(feats[r].top for r in table.refs), []).append(i)
        for context, rows in groups.items():
            text_embeds = cache.embed(table.texts(dict(zip(table.refs, context))))            # (V, E)
            probs = (logit_scale * image_embeds[rows] @ text_embeds.t()).softmax(dim=-1)     # (b, V)
            for row, p in zip(rows, probs):
                order = p.argsort(descending=True).tolist()
                features[row][table.group] = GroupScores(table.group, [table.values[j] for j in order],
                                                         [float(p[j]) for j in order])
    return features


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
