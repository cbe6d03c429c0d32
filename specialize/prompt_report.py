"""Prompt-optimisation outputs: one JSON per target, the summary over targets, and a contact sheet PNG
(target | naive | optimised, one row per target)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from statistics import mean

import torch
from PIL import Image, ImageDraw, ImageFont

from common.files import atomic_write_text
from common.images import to_pil

CELL = 112           # pixels per image in the contact sheet
CAPTION_LINES = 3    # prompt text lines under each image
SHEET_ROWS = 8       # targets per column block


def write_json(path: Path, tree: dict) -> None:
    """Atomic JSON write: a reader sees the old file or the new one, never half of one."""
    atomic_write_text(path, json.dumps(tree, indent=2))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(mean(values), 4) if values else None


def summarize(reports: list[dict]) -> dict:
    """Means per strategy (its best candidate on each target where the search reached it), the optimised
    prompt's and the naive one's, and the gain; on the selection seeds and on the held-out seeds (the unbiased
    figure: the selection seeds chose the winner, so its score there is optimistic)."""
    per_strategy: dict[str, list[tuple[int, dict]]] = {}
    for i, report in enumerate(reports):
        best_of: dict[str, dict] = {}   # one value per target and strategy: refine proposes several
        for c in report["candidates"]:
            if c["strategy"] not in best_of or c["score"] > best_of[c["strategy"]]["score"]:
                best_of[c["strategy"]] = c
        for name, c in best_of.items():
            per_strategy.setdefault(name, []).append((i, c))
    strategies = {name: {"mean_similarity": _mean([c["similarity"] for _, c in found]),
                         "mean_agreement": _mean([c.get("agreement") for _, c in found]),
                         "mean_score": _mean([c["score"] for _, c in found]),
                         **_mean_parts([c.get("agreement_parts") for _, c in found]),
                         "targets": len(found),
                         "times_best": sum(r["strategy"] == name for r in reports)}
                  for name, found in per_strategy.items()}
    naive = [r["naive"] for r in reports]
    summary = {
        "targets": len(reports),
        "strategies": strategies,
        "best_strategy_by_wins": max(strategies, key=lambda s: strategies[s]["times_best"]),
        "best_strategy_by_mean_score": max(strategies, key=lambda s: strategies[s]["mean_score"]),
        "selection": _compare([r["similarity_score"] for r in reports], [n["similarity"] for n in naive],
                              [r.get("agreement") for r in reports], [n.get("agreement") for n in naive]),
        "mean_evaluations": _mean([r["evaluations"] for r in reports]),
        "stopped": {why: sum(r["stopped"] == why for r in reports) for why in {r["stopped"] for r in reports}},
    }
    heldout = [r["heldout"] for r in reports if r.get("heldout")]
    if heldout:
        summary["heldout"] = _compare([h["optimized"]["similarity"] for h in heldout],
                                      [h["naive"]["similarity"] for h in heldout],
                                      [h["optimized"].get("agreement") for h in heldout],
                                      [h["naive"].get("agreement") for h in heldout])
        for key in ("naive", "optimized"):
            summary["heldout"].update({f"{key}_{name}": value for name, value in
                                       _mean_parts([h[key].get("agreement_parts") for h in heldout]).items()})
    return summary


def _mean_parts(parts: list[dict | None]) -> dict:
    """[{"class": 1, "tint": 0.5}, ...] -> {"mean_class_agreement": ..., "mean_tint_agreement": ...}."""
    names = sorted({name for p in parts if p for name in p})
    return {f"mean_{name}_agreement": _mean([p.get(name) for p in parts if p]) for name in names}


def _compare(opt_sim, naive_sim, opt_agree, naive_agree) -> dict:
    out = {"naive_similarity": _mean(naive_sim), "optimized_similarity": _mean(opt_sim)}
    out["similarity_gain"] = round(out["optimized_similarity"] - out["naive_similarity"], 4)
    out["similarity_gain_relative"] = round(out["similarity_gain"] / max(abs(out["naive_similarity"]), 1e-8), 4)
    out["wins"] = sum(o > n for o, n in zip(opt_sim, naive_sim))
    if _mean(naive_agree) is not None and _mean(opt_agree) is not None:
        out["naive_agreement"], out["optimized_agreement"] = _mean(naive_agree), _mean(opt_agree)
        out["agreement_gain"] = round(out["optimized_agreement"] - out["naive_agreement"], 4)
    return out


def cell_image(image: torch.Tensor, size: int = CELL) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image of size x size (nearest: keeps small images' pixels visible)."""
    return to_pil(image[None])[0].resize((size, size), Image.NEAREST)


def contact_sheet(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str, str]], path: Path) -> Path:
    """rows of (target, naive image, optimised image, and the text under each) -> a PNG; more than
    SHEET_ROWS rows wrap into side-by-side blocks of target | naive | optimised."""
    font = ImageFont.load_default(size=10)  # Pillow's bundled scalable font (the bitmap one drops spaces)
    line_h, chars = 12, CELL // 5
    header, row_h = 14, CELL + CAPTION_LINES * line_h + 8
    block_w = 3 * (CELL + 4) + 12
    blocks = max(1, -(-len(rows) // SHEET_ROWS))
    sheet = Image.new("RGB", (blocks * block_w, header + min(len(rows), SHEET_ROWS) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (target, naive, best, label, naive_text, best_text) in enumerate(rows):
        block, top = r // SHEET_ROWS, header + (r % SHEET_ROWS) * row_h
        cells = ((target, label, "target"), (naive, naive_text, "naive"), (best, best_text, "optimised"))
        for col, (image, text, title) in enumerate(cells):
            left = block * block_w + 4 + col * (CELL + 4)
            if r % SHEET_ROWS == 0:
                draw.text((left, 1), title, fill="black", font=font)
            sheet.paste(cell_image(image), (left, top))
            for i, line in enumerate(textwrap.wrap(text, chars)[:CAPTION_LINES]):
                draw.text((left, top + CELL + 2 + i * line_h), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
