"""The validator's human-readable outputs: a Markdown table of metrics and deltas, and a side-by-side PNG grid."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from common.files import atomic_write, atomic_write_text
from specialize.prompt_report import cell_image

CELL = 96            # pixels per image in the grid
LABEL_W = 150        # the prompt column


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _delta(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def markdown(report: dict) -> str:
    """The table: one row per arm with class accuracy, image-text score and Fréchet distance, each with its delta."""
    deltas = report["deltas_vs_base"]
    lines = [f"# Base vs tuned on {report['dataset']} ({report['backend']} backend)", "",
             f"Base: `{report['base']}`. {report['prompts']} prompts x {report['images_per_prompt']} seeds, the same "
             f"for every arm; {report['steps']} {report['scheduler']} steps, guidance "
             + ", ".join(f"{name} {arm['guidance_scale']}" for name, arm in report["arms"].items()) + ".", "",
             "| arm | class accuracy | delta | image-text score | delta | Fréchet distance | delta "
             "| round-trip ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for name, arm in report["arms"].items():
        m, d = arm["metrics"], deltas.get(name, {})
        label = name + (f" (coverage {arm['coverage']:.0%})" if "coverage" in arm else "")
        lines.append(f"| {label} | {_fmt(m.get('class_accuracy'))} | {_delta(d.get('class_accuracy'))} | "
                     f"{_fmt(m.get('image_text_score'), 2)} | {_delta(d.get('image_text_score'))} | "
                     f"{_fmt(m.get('frechet_distance'), 2)} | {_delta(d.get('frechet_distance'))} | "
                     f"{_fmt(m.get('roundtrip_class_accuracy'))} |")
    lines.append("")
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
        names = list(next(iter(per_class.values())))
        lines += ["", "| class | " + " | ".join(per_class) + " |", "|---" * (len(per_class) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(f"{per_class[a].get(c, 0):.2f}" for a in per_class) + " |" for c in names]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: Path) -> Path:
    return atomic_write_text(path, markdown(report))


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


def write_grid(images: dict[str, torch.Tensor], prompts: list, arms: dict, path: Path, rows: int,
               images_per_prompt: int) -> Path:
    """compare_grid.png: a row per prompt, a column per arm; under each image the classifier's guess (green when it
    names the prompt's class)."""
    from data.fashion import FASHION_CLASSES

    font = ImageFont.load_default()
    indices = grid_rows(prompts, rows, images_per_prompt)
    names = list(images)
    text_h, header = 12, 14
    sheet = Image.new("RGB", (LABEL_W + len(names) * (CELL + 4) + 4, header + len(indices) * (CELL + text_h + 6)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for col, name in enumerate(names):
        draw.text((LABEL_W + 4 + col * (CELL + 4), 1), name, fill="black", font=font)
    for row, i in enumerate(indices):
        top = header + row * (CELL + text_h + 6)
        for line_no, line in enumerate(textwrap.wrap(prompts[i].text, LABEL_W // 6)[:CELL // 11]):
            draw.text((4, top + line_no * 11), line, fill="black", font=font)
        for col, name in enumerate(names):
            left = LABEL_W + 4 + col * (CELL + 4)
            sheet.paste(cell_image(images[name][i], CELL), (left, top))
            predicted = arms[name]["metrics"].get("predicted")
            if predicted is not None and prompts[i].label is not None:
                guess = predicted[i]
                colour = (0, 140, 0) if guess == prompts[i].label else (200, 0, 0)
                name = FASHION_CLASSES[guess] if guess < len(FASHION_CLASSES) else str(guess)
                draw.text((left, top + CELL + 1), name, fill=colour, font=font)
    return atomic_write(path, sheet.save)
