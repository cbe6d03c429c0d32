"""What the modes write for people: --mode prompt's summary and contact sheet (target | naive | optimised),
--mode compare's Markdown table of metrics and deltas and its grid (a row per prompt, a column per arm)."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import torch

from common.figures import image_grid_png
from common.files import atomic_write_text
from common.images import to_pil
from data.fashion import FASHION_CLASSES
from evaluation.report import format_number, markdown_table

COMPARED = {"class_accuracy": 3, "image_text_score": 2, "frechet_distance": 2}   # metric -> digits shown; with deltas


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
    per_strategy: dict[str, list[dict]] = {}
    for report in reports:
        best_of: dict[str, dict] = {}   # one candidate per target and strategy: refine proposes several
        for c in report["candidates"]:
            if c["score"] > best_of.setdefault(c["strategy"], c)["score"]:
                best_of[c["strategy"]] = c
        for name, c in best_of.items():
            per_strategy.setdefault(name, []).append(c)
    strategies = {name: {"mean_similarity": _mean([c["similarity"] for c in found]),
                         "mean_agreement": _mean([c.get("agreement") for c in found]),
                         "mean_score": _mean([c["score"] for c in found]),
                         **_mean_parts([c.get("agreement_parts") for c in found]), "targets": len(found),
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
        opt, naive = [h["optimized"] for h in heldout], [h["naive"] for h in heldout]
        summary["heldout"] = _compare([o["similarity"] for o in opt], [n["similarity"] for n in naive],
                                      [o.get("agreement") for o in opt], [n.get("agreement") for n in naive])
        for key, scores in (("naive", naive), ("optimized", opt)):
            summary["heldout"].update({f"{key}_{name}": value for name, value in
                                       _mean_parts([h.get("agreement_parts") for h in scores]).items()})
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


def _delta(value) -> str:
    return "–" if value is None else f"{value:+.3f}"


def markdown(report: dict) -> str:
    """The table: one row per arm with class accuracy, image-text score and Fréchet distance, each with its delta."""
    rows = []
    for name, arm in report["arms"].items():
        m, d = arm["metrics"], report["deltas_vs_base"].get(name, {})
        rows.append([name + (f" (coverage {arm['coverage']:.0%})" if "coverage" in arm else ""),
                     *(cell for key, digits in COMPARED.items()
                       for cell in (format_number(m.get(key), digits), _delta(d.get(key)))),
                     format_number(m.get("roundtrip_class_accuracy"))])
    lines = [f"# Base vs tuned on {report['dataset']} ({report['backend']} backend)", "",
             f"Base: `{report['base']}`. {report['prompts']} prompts x {report['images_per_prompt']} seeds, the same "
             f"for every arm; {report['steps']} {report['scheduler']} steps, guidance "
             + ", ".join(f"{name} {arm['guidance_scale']}" for name, arm in report["arms"].items()) + ".", "",
             *markdown_table(["arm", "class accuracy", "delta", "image-text score", "delta", "Fréchet distance",
                              "delta", "round-trip ceiling"], rows), ""]
    if report.get("fd_label"):
        lines.append(f"Fréchet distance: {report['fd_label']}, against {report['fd_real_images']} real val images; "
                     "lower is better, comparable only within this table.")
    ceiling = report.get("reconstruction_ceiling") or {}
    if ceiling:
        lines.append(f"Classifier on {ceiling['real_images']} real val images: {ceiling['class_accuracy_real']:.3f}; "
                     f"on their round trip through the frozen autoencoder: "
                     f"{ceiling['class_accuracy_autoencoder_roundtrip']:.3f} (MSE {ceiling['roundtrip_mse']}), the "
                     "ceiling for any denoiser fine-tuning that keeps the decoder (the last column: each arm's own "
                     "decoder).")
    if report.get("classifier_test_accuracy") is not None:
        lines.append(f"Classifier test accuracy (tinted Fashion-MNIST test split): "
                     f"{report['classifier_test_accuracy']:.3f}.")
    per_class = {name: arm["metrics"].get("class_accuracy_per_class") for name, arm in report["arms"].items()}
    if all(per_class.values()):
        lines += ["", *markdown_table(["class", *per_class], [[c, *(f"{per_class[a].get(c, 0):.2f}" for a in per_class)]
                                                              for c in next(iter(per_class.values()))])]
    return "\n".join(lines) + "\n"


def grid_rows(prompts: list, rows: int, images_per_prompt: int) -> list[int]:
    """Image indices to show: the first image of each class (or of each prompt when there are no classes)."""
    picked, seen = [], set()
    for i in range(0, len(prompts), images_per_prompt):
        key = prompts[i].label if prompts[i].label is not None else i
        if key not in seen:
            seen.add(key)
            picked.append(i)
        if len(picked) == rows:
            break
    return picked


def contact_sheet(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, str, str]], path: Path) -> Path:
    """rows of (target, naive image, optimised image, and the text under each) -> a PNG."""
    return image_grid_png([[(to_pil(image[None])[0], text, "black") for image, text in zip(row[:3], row[3:])]
                           for row in rows], ["target", "naive", "optimised"], path, cell=112)


def write_grid(images: dict[str, torch.Tensor], prompts: list, arms: dict, path: Path, rows: int,
               images_per_prompt: int) -> Path:
    """compare_grid.png: a row per prompt, a column per arm; under each image the classifier's guess (green when it
    names the prompt's class)."""
    indices = grid_rows(prompts, rows, images_per_prompt)
    cells = {name: to_pil(batch[indices]) for name, batch in images.items()}
    grid = []
    for row, i in enumerate(indices):
        grid.append([])
        for name in images:
            predicted, text, colour = arms[name]["metrics"].get("predicted"), "", "black"
            if predicted is not None and prompts[i].label is not None:
                guess = predicted[i]
                text = FASHION_CLASSES[guess] if guess < len(FASHION_CLASSES) else str(guess)
                colour = (0, 140, 0) if guess == prompts[i].label else (200, 0, 0)
            grid[-1].append((cells[name][row], text, colour))
    return image_grid_png(grid, list(images), path, cell=96, text_lines=1,
                          row_labels=[prompts[i].text for i in indices])
