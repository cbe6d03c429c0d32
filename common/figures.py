"""PNG figures drawn with PIL alone: loss curves from metrics.jsonl and sample sheets (training and evaluation)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
