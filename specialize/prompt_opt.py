"""Prompt optimisation for a domain, weights untouched: zero-shot attribute features -> prompt strategies -> images
from fixed seeds -> target-to-generated similarity -> the best prompt per target within a budget. Writes
<out>/prompt/targets/<id>.json, summary.json and contact_sheet.png. Fresh held-out seeds score the naive and the
chosen prompt again, so the reported gain is not the luck of the seeds that picked the winner."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from configs.errors import UserError
from evaluation.fashion_classifier import FashionAgreement
from specialize.adapters import chunked, weights_checksum
from specialize.attributes import (ATTRIBUTE_STRATEGIES, DEFAULT_ATTRIBUTES_DIR, NAIVE_STRATEGY, STRATEGIES,
                                   AttributeTable, Features, PromptStyle, TextEmbeddingCache, attribute_choice,
                                   choice_neighbours, compose_prompt, load_attribute_tables, score_attributes)
from specialize.domain import Target, domain_classifier, find_targets, read_targets
from specialize.loading import load_adapter
from specialize.pez import pez_search
from specialize.reports import contact_sheet, summarize, write_json
from specialize.search import PromptSearch, Proposal, Score

logger = logging.getLogger("duet.specialize.prompt")
HELDOUT_SEED_OFFSET = 10_000   # held-out seeds never overlap the selection seeds
DEFAULT_STRATEGIES = ("type_only", "caption", "top1", "high_confidence", "all_attributes", "pez", "refine")
MINIMUMS = {"num_images": 1, "budget": 1, "heldout_images": 0, "patience": 0, "pez_steps": 0, "pez_tokens": 0,
            "num_targets": 0}   # specialize/cli.py checks these


@dataclass
class PromptOptSettings:
    """Everything `--mode prompt` needs beyond the adapter and the targets."""
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    style: PromptStyle = field(default_factory=PromptStyle)
    num_images: int = 2            # images per prompt (selection seeds)
    heldout_images: int = 2        # images per prompt on the held-out seeds; 0 skips the held-out check
    steps: int | None = None              # None: the generator's default (a Duet checkpoint's sample section)
    guidance_scale: float | None = None
    budget: int = 10               # evaluations (generation rounds) per target, the naive prompt included
    patience: int = 4              # stop after this many evaluations without a gain; 0: never
    min_delta: float = 0.0
    pez_steps: int = 40
    pez_tokens: int = 0            # 0: as many tokens as the best prompt so far
    pez_lr: float = 0.1
    classifier_weight: float = 0.5  # score = (1 - w) * similarity + w * classifier agreement, when there is one
    seed: int = 0

    def seeds(self, heldout: bool = False) -> list[int]:
        n, offset = (self.heldout_images, HELDOUT_SEED_OFFSET) if heldout else (self.num_images, 0)
        return [self.seed + offset + i for i in range(n)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode prompt (specialize/cli.py owns --checkpoint, --backend, --dataset, --out, ...)."""
    d = PromptOptSettings()
    g = parser.add_argument_group("prompt optimisation (--mode prompt)")
    g.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES_DIR),
                   help="folder of attribute tables <group>.txt (default: the shipped garment/colour/pattern/style)")
    g.add_argument("--type-group", default=d.style.type_group, help="the table naming the object type (head noun)")
    g.add_argument("--strategies", default=",".join(d.strategies),
                   help=f"comma-separated, in evaluation order, from {','.join(STRATEGIES)}; type_only (the naive "
                        "baseline) is always evaluated first")
    g.add_argument("--prompt-prefix", default=d.style.prefix, help="text before every attribute prompt")
    g.add_argument("--confidence", type=float, default=d.style.confidence,
                   help="high_confidence keeps a group whose top value has at least this zero-shot probability")
    g.add_argument("--num-targets", type=int, default=8, help="target images from the split (0: all)")
    g.add_argument("--target-split", default="val", help="split of a COCO-format dataset to take targets from")
    g.add_argument("--num-images", type=int, default=d.num_images, help="images generated per prompt")
    g.add_argument("--heldout-images", type=int, default=d.heldout_images,
                   help="images per prompt on fresh seeds to re-score naive vs chosen (0: skip)")
    g.add_argument("--budget", type=int, default=d.budget, help="evaluations per target, naive included")
    g.add_argument("--patience", type=int, default=d.patience, help="early stop after N evaluations without gain")
    g.add_argument("--pez-steps", type=int, default=d.pez_steps, help="PEZ optimisation steps")
    g.add_argument("--pez-tokens", type=int, default=d.pez_tokens, help="PEZ prompt length (0: best prompt's)")
    g.add_argument("--classifier-weight", type=float, default=d.classifier_weight,
                   help="weight of the domain classifier's agreement in the score (0: similarity only)")
    g.add_argument("--no-classifier", action="store_true", help="score by image similarity alone")
    g.add_argument("--cache-dir", default="outputs/cache/attribute_embeddings",
                   help="disk cache of attribute-text embeddings ('' disables)")


