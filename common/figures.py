"""PNG figures drawn with PIL alone: loss curves from metrics.jsonl, sample sheets (training and evaluation) and
captioned image grids (specialisation's contact sheet and comparison grid)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CURVE_COLOURS = {"loss": (31, 119, 180), "cont": (255, 127, 14), "rec": (44, 160, 44), "diff": (214, 39, 40),
                 "val_loss": (0, 0, 0)}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve_png(metrics_path: Path, out_path: Path, size: tuple[int, int] = (720, 400)) -> Path:
    """One panel, log-scale y: train loss terms per logged step, val loss as dots."""
    rows = read_metrics(metrics_path)
    W, H, pad = size[0], size[1], 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and r[k] > 0] for k in CURVE_COLOURS}
    points = [p for s in series.values() for p in s]
    if points:
        steps = [p[0] for p in points]
        logs = np.log10([p[1] for p in points])
        x0, x1, y0, y1 = min(steps), max(max(steps), min(steps) + 1), logs.min(), max(logs.max(), logs.min() + 1e-3)

        def xy(step, value):
            return (pad + (step - x0) / (x1 - x0) * (W - 2 * pad),
                    H - pad - (np.log10(value) - y0) / (y1 - y0) * (H - 2 * pad))

        for name, values in series.items():
            coords = [xy(s, v) for s, v in values]
            if name.startswith("val_"):
                for x, y in coords:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=CURVE_COLOURS[name])
            elif len(coords) > 1:
                draw.line(coords, fill=CURVE_COLOURS[name], width=2)
        draw.text((pad, H - pad + 8), f"step {x0} .. {x1}", fill="black")
        draw.text((4, pad - 20), f"log10 loss {y0:.2f} .. {y1:.2f}", fill="black")
    for i, name in enumerate(CURVE_COLOURS):
        draw.text((W - pad - 60, pad + 14 * i), name, fill=CURVE_COLOURS[name])
    draw.rectangle([pad, pad, W - pad, H - pad], outline="gray")
    image.save(out_path)
    return out_path


def sample_sheet_png(generated: list[Image.Image], prompts: list[str], real: list[Image.Image],
                     captions: list[str], out_path: Path, cell: int = 128) -> Path:
    """Top row: images generated for prompts; bottom row: val images with their generated captions."""
    cols = max(len(generated), len(real), 1)
    text_h = 48
    sheet = Image.new("RGB", (cols * cell, 2 * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (images, texts) in enumerate([(generated, prompts), (real, captions)]):
        top = row * (cell + text_h)
        for col, (img, text) in enumerate(zip(images, texts)):
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (col * cell, top))
            draw.multiline_text((col * cell + 2, top + cell + 2), "\n".join(textwrap.wrap(text, 22)[:3]), fill="black")
    sheet.save(out_path)
    return out_path


def image_grid_png(rows: list[list[tuple[Image.Image, str, str]]], titles: list[str], out_path: Path,
                   cell: int = 96, text_lines: int = 3, row_labels: list[str] | None = None) -> Path:
    """rows[r][c] = (image, the text under it, its colour) -> a PNG with a column per title, images resized to cell
    (nearest: small images keep their pixels visible), and a first column of wrapped row_labels when given."""
    font = ImageFont.load_default(size=10)  # Pillow's scalable font (the bitmap one drops spaces)
    line_h, header, chars = 12, 14, cell // 5
    label_w = 150 if row_labels else 0
    row_h = cell + text_lines * line_h + 8
    sheet = Image.new("RGB", (label_w + len(titles) * (cell + 4) + 4, header + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(titles):
        draw.text((label_w + 4 + col * (cell + 4), 1), title, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header + r * row_h
        for i, line in enumerate(textwrap.wrap(row_labels[r], label_w // 6)[:row_h // line_h] if row_labels else []):
            draw.text((4, top + i * line_h), line, fill="black", font=font)
        for col, (image, text, colour) in enumerate(row):
            left = label_w + 4 + col * (cell + 4)
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (left, top))
            for i, line in enumerate(textwrap.wrap(text, chars)[:text_lines]):
                draw.text((left, top + cell + 2 + i * line_h), line, fill=colour, font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
