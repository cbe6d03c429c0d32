"""Zero-shot image features over the attribute tables (CLIP-style: softmax over scaled cosines), no gradients.

Text embeddings are cached in memory for the run and on disk as safetensors, keyed by the backend's weights and
the tables' content hash, so an unchanged checkpoint + tables pair embeds each text once.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.files import atomic_write
from specialize.attribute_tables import AttributeTable, tables_hash

logger = logging.getLogger(__name__)
_EMBED_BATCH = 64


class TextEmbeddingCache:
    """texts -> normalised embeds (N, E) from backend.encode_texts, each text embedded at most once."""

    def __init__(self, backend, tables: list[AttributeTable], cache_dir: str | Path | None = None):
        self.backend = backend
        self.memory: dict[str, torch.Tensor] = {}
        self.path = Path(cache_dir) / f"{backend.identity()}-{tables_hash(tables)}.safetensors" if cache_dir else None
        self.new_texts = 0
        self.encoded = 0  # texts sent to the encoder this run (tests check the cache with it)
        if self.path is not None and self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            with safe_open(self.path, framework="pt") as f:
                texts = json.loads(f.metadata()["texts"])
                embeds = f.get_tensor("embeds")
        except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as err:
            logger.warning("ignoring damaged text-embedding cache %s (%s)", self.path, type(err).__name__)
            return
        if len(embeds) != len(texts):
            logger.warning("ignoring damaged text-embedding cache %s", self.path)
            return
        self.memory.update(zip(texts, embeds))

    def embed(self, texts: list[str]) -> torch.Tensor:
        """N texts -> (N, E) on the CPU."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        for start in range(0, len(missing), _EMBED_BATCH):
            chunk = missing[start:start + _EMBED_BATCH]
            self.memory.update(zip(chunk, self.backend.encode_texts(chunk).float().cpu()))
        self.encoded += len(missing)
        self.new_texts += len(missing)
        return torch.stack([self.memory[t] for t in texts])

    def save(self) -> None:
        """Writes the cache if this run embedded new texts (atomically: a reader never sees half a file)."""
        if self.path is None or not self.new_texts:
            return
        texts = list(self.memory)
        embeds = torch.stack([self.memory[t] for t in texts]).contiguous()
        atomic_write(self.path, lambda tmp: save_file({"embeds": embeds}, tmp, metadata={"texts": json.dumps(texts)}))
        self.new_texts = 0


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