def settings_from_args(args) -> PromptOptSettings:
    names = tuple(dict.fromkeys(s.strip() for s in args.strategies.split(",") if s.strip()))
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy '{unknown[0]}' in --strategies; choose from {', '.join(STRATEGIES)}")
    if not 0 <= args.classifier_weight <= 1:
        raise UserError(f"--classifier-weight must be between 0 and 1, got {args.classifier_weight}")
    style = PromptStyle(type_group=args.type_group, prefix=args.prompt_prefix.strip(), confidence=args.confidence)
    return PromptOptSettings(
        strategies=(NAIVE_STRATEGY, *(s for s in names if s != NAIVE_STRATEGY)), style=style,
        num_images=args.num_images, heldout_images=args.heldout_images, steps=args.steps,
        guidance_scale=args.guidance_scale, budget=args.budget, patience=args.patience, pez_steps=args.pez_steps,
        pez_tokens=args.pez_tokens, classifier_weight=0.0 if args.no_classifier else args.classifier_weight,
        seed=args.seed)


class PromptScorer:
    """Generates images for a prompt from fixed seeds and scores them against one target."""

    def __init__(self, adapter, settings: PromptOptSettings, classifier=None):
        self.adapter, self.settings, self.classifier = adapter, settings, classifier
        self.images: dict[tuple[str, bool], torch.Tensor] = {}   # (prompt, heldout) -> images, for the sheet

    def __call__(self, target: Target, target_embed: torch.Tensor, prompt: str, heldout: bool = False) -> Score:
        s = self.settings
        seeds = s.seeds(heldout)
        images = self.adapter.generate([prompt] * len(seeds), seeds, s.steps, s.guidance_scale)   # (N, 3, H, W)
        self.images[(prompt, heldout)] = images[:1].cpu()
        similarity = float((self.adapter.encode_images(images).float().cpu() @ target_embed).mean())
        agreement = self.classifier.agreement(images, target) if self.classifier is not None else None
        parts = dict(getattr(self.classifier, "parts", {})) if agreement is not None else None
        w = s.classifier_weight if agreement is not None else 0.0
        score = round((1 - w) * similarity + w * (agreement or 0.0), 6)
        return Score(round(similarity, 6), agreement, score, agreement_parts=parts or None)


def propose(search: PromptSearch, adapter, target: Target, target_embed: torch.Tensor, features: Features,
            settings: PromptOptSettings) -> Iterator[Proposal]:
    """The candidates for one target in strategy order; pez and refine start from the best prompt so far."""
    style = settings.style
    for name in settings.strategies:
        if name in ATTRIBUTE_STRATEGIES:
            choice = attribute_choice(name, features, style)
            yield Proposal(name, compose_prompt(choice, style), choice)
        elif name == "caption":
            captions = adapter.caption(target.image[None])
            if captions and captions[0].strip():
                yield Proposal(name, captions[0].strip())
        elif name == "pez":
            init = adapter.tokenizer(search.best.prompt, add_special_tokens=False)["input_ids"]
            result = pez_search(adapter, target_embed, num_tokens=settings.pez_tokens or max(1, min(len(init), 16)),
                                steps=settings.pez_steps, lr=settings.pez_lr, init_ids=init, seed=settings.seed)
            if result.prompt:
                yield Proposal(name, result.prompt, extra={"pez_text_cosine": round(result.cosine, 4),
                                                           "pez_initial_text_cosine": round(result.history[0], 4)})
    if "refine" in settings.strategies:
        yield from refine(search, features, settings)


def refine(search: PromptSearch, features: Features, settings: PromptOptSettings) -> Iterator[Proposal]:
    """Greedy coordinate search on attribute choices: single edits of the best attribute prompt, restarting
    from each new best; ends when a full neighbourhood brings no gain (or the search's budget stops it)."""
    def best_with_choice():
        return max((c for c in search.candidates if c.choice is not None), key=lambda c: c.score, default=None)

    tried: set[str] = set()
    while (base := best_with_choice()) is not None:
        for neighbour in choice_neighbours(base.choice, features, settings.style):
            prompt = compose_prompt(neighbour, settings.style)
            if prompt in tried or any(c.prompt == prompt for c in search.candidates):
                continue
            tried.add(prompt)
            yield Proposal("refine", prompt, neighbour)
            if best_with_choice() is not base:
                break  # a better base: rebuild the neighbourhood around it
        else:
            return


def optimize_target(adapter, target: Target, target_embed: torch.Tensor, features: Features,
                    settings: PromptOptSettings, scorer: PromptScorer) -> dict:
    """Runs the search for one target; returns its report (JSON-ready)."""
    search = PromptSearch(lambda prompt: scorer(target, target_embed, prompt), settings.budget, settings.patience,
                          settings.min_delta)
    best = search.run(propose(search, adapter, target, target_embed, features, settings))
    naive = next(c for c in search.candidates if c.strategy == NAIVE_STRATEGY)
    report = {
        "image_id": target.image_id, "file": str(target.path), "labels": target.labels,
        "captions": target.captions[:1],
        "features": {g: s.to_json() for g, s in features.items()},
        "optimized_prompt": best.prompt, "strategy": best.strategy,
        "similarity_score": best.similarity, "agreement": best.agreement, "score": best.score,
        "naive": {"prompt": naive.prompt, "similarity": naive.similarity, "agreement": naive.agreement,
                  "score": naive.score},
        "evaluations": search.evaluations, "stopped": search.stopped,
        "candidates": [c.to_json() for c in search.candidates],
    }
    if settings.heldout_images:
        heldout = {}
        for key, prompt in (("naive", naive.prompt), ("optimized", best.prompt)):
            score = scorer(target, target_embed, prompt, heldout=True)
            heldout[key] = {"prompt": prompt, **asdict(score)}
        report["heldout"] = {"seeds": settings.seeds(heldout=True), **heldout}
    return report


def optimize_prompts(adapter, targets: list[Target], tables: list[AttributeTable], settings: PromptOptSettings,
                     out_dir: str | Path, classifier=None, cache_dir: str | Path | None = None) -> dict:
    """The whole pipeline over targets; writes the reports under out_dir and returns the summary."""
    out_dir = Path(out_dir)
    started = time.time()
    checksum_before = weights_checksum(adapter.modules())
    cache = TextEmbeddingCache(adapter, tables, cache_dir, checksum_before[:16])
    images = torch.stack([t.image for t in targets])                                    # (N, 3, H, W)
    target_embeds = chunked(adapter.encode_images, images)                              # (N, E)
    all_features = score_attributes(target_embeds, tables, cache, adapter.logit_scale)
    cache.save()
    scorer = PromptScorer(adapter, settings, classifier)
    reports, sheet_rows = [], []
    for i, (target, embed, features) in enumerate(zip(targets, target_embeds, all_features)):
        report = optimize_target(adapter, target, embed, features, settings, scorer)
        write_json(out_dir / "targets" / f"{target.image_id}.json", report)
        reports.append(report)
        heldout = settings.heldout_images > 0
        shown = [report["heldout"][k] for k in ("naive", "optimized")] if heldout else [
            report["naive"], {"prompt": report["optimized_prompt"], "score": report["score"]}]
        label = " ".join(str(target.labels[k]) for k in ("tint", "label_name") if k in target.labels)
        sheet_rows.append((target.image, *(scorer.images[(s["prompt"], heldout)][0] for s in shown),
                           label or target.image_id, *(f"{s['score']:.2f} {s['prompt']}" for s in shown)))
        scorer.images.clear()
        logger.info("target %d/%d (%s): %s '%s' %.3f vs naive %.3f, %d evaluations (%s)", i + 1, len(targets),
                    target.image_id, report["strategy"], report["optimized_prompt"], report["score"],
                    report["naive"]["score"], report["evaluations"], report["stopped"])
    checksum_after = weights_checksum(adapter.modules())
    assert checksum_after == checksum_before, "prompt optimisation changed the model's weights"
    summary = {
        "backend": adapter.name, "model": adapter.source,
        **summarize(reports),
        "settings": {**{k: v for k, v in asdict(settings).items() if k != "style"}, **asdict(settings.style),
                     "tables": {t.group: len(t.values) for t in tables}},
        "classifier": classifier is not None,
        "weights_sha256": checksum_after, "weights_unchanged": checksum_after == checksum_before,
        "text_embeddings_encoded": cache.encoded,
        "minutes": round((time.time() - started) / 60, 2),
    }
    write_json(out_dir / "summary.json", summary)
    contact_sheet(sheet_rows, out_dir / "contact_sheet.png")
    return summary


def run(args, folders: dict[str, Path]) -> dict:
    """--mode prompt: loads the adapter, reads tables and targets, optimises, writes <out>/prompt/."""
    settings = settings_from_args(args)
    if args.backend == "sd" and not args.clip_path:
        raise UserError("--backend sd needs --clip-path (a CLIP or FashionCLIP HF folder): its aligned space")
    tables = load_attribute_tables(args.attributes, settings.style.type_group)
    found = find_targets(args.dataset, args.data_root, args.target_split)   # bad input fails before the model loads
    adapter = load_adapter(args)
    targets = read_targets(found, adapter.image_size, args.num_targets)
    classifier = None if args.no_classifier else domain_classifier(args.dataset, args.data_root)
    agreement = FashionAgreement(classifier) if classifier is not None else None
    out_dir = folders["prompt"]
    summary = optimize_prompts(adapter, targets, tables, settings, out_dir, agreement, args.cache_dir or None)
    figures = summary.get("heldout", summary["selection"])
    print(f"prompt optimisation: {summary['targets']} targets, mean similarity {figures['naive_similarity']} (naive) "
          f"-> {figures['optimized_similarity']} (optimised) on {'held-out' if 'heldout' in summary else 'selection'}"
          f" seeds; reports in {out_dir}", file=sys.stderr)
    return summary
